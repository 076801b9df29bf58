"""Run a backfill to the end, in one process or under torchrun (the tests kill it at defined points):
argv: store model images.npy [order] [write-rows]. ``write-rows`` shrinks the Milvus backend's upsert
requests so that a batch is written in several (a kill can land between them)."""

import sys

import numpy as np

from bctkit.data.sources import ArraySource
from bctkit.engine.compute import Engine
from bctkit.engine.distributed import close_process_group, is_main
from bctkit.gallery.backends.milvus import store as milvus_store
from bctkit.gallery.backfill import distributed_backfill
from bctkit.models.store import load_model

store, model_path, images_path = sys.argv[1:4]
order = sys.argv[4] if len(sys.argv) > 4 else "random"
if len(sys.argv) > 5:
    milvus_store.WRITE_ROWS = int(sys.argv[5])
Engine.create("cpu")
arr = np.load(images_path)
images = ArraySource(arr, np.zeros(len(arr), np.int64))
res = distributed_backfill(store, load_model(model_path), images, order=order, seed=3, batch_size=200,
                           progress=False)
main = is_main()
close_process_group()
if main:
    print("finished", res.embedded, res.already, res.batches, flush=True)
