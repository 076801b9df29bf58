"""The training-image sample a diagnosis compares: seeded rows, the network's and given features of
exactly those rows, and which classes the old classifier knew."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from bctkit.data.sources.array import ArraySource
from bctkit.engine.compute import Engine
from bctkit.engine.loader import Feed
from bctkit.models.store import LoadedModel
from bctkit.run.trainsample import TrainSample, sample_rows

N, CLASSES = 30, 6


def _feed() -> Feed:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N, 1, 4, 4), dtype=np.uint8)
    return Feed(ArraySource(images, np.repeat(np.arange(CLASSES), N // CLASSES)))


def test_sample_rows_are_seeded_distinct_and_bounded():
    rows = sample_rows(N, 12)
    assert len(rows) == 12 and len(set(rows.tolist())) == 12 and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, sample_rows(N, 12)) and not np.array_equal(rows, sample_rows(N, 12, seed=1))
    assert np.array_equal(sample_rows(N, 1000), np.arange(N))


def test_sample_features_of_a_network_and_of_given_features():
    feed = _feed()
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    given = torch.randn(N, 5, generator=torch.Generator().manual_seed(1))
    models = {"new": LoadedModel(net, None, {"fingerprint": "n"}),
              "old": LoadedModel(None, None, {"fingerprint": "o"}, given={feed.source.fingerprint(): given})}
    logs: list[str] = []
    run = SimpleNamespace(cfg=SimpleNamespace(evaluation=SimpleNamespace(batch_size=4, flip=False)),
                          engine=Engine.create("cpu"), feed_for=lambda model, f: f, log=logs.append)
    new_to_old = np.array([3, -1, 0, -1, -1, 2])
    sample = TrainSample(run, feed, new_to_old, models, ["new"], size=12)
    got = sample("new", "old")
    rows = sample_rows(N, 12)
    assert got is not None and torch.equal(got.old, given[torch.as_tensor(rows)])
    pixels = torch.as_tensor(feed.source.images[rows]).float() / 127.5 - 1.0  # default mean = std = 0.5
    with torch.no_grad():
        assert torch.allclose(got.new, net(pixels), atol=1e-6)
    labels = rows // (N // CLASSES)
    assert got.known.tolist() == [bool(new_to_old[c] >= 0) for c in labels]
    assert "12 of 30" in got.note and logs
    assert sample("paragon", "old") is None and sample("new", "v2") is None
