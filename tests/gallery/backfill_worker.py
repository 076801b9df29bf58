"""Run a backfill to the end (the test kills it at random moments): argv store model images.npy."""

import sys

import numpy as np

from bctkit.data.sources import ArraySource
from bctkit.gallery.backends.sqlite.store import GalleryStore
from bctkit.gallery.backfill import backfill
from bctkit.models.store import load_model

store_dir, model_path, images_path = sys.argv[1:4]
images = ArraySource(np.load(images_path), np.zeros(len(np.load(images_path, mmap_mode="r")), np.int64))
model = load_model(model_path)
with GalleryStore.open(store_dir) as store:
    print("ready", flush=True)
    backfill(store, model, images, order="random", seed=3, batch_size=500, progress=False)
print("finished", flush=True)
