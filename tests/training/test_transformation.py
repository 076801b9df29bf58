"""Training h: the FCT and FastFill objectives against an independent computation, resuming, refusals."""

import numpy as np
import pytest
import torch

from bctkit.errors import DataError
from bctkit.models.transformation import TransformationConfig
from bctkit.training.transformation import (
    TransformTrainConfig,
    evaluate_loss,
    train_transformation,
    transformation_loss,
)


def test_losses_against_float64_numpy():
    rng = np.random.default_rng(3)
    pred, target = rng.standard_normal((7, 4)), rng.standard_normal((7, 4))
    s = rng.standard_normal(7)
    sq = ((target - pred) ** 2).sum(1)
    fct = sq.mean()
    # FastFill: Gaussian negative log-likelihood with variance exp(s) per coordinate, constants dropped
    nll = np.mean([0.5 * (sq[i] / np.exp(s[i]) + 4 * s[i]) for i in range(7)])
    t = {k: torch.from_numpy(v).float() for k, v in {"p": pred, "t": target, "s": s}.items()}
    assert float(transformation_loss(t["p"], None, t["t"])) == pytest.approx(fct, rel=1e-5)
    assert float(transformation_loss(t["p"], t["s"], t["t"])) == pytest.approx(nll, rel=1e-5)
    # the best log sigma^2 for a fixed error is log(error / d): the loss is smallest there
    grid = np.linspace(-4, 2, 601)
    best = grid[np.argmin([0.5 * (sq[0] / np.exp(g) + 4 * g) for g in grid])]
    assert best == pytest.approx(np.log(sq[0] / 4), abs=0.01)


def _data(n=512, noisy=64):
    """New features a fixed function of the old ones, with the first ``noisy`` items perturbed."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(n, 8, generator=g)
    new = torch.nn.functional.normalize(torch.tanh(old @ torch.randn(8, 6, generator=g)), dim=1)
    new[:noisy] = torch.nn.functional.normalize(torch.randn(noisy, 6, generator=g), dim=1)
    old[:noisy, 0] += 6.0  # what marks them, for h to learn
    return old, new


CFG = TransformationConfig(old_dim=8, new_dim=6, inner_dim=32)
TRAIN = TransformTrainConfig(epochs=30, batch_size=64, lr=3e-3,
                             schedule={"name": "cosine", "warmup_epochs": 1})


def test_training_lowers_the_objective_and_learns_which_items_it_misses():
    old, new = _data()
    res = train_transformation(old, new, CFG, TRAIN)
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 1.0
    # the loss reported for the trained h is the objective recomputed independently
    with torch.no_grad():
        pred, lv = res.net(old)
    t = torch.nn.functional.normalize(new, dim=1)
    sq = ((t - pred) ** 2).sum(1).double()
    manual = float((0.5 * (sq / lv.double().exp() + 6 * lv.double())).mean())
    assert evaluate_loss(res.net, old, new) == pytest.approx(manual, rel=1e-4)
    # uncertainty: the perturbed items (new unrelated to old) get the largest predicted sigma^2
    top = torch.argsort(lv, descending=True)[:64]
    assert (top < 64).float().mean() > 0.9


def test_resume_from_the_epoch_checkpoint_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    import bctkit.training.transformation as T

    old, new = _data(n=256)
    short = TRAIN.model_copy(update={"epochs": 4})
    whole = train_transformation(old, new, CFG, short)
    real = T.save_checkpoint

    def killed_after_epoch_2(path, modules, opt, meta):
        real(path, modules, opt, meta)
        if meta["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_checkpoint", killed_after_epoch_2)
    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train_transformation(old, new, CFG, short, checkpoint=ckpt, run_id="r")
    monkeypatch.setattr(T, "save_checkpoint", real)
    logs = []
    resumed = train_transformation(old, new, CFG, short, checkpoint=ckpt, run_id="r", log=logs.append)
    assert logs == ["[transform] resuming from epoch 2"]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    # one process, the same operations in the same order: bit for bit
    for k, v in whole.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    # a checkpoint of another training is not resumed from
    logs.clear()
    train_transformation(old, new, CFG, short, checkpoint=ckpt, run_id="other", log=logs.append)
    assert logs == []


def test_refuses_bad_features():
    old, new = _data(n=32, noisy=0)
    with pytest.raises(DataError, match="features are 8-d old, 5-d new"):
        train_transformation(old, new[:, :5], CFG, TRAIN)
    bad = old.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(DataError, match="old features holds NaN"):
        train_transformation(bad, new, CFG, TRAIN)
    with pytest.raises(DataError, match=r"new features must be \[32, d\]"):
        train_transformation(old, new[:30], CFG, TRAIN)
