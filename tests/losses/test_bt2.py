"""``bt2`` term against a direct formula; the pseudo classifier; dimension checks."""

import numpy as np
import pytest
import torch

import bctkit.losses.bt2  # noqa: F401  (registers "bt2")
from bctkit.errors import ConfigError
from bctkit.losses.base import CompatBatch, CompatContext, build_term
from bctkit.models.config import BackboneConfig

D_O, D, K = 4, 5, 3
LABELS = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1])


def _ctx(seed: int = 0) -> CompatContext:
    g = torch.Generator().manual_seed(seed)
    return CompatContext(
        old_embedding_dim=D_O, new_embedding_dim=D, num_new_classes=3, new_to_old=torch.tensor([0, -1, 1]),
        train_labels=LABELS.clone(), old_train_feats=torch.randn(len(LABELS), D_O, generator=g),
        paragon_train_feats=torch.randn(len(LABELS), D, generator=g),
    )


def test_pseudo_classifier_is_mean_of_normalised_old_features():
    ctx = _ctx()
    term = build_term("bt2", {"k": K})
    term.setup(ctx)
    old = ctx.old_train_feats.numpy()
    old = old / np.linalg.norm(old, axis=1, keepdims=True)
    expected = np.stack([old[LABELS.numpy() == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(term.pseudo.numpy(), expected, atol=1e-6)


def test_loss_matches_direct_formula():
    ctx = _ctx()
    params = {"k": K, "influence_weight": 2.0, "old_weight": 3.0, "paragon_weight": 0.5, "scale": 4.0}
    term = build_term("bt2", params)
    term.setup(ctx)
    idx = torch.tensor([1, 3, 6, 7])
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, D_O + K, generator=g, requires_grad=True)
    f = torch.randn(4, D, generator=g, requires_grad=True)
    batch = CompatBatch(new_feats=z, base_feats=f, labels=LABELS[idx], index=idx, epoch=0,
                        old_feats=ctx.old_train_feats[idx], paragon_feats=ctx.paragon_train_feats[idx])
    out = term(batch)
    # direct: loops over samples in float64
    zz, ff = z.detach().double(), f.detach().double()
    old, par = ctx.old_train_feats[idx].double(), ctx.paragon_train_feats[idx].double()
    P = term.pseudo.double()
    ce = cos_o = cos_p = 0.0
    for i in range(4):
        bct = zz[i, :D_O]
        logits = 4.0 * (bct / bct.norm()) @ P.T
        ce += float(-torch.log_softmax(logits, 0)[LABELS[idx][i]])
        cos_o += float(bct @ old[i] / (bct.norm() * old[i].norm()))
        cos_p += float(ff[i] @ par[i] / (ff[i].norm() * par[i].norm()))
    expected = 2.0 * ce / 4 + 3.0 * (1 - cos_o / 4) + 0.5 * (1 - cos_p / 4)
    assert abs(float(out.loss.detach()) - expected) < 1e-5
    out.loss.backward()
    assert z.grad is not None and f.grad is not None
    assert torch.count_nonzero(z.grad[:, D_O:]) == 0  # only the bct block is constrained
    assert set(out.parts) == {"influence", "old_cos", "paragon_cos"}


def test_dims_and_widened_backbone():
    term = build_term("bt2", {"k": 32})
    term.check_dims(128, 128)
    with pytest.raises(ConfigError, match="must exceed"):
        term.check_dims(64, 96)
    assert term.compatible_dims(128, 128) == 128
    cfg = term.backbone_config(BackboneConfig(embedding_dim=128), 160)
    assert cfg.bt2 is not None and cfg.bt2.old_dim == 160 and cfg.output_dim == 192
    assert not term.uses_old_classifier()


def test_needs_cached_targets():
    ctx = _ctx()
    ctx.paragon_train_feats = None
    with pytest.raises(ConfigError, match="paragon"):
        build_term("bt2", {}).setup(ctx)


def test_pseudo_classifier_is_frozen_and_not_checkpointed():
    ctx = _ctx()
    term = build_term("bt2", {"k": K})
    term.setup(ctx)
    assert list(term.parameters()) == [] and not term.pseudo.requires_grad
    assert "pseudo" not in term.state_dict()
