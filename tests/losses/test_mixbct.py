"""MixBCT: credible mask vs a per-class loop, mixing counts/positions/gradients, dims, training+resume."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bctkit.losses.mixbct  # noqa: F401  (registers "mixbct")
from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.errors import ConfigError, DataError
from bctkit.losses import CompatBatch, CompatContext, build_term
from bctkit.losses.mixbct import credible_mask, mix_count
from bctkit.models import BackboneConfig, HeadConfig
from bctkit.run.config import load_config, packaged_config
from bctkit.training import TrainConfig, train_model


def loop_mask(old: torch.Tensor, labels: torch.Tensor, keep: float) -> torch.Tensor:
    """Reference: the denoise rule written directly, one class at a time."""
    x = F.normalize(old.double(), dim=1)
    x = x / x.norm(dim=0).clamp_min(1e-12)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        z = x[rows]
        dist = (z - z.mean(0)).norm(dim=1).float()  # ties up to rounding: lower row index first
        n_keep = max(1, math.ceil(round(keep * len(rows), 9)))
        mask[rows[torch.argsort(dist, stable=True)[:n_keep]]] = True
    return mask


def _data(seed: int = 0, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 1, 2, 3, 5, 7, 10, 13, 20, 31] * 3
    labels = torch.cat([torch.full((s,), 3 * c + 7) for c, s in enumerate(sizes)])  # gaps in label ids
    centres = torch.randn(len(sizes), dim, generator=g) * 2
    old = centres.repeat_interleave(torch.tensor(sizes), 0) + torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return old[perm] * (torch.rand(len(labels), 1, generator=g) * 20 + 0.5), labels[perm]


@pytest.mark.parametrize("keep", [0.9, 0.7, 0.5, 0.25, 1.0, 0.05])
@pytest.mark.parametrize("seed", [0, 1])
def test_credible_mask_matches_per_class_loop(keep, seed):
    old, labels = _data(seed)
    got = credible_mask(old, labels, keep)
    assert got.dtype == torch.bool and torch.equal(got, loop_mask(old, labels, keep))
    for c in labels.unique():
        n = int((labels == c).sum())
        assert int(got[labels == c].sum()) == max(1, math.ceil(round(keep * n, 9)))


def test_credible_mask_rules():
    old, labels = _data(3)
    # row scale does not matter (softmax-trained old models give unnormalised features)
    scaled = old * torch.rand(len(old), 1) * 100
    assert torch.equal(credible_mask(scaled, labels), credible_mask(old, labels))
    assert torch.equal(credible_mask(old.half(), labels), loop_mask(old.half().float(), labels, 0.9))
    # 0.7 * 10 is 7 samples, not 8 (float error in keep * n is not rounded up)
    ten = torch.arange(4).repeat_interleave(10)
    assert int(credible_mask(torch.randn(40, 4), ten, 0.7).sum()) == 28
    # ties: two identical pairs around a mean; the lower row index wins
    tied = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert credible_mask(tied, torch.zeros(4, dtype=torch.long), 0.5).tolist() == [True, True, False, False]
    assert credible_mask(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).shape == (0,)
    as64 = old.double()
    before = as64.clone()
    assert torch.equal(credible_mask(as64.numpy(), labels.numpy()), credible_mask(old, labels))
    assert torch.equal(as64, before)  # the input is never modified


def test_credible_mask_validation():
    old, labels = _data(0)
    bad = old.clone()
    bad[17, 2] = float("nan")
    with pytest.raises(DataError, match="row 17"):
        credible_mask(bad, labels)
    bad[17, 2], bad[40, 0] = 0.0, float("inf")
    with pytest.raises(DataError, match="row 40"):
        credible_mask(bad, labels)
    with pytest.raises(DataError, match="one label per"):
        credible_mask(old, labels[:-1])
    with pytest.raises(DataError, match="integers"):
        credible_mask(old, labels.float())
    for keep in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="keep"):
            credible_mask(old, labels, keep)
    with pytest.raises(ConfigError, match="keep"):
        build_term("mixbct", {"keep": 0})
    with pytest.raises(ConfigError, match="mix_ratio"):
        build_term("mixbct", {"mix_ratio": 1.5})
    with pytest.raises(ConfigError, match="dim_rule"):
        build_term("mixbct", {"dim_rule": "crop"})


def _setup(old: torch.Tensor, labels: torch.Tensor, new_dim: int | None = None, **params):
    term = build_term("mixbct", params)
    d_o = old.shape[1]
    c = int(labels.max()) + 1
    term.setup(CompatContext(old_embedding_dim=d_o, new_embedding_dim=new_dim or d_o, num_new_classes=c,
                             new_to_old=torch.arange(c), train_labels=labels, old_train_feats=old))
    return term


def _batch(feats, old, labels, index, step=0):
    return CompatBatch(new_feats=feats, labels=labels[index], index=index, epoch=0, step=step,
                       old_feats=old[index])


def test_mix_replaces_documented_rows():
    old, labels = _data(1)
    term = _setup(old, labels)
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(4))[:40]
    feats = torch.randn(40, 16)
    mixed = term.mix(feats, _batch(feats, old, labels, index, step=3))
    replaced = (mixed != feats).any(dim=1)
    assert int(replaced.sum()) == mix_count(0.3, 40, 40) == 12
    assert term.credible[index[replaced]].all()
    assert torch.allclose(mixed[replaced], F.normalize(old[index[replaced]], dim=1))
    assert torch.allclose(mixed[replaced].norm(dim=1), torch.ones(12))  # unnormalised old features
    assert torch.equal(mixed[~replaced], feats[~replaced])
    out = term(_batch(feats, old, labels, index, step=3))
    assert out.loss.item() == 0.0 and out.parts == {"mixed": 12.0, "mix_frac": 0.3}
    half = term.mix(feats, _batch(feats, old.half(), labels, index, step=3))  # float16 feature cache
    assert half.dtype == torch.float32 and torch.allclose(half, mixed, atol=1e-3)
    with pytest.raises(RuntimeError, match="not mixed"):
        term(_batch(feats, old, labels, index, step=4))


def test_mix_count_rounding_and_few_credible():
    assert [mix_count(0.5, 5, 9), mix_count(0.3, 16, 16), mix_count(0.1, 4, 9), mix_count(0.3, 10, 2)] == [
        3, 5, 0, 2]
    old, labels = _data(2)
    term = _setup(old, labels, mix_ratio=1.0)
    index = torch.arange(60)
    feats = torch.randn(60, 16)
    replaced = (term.mix(feats, _batch(feats, old, labels, index)) != feats).any(dim=1)
    assert torch.equal(replaced, term.credible[index])  # fewer credible than asked: all credible
    plain = _setup(old, labels, mix_ratio=1.0, denoise=False)
    assert plain.credible.all()
    assert (plain.mix(feats, _batch(feats, old, labels, index)) != feats).any(dim=1).all()
    bad = old.clone()
    bad[7, 0] = float("inf")
    with pytest.raises(DataError, match="training image 7 "):
        plain.mix(feats, _batch(feats, bad, labels, index))


def test_replaced_rows_give_no_gradient_to_backbone():
    old, labels = _data(0)
    term = _setup(old, labels, mix_ratio=0.5)
    torch.manual_seed(0)
    backbone = nn.Linear(5, 16)
    x = torch.randn(30, 5)
    index = torch.arange(30) * 3
    feats = backbone(x)
    feats.retain_grad()
    w = torch.randn(30, 16)
    mixed = term.mix(feats, _batch(feats, old, labels, index))
    (mixed * w).sum().backward()
    replaced = term.mixed_positions(_batch(feats, old, labels, index))
    assert int(replaced.sum()) == 15
    assert torch.equal(feats.grad[replaced], torch.zeros(15, 16))
    assert torch.equal(feats.grad[~replaced], w[~replaced])
    kept = (~replaced).float()[:, None]
    assert torch.allclose(backbone.weight.grad, (w * kept).T @ x, atol=1e-5)
    assert torch.allclose(backbone.bias.grad, (w * kept).sum(0), atol=1e-5)


def test_positions_are_seeded_by_seed_and_step():
    old, labels = _data(0)
    index = torch.arange(0, 150, 2)
    feats = torch.randn(len(index), 16)

    def positions(term, step):
        return term.mixed_positions(_batch(feats, old, labels, index, step))

    a, b = _setup(old, labels), _setup(old, labels)
    assert torch.equal(positions(a, 5), positions(b, 5))
    assert torch.equal(positions(a, 5), positions(a, 5))
    assert not torch.equal(positions(a, 5), positions(a, 6))
    assert len({tuple(positions(a, s).tolist()) for s in range(10)}) == 10
    other = _setup(old, labels, seed=1)
    assert not torch.equal(positions(a, 5), positions(other, 5))


def test_dimension_rules():
    refuse, pad = build_term("mixbct", {}), build_term("mixbct", {"dim_rule": "pad"})
    refuse.check_dims(8, 8)
    assert refuse.compatible_dims(8, 8) is None and pad.compatible_dims(8, 8) is None
    with pytest.raises(ConfigError, match="dim_rule: pad"):
        refuse.check_dims(8, 16)
    pad.check_dims(8, 16)
    assert pad.compatible_dims(8, 16) == 8
    for term in (refuse, pad):
        with pytest.raises(ConfigError, match="at least"):
            term.check_dims(16, 8)
    old, labels = _data(0, dim=8)
    with pytest.raises(ConfigError):
        _setup(old, labels, new_dim=16)
    term = _setup(old, labels, new_dim=12, dim_rule="pad", mix_ratio=1.0, denoise=False)
    feats = torch.randn(10, 12)
    index = torch.arange(10)
    mixed = term.mix(feats, _batch(feats, old, labels, index))
    assert torch.allclose(mixed[:, :8], F.normalize(old[:10], dim=1))
    assert torch.equal(mixed[:, 8:], torch.zeros(10, 4))


def test_config_dims(tmp_path):
    path = packaged_config("mixbct-official")
    cfg = load_config(path)
    names = [m.display_name for m in cfg.methods]
    assert names == ["mixbct", "mixbct-r0.1", "mixbct-r0.5", "mixbct-nodenoise"]
    assert cfg.new.head.s == 64 and cfg.new.train.epochs == 35 and cfg.new.train.schedule.name == "poly"
    with pytest.raises(ConfigError, match="methods.0: mixbct: .*dim_rule"):
        load_config(path, ["new.backbone.embedding_dim=256"])
    load_config(path, ["new.backbone.embedding_dim=256", "methods.0.params.dim_rule=pad",
                       "methods.1.params.dim_rule=pad", "methods.2.params.dim_rule=pad",
                       "methods.3.params.dim_rule=pad"])


def test_train_and_resume_matches_uninterrupted(tmp_path):
    data = make_synthetic(SyntheticSpec(num_classes=6, images_per_class=8, size=16, seed=5))
    bb = BackboneConfig(arch="r8", width=4, embedding_dim=8, image_size=16)
    head = HeadConfig(type="arcface", s=16, m=0.2)
    cfg = TrainConfig(epochs=3, batch_size=16, optimizer={"name": "sgd", "lr": 0.05},
                      schedule={"name": "poly", "power": 2}, grad_clip=5.0)
    labels = torch.from_numpy(data.labels)
    old = torch.randn(len(data), 8, generator=torch.Generator().manual_seed(1)) * 7  # unnormalised

    def run(**kw):
        ctx = CompatContext(old_embedding_dim=8, new_embedding_dim=8, num_new_classes=6,
                            new_to_old=torch.arange(6), train_labels=labels, old_train_feats=old)
        return train_model(data, bb, head, cfg, term=build_term("mixbct", {}), ctx=ctx, progress=False, **kw)

    full = run(checkpoint=tmp_path / "a.safetensors")
    assert all(0 < h["mixed"] <= 5 and math.isfinite(h["loss"]) for h in full.history)
    ckpt = tmp_path / "b.safetensors"
    run(checkpoint=ckpt, stop_after_epoch=1)
    resumed = run(checkpoint=ckpt, resume=True)
    assert resumed.resumed_from_epoch == 1
    for (k, a), b in zip(full.backbone.state_dict().items(), resumed.backbone.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    assert torch.equal(full.head.weight, resumed.head.weight)
    assert full.history == [{**h, "seconds": f["seconds"], "images_per_s": f["images_per_s"]}
                            for h, f in zip(resumed.history, full.history, strict=True)]
