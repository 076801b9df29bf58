"""ShardedHead against the replicated heads.py heads: world 1 in-process, world 2 as two gloo CPU ranks."""

from __future__ import annotations

import math
import multiprocessing as mp
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bctkit.errors import ConfigError, DataError
from bctkit.models.heads import HeadConfig, build_head
from bctkit.models.sharded_head import ShardedHead, gather_rows, shard_bounds, shard_rows

CFGS = {
    "normface": HeadConfig(type="normface", s=30),
    "cosface": HeadConfig(type="cosface"),
    "arcface": HeadConfig(type="arcface", s=64, m=0.5),
}
WORLD, DIM, CLASSES, BATCH = 2, 5, 7, 12
SAMPLED_CLASSES = 21  # shards 11 / 10
SAMPLED_LABELS = [0, 1, 2, 3, 4, 5, 6, 7, 12, 15, 0, 12]  # 8 positives in shard 0 (> ceil 5.5), 2 in shard 1


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Relative closeness, with the absolute slack scaled to the largest entry of ``want``."""
    got, want = got.detach(), want.detach()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()) + 1e-12)


def _fallback_feature(w_y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A feature nearly opposite to the class vector w_y, so ArcFace takes its fallback branch."""
    return -w_y + 0.3 * w_y.norm() * F.normalize(torch.randn(w_y.shape, generator=gen), dim=0)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def test_shard_bounds_match_array_split():
    for n, w in [(7, 2), (10, 3), (2, 4), (0, 3), (12, 1)]:
        sizes = [len(p) for p in np.array_split(np.arange(n), w)]
        bounds = shard_bounds(n, w)
        assert [e - s for s, e in bounds] == sizes
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(w - 1))


@pytest.mark.parametrize("kind", ["normface", "cosface", "arcface"])
def test_world1_equals_replicated_head(kind):
    cfg = CFGS[kind]
    torch.manual_seed(3)
    ref = build_head(cfg, DIM, CLASSES)
    torch.manual_seed(3)
    head = ShardedHead(cfg, DIM, CLASSES)
    assert torch.equal(head.weight, ref.weight) and (head.start, head.end) == (0, CLASSES)
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(BATCH, DIM, generator=gen)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    feats[0] = _fallback_feature(ref.weight[labels[0]].detach(), gen)
    assert _cos(feats[0], ref.weight[labels[0]].detach()) < math.cos(math.pi - 0.5)
    f_ref, f_sh = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    loss_ref, loss_sh = ref(f_ref, labels), head(f_sh, labels)
    loss_ref.backward()
    loss_sh.backward()
    _close(loss_sh, loss_ref, 1e-6)
    _close(f_sh.grad, f_ref.grad, 1e-6)
    _close(head.weight.grad, ref.weight.grad, 1e-6)


def test_world1_helpers_and_to_head():
    head = ShardedHead(CFGS["cosface"], DIM, CLASSES)
    full = torch.randn(CLASSES, DIM)
    head.load_full_weight(full)
    assert torch.equal(head.full_weight(), full)
    assert torch.equal(gather_rows(full, CLASSES), full) and torch.equal(shard_rows(full), full)
    state = torch.get_rng_state()
    plain = head.to_head()
    assert torch.equal(torch.get_rng_state(), state)
    assert type(plain).__name__ == "CosFaceHead" and (plain.s, plain.m) == (64.0, 0.4)
    assert torch.equal(plain.weight, full)


def test_errors():
    with pytest.raises(ConfigError, match="cosine-margin"):
        ShardedHead(HeadConfig(type="softmax"), DIM, CLASSES)
    for rate in (0.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match="sample_rate"):
            ShardedHead(CFGS["arcface"], DIM, CLASSES, sample_rate=rate)
    head = ShardedHead(CFGS["arcface"], DIM, CLASSES)
    with pytest.raises(DataError, match="shape"):
        head.load_full_weight(torch.zeros(CLASSES + 1, DIM))
    with pytest.raises(DataError, match="labels"):
        head(torch.randn(2, DIM), torch.tensor([0, CLASSES]))
    with pytest.raises(DataError, match="rows"):
        gather_rows(torch.zeros(CLASSES - 1, DIM), CLASSES)


def _restricted_reference(
    weight: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, kept: list[int], cfg: HeadConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replicated-head CE over the kept classes only: (loss, weight grad, feats grad)."""
    ref = build_head(cfg, weight.shape[1], weight.shape[0])
    with torch.no_grad():
        ref.weight.copy_(weight)
    f = feats.clone().requires_grad_()
    cols = torch.tensor(kept)
    remap = {c: i for i, c in enumerate(kept)}
    loss = F.cross_entropy(ref.logits(f, labels)[:, cols], torch.tensor([remap[int(y)] for y in labels]))
    loss.backward()
    return loss.detach(), ref.weight.grad, f.grad


def _check_kept(kept: list[int], labels: list[int], start: int, end: int, rate: float) -> None:
    positives = {y for y in labels if start <= y < end}
    assert positives <= set(kept) and all(start <= c < end for c in kept) and kept == sorted(set(kept))
    assert len(kept) == max(len(positives), math.ceil(rate * (end - start)))


def test_world1_sampling():
    cfg, classes = CFGS["arcface"], 20
    gen = torch.Generator().manual_seed(4)
    weight, feats = torch.randn(classes, DIM, generator=gen), torch.randn(BATCH, DIM, generator=gen)
    labels = torch.tensor([0, 0, 3, 9, 9, 9, 11, 3, 0, 17, 11, 3])
    head = ShardedHead(cfg, DIM, classes, sample_rate=0.5, seed=11)
    head.load_full_weight(weight)
    kept = head.kept_classes(labels, step=5).tolist()
    _check_kept(kept, labels.tolist(), 0, classes, 0.5)
    twin = ShardedHead(cfg, DIM, classes, sample_rate=0.5, seed=11)
    assert twin.kept_classes(labels, step=5).tolist() == kept
    assert head.kept_classes(labels, step=6).tolist() != kept
    f = feats.clone().requires_grad_()
    loss = head(f, labels, step=5)
    loss.backward()
    want_loss, want_wgrad, want_fgrad = _restricted_reference(weight, feats, labels, kept, cfg)
    _close(loss, want_loss, 1e-6)
    _close(head.weight.grad, want_wgrad, 1e-6)
    _close(f.grad, want_fgrad, 1e-6)
    unkept = sorted(set(range(classes)) - set(kept))
    assert unkept and torch.count_nonzero(head.weight.grad[unkept]) == 0


# ---- world 2: two gloo processes on CPU -------------------------------------------------------------------


def _world2_checks(rank: int, data: dict) -> dict:
    """Everything the two ranks compute; the test process compares it with replicated heads."""
    out: dict = {}
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for kind, cfg in CFGS.items():
        torch.manual_seed(123)
        head = ShardedHead(cfg, DIM, CLASSES)
        init = head.full_weight()
        head.load_full_weight(data["weight"])
        backbone = nn.Linear(DIM, DIM)
        backbone.load_state_dict(data["backbone"])
        feats = backbone(data["x"][rows])
        feats.retain_grad()
        loss = head(feats, data["y"][rows])
        loss.backward()
        grads = [p.grad.clone() for p in backbone.parameters()]
        for g in grads:
            dist.all_reduce(g)
            g /= WORLD
        out[kind] = {
            "init": init,
            "bounds": (head.start, head.end),
            "loss": loss.detach(),
            "weight_grad": head.weight.grad,
            "feats_grad": feats.grad,
            "backbone_grads": grads,
        }
    head = ShardedHead(CFGS["cosface"], DIM, CLASSES)
    head.load_full_weight(data["weight"])
    shard = shard_rows(data["momentum"])
    errors = []
    for bad in (lambda: head.load_full_weight(data["weight"][1:]), lambda: gather_rows(torch.zeros(5), 7)):
        try:
            bad()
        except DataError as e:
            errors.append(str(e))
    plain = head.to_head()
    out["roundtrip"] = {
        "weight_shard": head.weight.detach().clone(),
        "full_weight": head.full_weight(),
        "momentum_shard": shard,
        "momentum": gather_rows(shard, CLASSES),
        "ints": gather_rows(shard_rows(torch.arange(CLASSES) * 10), CLASSES),
        "errors": errors,
        "to_head": (type(plain).__name__, plain.s, plain.m, plain.weight.detach()),
    }
    head = ShardedHead(CFGS["arcface"], DIM, SAMPLED_CLASSES, sample_rate=0.5, seed=7)
    head.load_full_weight(data["sampled_weight"])
    labels = torch.tensor(SAMPLED_LABELS)
    feats = data["sampled_feats"][rows].clone().requires_grad_()
    loss = head(feats, labels[rows], step=3)
    loss.backward()
    out["sampled"] = {
        "bounds": (head.start, head.end),
        "kept": [head.kept_classes(labels, step).tolist() for step in (3, 3, 4)],
        "loss": loss.detach(),
        "weight_grad": head.weight.grad,
        "feats_grad": feats.grad,
    }
    return out


def _world2_worker(rank: int, tmp: str) -> None:
    """Entry point of a spawned rank: results or the traceback go to files in ``tmp``."""
    try:
        torch.set_num_threads(1)
        store = f"file://{Path(tmp) / 'store'}"
        dist.init_process_group(
            "gloo", init_method=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
        )
        out = _world2_checks(rank, torch.load(Path(tmp) / "data.pt"))
        torch.save(out, Path(tmp) / f"out{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        (Path(tmp) / f"err{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def _world2_data() -> dict:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(CLASSES, DIM, generator=gen) * 0.01
    backbone = nn.Linear(DIM, DIM)
    with torch.no_grad():
        backbone.weight.copy_(torch.eye(DIM) + 0.1 * torch.randn(DIM, DIM, generator=gen))
        backbone.bias.copy_(0.01 * torch.randn(DIM, generator=gen))
    x = torch.randn(BATCH, DIM, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    target = _fallback_feature(weight[y[0]], gen)  # ArcFace fallback for sample 0 (rank 0) and 7 (rank 1)
    x[0] = torch.linalg.solve(backbone.weight.detach(), target - backbone.bias.detach())
    x[7], y[7] = x[0], y[0]
    return {
        "weight": weight,
        "backbone": backbone.state_dict(),
        "x": x,
        "y": y,
        "momentum": torch.randn(CLASSES, DIM, generator=gen),
        "sampled_weight": torch.randn(SAMPLED_CLASSES, DIM, generator=gen),
        "sampled_feats": torch.randn(BATCH, DIM, generator=gen),
    }


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """Run the two ranks once; returns (inputs, [rank 0 results, rank 1 results])."""
    tmp = tmp_path_factory.mktemp("sharded_head")
    data = _world2_data()
    torch.save(data, tmp / "data.pt")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_world2_worker, args=(r, str(tmp))) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].terminate()
        procs[r].join(5)
    problems = [f"rank {r} timed out" for r in hung]
    for r, p in enumerate(procs):
        err = tmp / f"err{r}.txt"
        if err.exists():
            problems.append(f"rank {r} failed:\n{err.read_text()}")
        elif p.exitcode != 0 and r not in hung:
            problems.append(f"rank {r} exited with code {p.exitcode}")
    assert not problems, "\n".join(problems)
    return data, [torch.load(tmp / f"out{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("kind", ["normface", "cosface", "arcface"])
def test_world2_matches_replicated_head(world2, kind):
    data, outs = world2
    cfg = CFGS[kind]
    torch.manual_seed(123)
    ref = build_head(cfg, DIM, CLASSES)
    assert [o[kind]["bounds"] for o in outs] == [(0, 4), (4, 7)]
    for o in outs:
        assert torch.equal(o[kind]["init"], ref.weight.detach())
    with torch.no_grad():
        ref.weight.copy_(data["weight"])
    backbone = nn.Linear(DIM, DIM)
    backbone.load_state_dict(data["backbone"])
    feats = backbone(data["x"])
    feats.retain_grad()
    if kind == "arcface":
        for i in (0, 7):
            assert _cos(feats[i].detach(), data["weight"][data["y"][i]]) < math.cos(math.pi - cfg.m)
    loss = ref(feats, data["y"])
    loss.backward()
    assert torch.equal(outs[0][kind]["loss"], outs[1][kind]["loss"])
    _close(outs[0][kind]["loss"], loss.detach(), 1e-5)
    _close(torch.cat([o[kind]["weight_grad"] for o in outs]), ref.weight.grad, 1e-5)
    half = BATCH // WORLD
    for r, o in enumerate(outs):
        _close(o[kind]["feats_grad"], WORLD * feats.grad[r * half : (r + 1) * half], 1e-5)
        want_grads = [backbone.weight.grad, backbone.bias.grad]
        for got, want in zip(o[kind]["backbone_grads"], want_grads, strict=True):
            _close(got, want, 1e-5)


def test_world2_roundtrip(world2):
    data, outs = world2
    for o, (s, e) in zip(outs, shard_bounds(CLASSES, WORLD), strict=True):
        rt = o["roundtrip"]
        assert torch.equal(rt["weight_shard"], data["weight"][s:e])
        assert torch.equal(rt["full_weight"], data["weight"])
        assert torch.equal(rt["momentum_shard"], data["momentum"][s:e])
        assert torch.equal(rt["momentum"], data["momentum"])
        assert torch.equal(rt["ints"], torch.arange(CLASSES) * 10)
        assert len(rt["errors"]) == 2 and "shape" in rt["errors"][0] and "rows" in rt["errors"][1]
        name, s_, m_, weight = rt["to_head"]
        assert (name, s_, m_) == ("CosFaceHead", 64.0, 0.4) and torch.equal(weight, data["weight"])


def test_world2_sampling(world2):
    data, outs = world2
    labels = torch.tensor(SAMPLED_LABELS)
    kept_all: list[int] = []
    for o, bounds in zip(outs, shard_bounds(SAMPLED_CLASSES, WORLD), strict=True):
        sampled = o["sampled"]
        assert sampled["bounds"] == bounds
        at3, again3, at4 = sampled["kept"]
        _check_kept(at3, SAMPLED_LABELS, *bounds, 0.5)
        assert again3 == at3
        kept_all += at3
    assert len(outs[0]["sampled"]["kept"][0]) == 8  # positives exceed ceil(0.5 * 11): no negatives
    assert outs[1]["sampled"]["kept"][2] != outs[1]["sampled"]["kept"][0]  # other step, other negatives
    want_loss, want_wgrad, want_fgrad = _restricted_reference(
        data["sampled_weight"], data["sampled_feats"], labels, kept_all, CFGS["arcface"]
    )
    wgrad = torch.cat([o["sampled"]["weight_grad"] for o in outs])
    _close(outs[0]["sampled"]["loss"], want_loss, 1e-5)
    assert torch.equal(outs[0]["sampled"]["loss"], outs[1]["sampled"]["loss"])
    _close(wgrad, want_wgrad, 1e-5)
    unkept = sorted(set(range(SAMPLED_CLASSES)) - set(kept_all))
    assert unkept and torch.count_nonzero(wgrad[unkept]) == 0
    half = BATCH // WORLD
    for r, o in enumerate(outs):
        _close(o["sampled"]["feats_grad"], WORLD * want_fgrad[r * half : (r + 1) * half], 1e-5)
