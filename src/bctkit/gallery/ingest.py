"""Adding images to a gallery: embed them with a model and add them batch by batch, each batch one
atomic commit, so that an add killed or failed part-way is finished by running it again.

A rerun of the same add (same model, same images) skips the images already stored by that model
version with the same label (an earlier run of this add stored them: their vectors are what this run
would compute) and embeds the rest in the same batches an uninterrupted run uses, so the store ends
as an uninterrupted add leaves it (the same ids in the same order, the same vectors and metadata).
An image whose id is stored by another version, or with another label, is refused before anything
is written: it is a different item, to backfill or remove first. Stored items are not re-read (that
would cost a full re-embedding): the label is the content check a rerun makes.

The model version is declared with the first batch, once its images are embedded, so an add that
fails before adding anything (no images, an unreadable first image, a model the store declares with
another dimension) writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from bctkit.data.sources.base import DataSource
from bctkit.errors import ConfigError, DataError
from bctkit.gallery.checks import GalleryError, few
from bctkit.gallery.embed import Embedder, as_embedder, embed_batches, version_of
from bctkit.gallery.interface import Gallery


@dataclass
class AddResult:
    """What one add call did: images added now, already stored before (skipped), and batches committed."""

    added: int
    already: int
    batches: int
    version: str


def add_images(store: Gallery, model: Embedder, images: DataSource, *, batch_size: int = 256,
               progress: bool = True) -> AddResult:
    """Embed ``images`` with ``model`` and add them (id: the image's key, metadata: its label) in
    commits of ``batch_size`` images; images already stored by this version are skipped (see the
    module docstring)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ConfigError(f"add: batch size must be a positive integer, got {batch_size!r}")
    model = as_embedder(model)
    version, dim, name, layout = version_of(model)
    n = len(images)
    if n == 0:
        raise DataError(f"{images.name}: no images to add")
    ids = [images.key(i) for i in range(n)]
    labels = [images.label_name(int(images.labels[i])) for i in range(n)]
    found = store.find(ids)
    other = [i for i, v in zip(ids, found, strict=True) if v is not None and v != version]
    if other:
        raise GalleryError(f"add: {len(other)} image(s) already in the store, embedded by another model "
                           f"version: {few(other)} (backfill re-embeds items, remove deletes them)")
    stored = [r for r, v in enumerate(found) if v == version]
    metas = store.metadata([ids[r] for r in stored]) if stored else []
    moved = [ids[r] for r, m in zip(stored, metas, strict=True) if m.get("label") != labels[r]]
    if moved:
        raise GalleryError(f"add: {len(moved)} image(s) already in the store with another label: "
                           f"{few(moved)} (remove them first to add them again)")
    todo = np.flatnonzero(np.array([v is None for v in found], dtype=bool))
    declared = False
    batches = 0
    with tqdm(total=len(todo), desc="add", unit="img", disable=not progress) as bar:
        for start in range(0, n, batch_size):  # an uninterrupted run's batches, less the stored rows
            rows = todo[np.searchsorted(todo, start) : np.searchsorted(todo, start + batch_size)]
            if not len(rows):
                continue
            sub = images.subset(rows)
            feats = np.concatenate([f for _, f in embed_batches(model, sub, len(rows), False, "add")])
            if not declared:
                store.add_version(version, dim, name=name, layout=layout)
                declared = True
            store.add([ids[r] for r in rows.tolist()], feats, version,
                      [{"label": labels[r]} for r in rows.tolist()])
            batches += 1
            bar.update(len(rows))
    return AddResult(len(todo), len(stored), batches, version)
