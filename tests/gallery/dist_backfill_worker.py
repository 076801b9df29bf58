"""Run a backfill to the end, in one process or under torchrun (the tests kill it at defined points).

argv: STORE MODEL IMAGES.npy [--order O] [--write-rows N] [--share R/W]. ``--write-rows`` shrinks the
Milvus backend's upsert requests so that a batch is written in several (a kill can land between
them); ``--share R/W`` runs only rank R of W's batches, as one rank of a Milvus server backfill
does (every rank upserting its own), with Milvus Lite standing in for the server.
"""

import argparse

import numpy as np

from bctkit.data.sources import ArraySource
from bctkit.engine.compute import Engine
from bctkit.engine.distributed import close_process_group, is_main
from bctkit.gallery.backends.milvus import store as milvus_store
from bctkit.gallery.backfill import distributed_backfill, run_share
from bctkit.gallery.backfill_plan import plan_backfill
from bctkit.gallery.embed import as_embedder, version_of
from bctkit.gallery.interface import open_gallery
from bctkit.models.store import load_model

p = argparse.ArgumentParser()
p.add_argument("store")
p.add_argument("model")
p.add_argument("images")
p.add_argument("--order", default="random")
p.add_argument("--write-rows", type=int)
p.add_argument("--share")
args = p.parse_args()
if args.write_rows:
    milvus_store.WRITE_ROWS = args.write_rows
Engine.create("cpu")
arr = np.load(args.images)
images = ArraySource(arr, np.zeros(len(arr), np.int64))
model = load_model(args.model)
if args.share:
    rank, world = (int(x) for x in args.share.split("/"))
    with open_gallery(args.store) as store:
        plan = plan_backfill(store, model.fingerprint, args.order, 3, 200)
        fp, dim, name, layout = version_of(as_embedder(model))
        store.add_version(fp, dim, name=name, layout=layout)  # rank 0 declares it before the shares run
        run_share(store, model, images, plan.batches, rank=rank, world=world)
    print("finished share", flush=True)
else:
    res = distributed_backfill(args.store, model, images, order=args.order, seed=3, batch_size=200,
                               progress=False)
    main = is_main()
    close_process_group()
    if main:
        print("finished", res.embedded, res.already, res.batches, flush=True)
