"""``bct``: influence loss against hand-written formulas; synthesized rows; frozen old side."""

import math

import pytest
import torch

import bctkit.losses.bct  # noqa: F401  (registers "bct")
from bctkit.errors import ConfigError, DataError
from bctkit.losses.base import CompatBatch, CompatContext, build_term
from bctkit.models.heads import ArcFaceHead, CosFaceHead, Head, SoftmaxHead
from bctkit.models.store import freeze

D_O, D_N, C_O = 4, 6, 3
NEW_TO_OLD = torch.tensor([2, -1, 0, -1, 1])  # new classes 1 and 3 are unknown to the old classifier
TRAIN_LABELS = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 0, 1])


def _ctx(head: Head | None, seed: int = 0) -> CompatContext:
    g = torch.Generator().manual_seed(seed)
    return CompatContext(
        old_embedding_dim=D_O, new_embedding_dim=D_N, num_new_classes=5, new_to_old=NEW_TO_OLD.clone(),
        train_labels=TRAIN_LABELS.clone(), old_train_feats=torch.randn(len(TRAIN_LABELS), D_O, generator=g),
        old_head=head,
    )


def _old_head(kind: str) -> Head:
    torch.manual_seed(1)
    head: Head = {
        "softmax": lambda: SoftmaxHead(D_O, C_O),
        "cosface": lambda: CosFaceHead(D_O, C_O, s=8.0, m=0.3),
        "arcface": lambda: ArcFaceHead(D_O, C_O, s=8.0, m=0.4),
    }[kind]()
    with torch.no_grad():
        head.weight.normal_()
        if isinstance(head, SoftmaxHead):
            head.bias.normal_()
    return freeze(head)


def _batch(labels: list[int], seed: int = 2) -> CompatBatch:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(len(labels), D_N, generator=g, requires_grad=True)
    o = torch.randn(len(labels), D_O, generator=g)
    y = torch.tensor(labels)
    return CompatBatch(new_feats=f, labels=y, index=torch.arange(len(y)), epoch=0, old_feats=o,
                       old_labels=NEW_TO_OLD[y])


def _manual_means() -> dict[int, list[float]]:
    """Per-class mean of normalised old features, by explicit loops."""
    feats = _ctx(None).old_train_feats
    out = {}
    for c in range(5):
        rows = [feats[i] / math.sqrt(sum(float(v) ** 2 for v in feats[i]))
                for i in range(len(TRAIN_LABELS)) if int(TRAIN_LABELS[i]) == c]
        out[c] = [sum(float(r[k]) for r in rows) / len(rows) for k in range(D_O)]
    return out


def _logit(kind: str, x: list[float], w: list[float], b: float, s: float, m: float, target: bool) -> float:
    """One logit of the old head's form, written out by hand."""
    if kind == "softmax":
        return sum(a * c for a, c in zip(x, w, strict=True)) + b
    dot = sum(a * c for a, c in zip(x, w, strict=True))
    cos = dot / math.sqrt(sum(a * a for a in x) * sum(c * c for c in w))
    if target and kind == "cosface":
        cos -= m
    elif target and kind == "arcface":
        cos = math.cos(math.acos(cos) + m) if cos > math.cos(math.pi - m) else cos - m * math.sin(math.pi - m)
    return s * cos


def _rows(kind: str, head: Head, mode: str) -> tuple[list[list[float]], list[float]]:
    """Classifier rows and biases the method must use, assembled by hand."""
    means = _manual_means()
    real = head.weight.tolist()
    real_b = head.bias.tolist() if kind == "softmax" else [0.0] * C_O
    if mode == "synthesize_all":
        return [means[c] for c in range(5)], [0.0] * 5
    if mode == "synthesize":
        return real + [means[1], means[3]], real_b + [sum(real_b) / C_O] * 2
    return real, real_b


def _target(mode: str, y: int) -> int:
    if mode == "synthesize_all":
        return y
    if mode == "synthesize" and int(NEW_TO_OLD[y]) < 0:
        return C_O + [1, 3].index(y)
    return int(NEW_TO_OLD[y])


def _manual_ce(kind: str, head: Head, mode: str, batch: CompatBatch) -> float:
    rows, biases = _rows(kind, head, mode)
    s, m = (1.0, 0.0) if kind == "softmax" else (head.s, head.m)
    total, n = 0.0, 0
    for i in range(len(batch.labels)):
        t = _target(mode, int(batch.labels[i]))
        if t < 0:
            continue
        x = batch.new_feats[i, :D_O].tolist()
        z = [_logit(kind, x, w, b, s, m, j == t) for j, (w, b) in enumerate(zip(rows, biases, strict=True))]
        total += math.log(sum(math.exp(v) for v in z)) - z[t]
        n += 1
    return total / n


@pytest.mark.parametrize("kind", ["softmax", "cosface", "arcface"])
@pytest.mark.parametrize("mode", ["ignore", "synthesize", "synthesize_all"])
def test_influence_matches_formula(kind, mode):
    head = _old_head(kind)
    term = build_term("bct", {"new_classes": mode, "weight": 2.5})
    term.setup(_ctx(head))
    batch = _batch([0, 1, 2, 3, 4, 1, 0])
    out = term(batch)
    assert out.loss.item() == pytest.approx(2.5 * _manual_ce(kind, head, mode, batch), rel=1e-4)
    assert out.parts["known_frac"] == pytest.approx(4 / 7)
    out.loss.backward()
    assert batch.new_feats.grad is not None and batch.new_feats.grad[:, :D_O].abs().sum() > 0
    assert batch.new_feats.grad[:, D_O:].abs().sum() == 0


@pytest.mark.parametrize("kind", ["softmax", "arcface"])
def test_synthesize_keeps_real_rows_and_appends_means(kind):
    head = _old_head(kind)
    term = build_term("bct", {})
    term.setup(_ctx(head))
    w = term.classifier.weight
    assert w.shape == (C_O + 2, D_O)
    assert torch.equal(w[:C_O], head.weight)
    means = _manual_means()
    assert torch.allclose(w[C_O:], torch.tensor([means[1], means[3]]), atol=1e-6)
    if kind == "softmax":
        assert torch.equal(term.classifier.bias[:C_O], head.bias)
        assert torch.allclose(term.classifier.bias[C_O:], head.bias.mean().expand(2))
    else:
        assert (term.classifier.s, term.classifier.m, type(term.classifier)) == (head.s, head.m, ArcFaceHead)


def test_ignore_without_known_samples_is_zero_with_graph():
    term = build_term("bct", {"new_classes": "ignore"})
    term.setup(_ctx(_old_head("cosface")))
    batch = _batch([1, 3, 3])
    out = term(batch)
    assert out.loss.item() == 0.0 and out.parts["known_frac"] == 0.0
    out.loss.backward()
    assert batch.new_feats.grad is not None and batch.new_feats.grad.abs().sum() == 0


@pytest.mark.parametrize("kind", ["softmax", "cosface"])
def test_kd_matches_formula(kind):
    head = _old_head(kind)
    term = build_term("bct", {"kd": True, "new_classes": "ignore"})
    term.setup(_ctx(head))
    assert term.temperature == (1.0 if kind == "softmax" else head.s)
    batch = _batch([0, 1, 2, 4])
    rows, biases = _rows(kind, head, "ignore")
    s, t = (1.0 if kind == "softmax" else head.s), term.temperature
    total, n = 0.0, 0
    for i in [0, 2, 3]:  # the known samples
        zo = [_logit(kind, batch.old_feats[i].tolist(), w, b, s, 0.0, False) / t
              for w, b in zip(rows, biases, strict=True)]
        zf = [_logit(kind, batch.new_feats[i, :D_O].tolist(), w, b, s, 0.0, False) / t
              for w, b in zip(rows, biases, strict=True)]
        p = [math.exp(v) / sum(math.exp(u) for u in zo) for v in zo]
        lse = math.log(sum(math.exp(u) for u in zf))
        total += -sum(pj * (zj - lse) for pj, zj in zip(p, zf, strict=True))
        n += 1
    assert term(batch).loss.item() == pytest.approx(total / n, rel=1e-4)
    custom = build_term("bct", {"kd": True, "temperature": 2.0})
    custom.setup(_ctx(head))
    assert custom.temperature == 2.0


def test_synthesize_all_without_old_head_is_normface():
    term = build_term("bct", {"new_classes": "synthesize_all"})
    term.setup(_ctx(None))
    batch = _batch([0, 1, 4])
    means = _manual_means()
    total = 0.0
    for i, y in enumerate([0, 1, 4]):
        x = batch.new_feats[i, :D_O].tolist()
        z = [_logit("normface", x, means[c], 0.0, 64.0, 0.0, c == y) for c in range(5)]
        total += math.log(sum(math.exp(v) for v in z)) - z[y]
    assert term(batch).loss.item() == pytest.approx(total / 3, rel=1e-4)
    for mode in ("ignore", "synthesize"):
        with pytest.raises(ConfigError, match="synthesize_all"):
            build_term("bct", {"new_classes": mode}).setup(_ctx(None))


def test_old_classifier_never_trained_nor_checkpointed():
    head = _old_head("arcface")
    head.requires_grad_(True)  # even an unfrozen old head must not receive gradient through the term
    before = head.weight.detach().clone()
    term = build_term("bct", {"kd": False})
    term.setup(_ctx(head))
    assert list(term.parameters()) == [] and term.state_dict() == {}
    f = torch.randn(8, D_N, requires_grad=True)
    opt = torch.optim.SGD([f, *head.parameters()], lr=0.5)
    for _ in range(3):
        batch = CompatBatch(new_feats=f, labels=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]),
                            index=torch.arange(8), epoch=0, old_feats=torch.randn(8, D_O))
        opt.zero_grad()
        term(batch).loss.backward()
        opt.step()
    assert head.weight.grad is None and torch.equal(head.weight, before)


def test_dims_options_and_bad_inputs():
    term = build_term("bct", {})
    assert term.compatible_dims(4, 6) == 4 and term.compatible_dims(4, 4) is None
    with pytest.raises(ConfigError, match="embedding_dim"):
        term.check_dims(8, 4)
    with pytest.raises(ConfigError, match="new_classes"):
        build_term("bct", {"new_classes": "drop"})
    with pytest.raises(ConfigError, match="lambda"):
        build_term("bct", {"lambda": 1})
    ctx = _ctx(_old_head("cosface"))
    ctx.new_to_old = torch.tensor([2, -1, 0, -1, 3])
    with pytest.raises(DataError, match="new_to_old"):
        term.setup(ctx)
    ctx = _ctx(_old_head("cosface"))
    ctx.old_train_feats = None
    with pytest.raises(ConfigError, match="old_train_feats"):
        term.setup(ctx)
    ctx = _ctx(_old_head("cosface"))
    ctx.old_train_feats = torch.randn(len(TRAIN_LABELS), D_O + 1)
    with pytest.raises(DataError, match="old_train_feats"):
        term.setup(ctx)
