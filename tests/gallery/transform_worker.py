"""Run ``transform`` on a store for the kill tests: argv STORE TRANSFORM [--write-rows N] (shrinks the
Milvus backend's upsert requests, so a batch is written in several and a kill can land inside one)."""

import argparse

from bctkit.gallery.backends.milvus import store as milvus_store
from bctkit.gallery.interface import open_gallery
from bctkit.gallery.transform import transform
from bctkit.models.transformation import load_transformation

p = argparse.ArgumentParser()
p.add_argument("store")
p.add_argument("transform")
p.add_argument("--write-rows", type=int)
args = p.parse_args()
if args.write_rows:
    milvus_store.WRITE_ROWS = args.write_rows
with open_gallery(args.store) as g:
    res = transform(g, load_transformation(args.transform), batch_size=64, progress=False)
print("finished", res.transformed, res.already, res.batches)
