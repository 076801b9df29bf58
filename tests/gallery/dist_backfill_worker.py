"""Run a backfill to the end, in one process or under torchrun (the tests kill it at defined points).

argv: STORE MODEL IMAGES.npy [--order O] [--write-rows N]. ``--write-rows`` shrinks the Milvus
backend's upsert requests so that a batch is written in several (a kill can land between them).
"""

import argparse

import numpy as np

from bctkit.data.sources import ArraySource
from bctkit.engine.compute import Engine
from bctkit.engine.distributed import close_process_group, is_main
from bctkit.gallery.backends.milvus import store as milvus_store
from bctkit.gallery.backfill import distributed_backfill
from bctkit.models.store import load_model

p = argparse.ArgumentParser()
p.add_argument("store")
p.add_argument("model")
p.add_argument("images")
p.add_argument("--order", default="random")
p.add_argument("--write-rows", type=int)
args = p.parse_args()
if args.write_rows:
    milvus_store.WRITE_ROWS = args.write_rows
Engine.create("cpu")
arr = np.load(args.images)
images = ArraySource(arr, np.zeros(len(arr), np.int64))
model = load_model(args.model)
res = distributed_backfill(args.store, model, images, order=args.order, seed=3, batch_size=200,
                           progress=False)
main = is_main()
close_process_group()
if main:
    print("finished", res.embedded, res.already, res.batches, flush=True)
