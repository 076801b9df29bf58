"""The new and old models' features of a bounded, seeded sample of the new models' training images,
for the diagnosis of a failed claim (evaluation.diagnosis): computed only when a claim is diagnosed,
on rank 0 alone (no collectives), through the extraction every evaluation uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from bctkit.engine.loader import Feed
from bctkit.evaluation.diagnosis import TrainFeatures
from bctkit.features import iter_features
from bctkit.models.store import LoadedModel

if TYPE_CHECKING:
    from bctkit.run.benchmark import Run

SAMPLE_SIZE = 1000
"""At most this many training images are embedded by each diagnosed model (and the old one)."""
SAMPLE_SEED = 0


def sample_rows(n: int, size: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED) -> np.ndarray:
    """``min(n, size)`` distinct rows of ``n``, drawn with ``seed``, in increasing order."""
    rows = np.random.default_rng(seed).choice(n, size=min(n, size), replace=False)
    return np.sort(rows).astype(np.int64)


class TrainSample:
    """A :data:`~bctkit.evaluation.diagnosis.TrainProvider` for the models ``names`` trained against
    the old model on ``feed`` (its classes numbered as ``new_to_old``: each one's row in the old
    classifier, -1 for none)."""

    def __init__(self, run: Run, feed: Feed, new_to_old: np.ndarray, models: dict[str, LoadedModel],
                 names: list[str], size: int = SAMPLE_SIZE) -> None:
        self.run, self.feed, self.models, self.names = run, feed, models, set(names)
        self.rows = sample_rows(len(feed), size)
        self.known = np.asarray(new_to_old)[feed.source.labels[self.rows]] >= 0
        self.sub = feed.with_source(feed.source.subset(self.rows))
        self.done: dict[str, torch.Tensor] = {}

    @classmethod
    def of(cls, run: Run, models: dict[str, LoadedModel]) -> TrainSample | None:
        """The sample of ``run``'s methods' training set (None before the run trained them)."""
        if run.trained_on is None:
            return None
        return cls(run, *run.trained_on, models, [m.display_name for m in run.cfg.methods])

    def embed(self, name: str) -> torch.Tensor:
        """Model ``name``'s features of the sample (given features: their rows of the sample)."""
        if name not in self.done:
            model = self.models[name]
            if model.given is not None:
                self.done[name] = model.given[self.feed.source.fingerprint()][torch.as_tensor(self.rows)]
            else:
                ev = self.run.cfg.evaluation
                net = model.backbone.to(self.run.engine.device)
                parts = [f for _, f in iter_features(net, self.run.feed_for(model, self.sub), ev.batch_size,
                                                     ev.flip, False, f"diagnosis {name}", self.run.engine)]
                self.done[name] = torch.cat(parts)
        return self.done[name]

    def __call__(self, name: str, ref: str) -> TrainFeatures | None:
        if ref != "old" or name not in self.names:
            return None
        self.run.log(f"[diagnosis] {name} and old: features of {len(self.rows)} training images")
        return TrainFeatures(self.embed(name), self.embed("old"), self.known,
                             f"a seeded sample of {len(self.rows)} of {len(self.feed)}")
