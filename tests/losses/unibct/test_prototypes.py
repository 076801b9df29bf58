"""Tests of the UniBCT pseudo-prototype builders against direct float64 loop implementations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bctkit.errors import ConfigError, DataError
from bctkit.losses.unibct.prototypes import class_means, drop_means
from bctkit.losses.unibct.refinement import (
    _plan_chunks,
    refine_prototypes,
    refinement_weights,
    weight_summary,
    weighted_means,
)
from bctkit.storage import rows

SIZES = [1, 2, 3, 17, 50, 5, 1, 8, 2, 33, 4, 1, 64, 9]


def _data(
    sizes: list[int], d_old: int = 12, d_new: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random old/new features with the given class sizes, rows shuffled (labels not sorted)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    perm = torch.randperm(labels.numel(), generator=g)
    labels = labels[perm]
    n = labels.numel()
    # class-structured features, so similarities are not all alike
    centres_new = torch.randn(len(sizes), d_new, generator=g)
    new = centres_new[labels] + 0.8 * torch.randn(n, d_new, generator=g)
    old = torch.randn(len(sizes), d_old, generator=g)[labels] + torch.randn(n, d_old, generator=g)
    return old, new, labels


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_refine(
    old: torch.Tensor,
    new: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lam: float,
    tau: float,
    column: bool = False,
) -> np.ndarray:
    """Eqs. 6-10 by the letter, in float64, one class at a time with explicit loops for E."""
    o, f, y = old.double().numpy(), new.double().numpy(), labels.numpy()
    out = np.zeros((num_classes, o.shape[1]))
    for c in range(num_classes):
        idx = np.nonzero(y == c)[0]
        v0, fc = _unit(o[idx]), _unit(f[idx])
        m = len(idx)
        if m == 1:
            out[c] = v0[0]
            continue
        s = np.array([[fc[i] @ fc[j] / tau for j in range(m)] for i in range(m)])
        e = np.zeros((m, m))
        for i in range(m):
            for j in range(m):
                if i == j:
                    continue
                if column:
                    e[i, j] = math.exp(s[i, j]) / sum(math.exp(s[k, j]) for k in range(m) if k != j)
                else:
                    e[i, j] = math.exp(s[i, j]) / sum(math.exp(s[i, k]) for k in range(m) if k != i)
        v_inf = (1 - lam) * np.linalg.inv(np.eye(m) - lam * e) @ v0
        out[c] = v_inf.mean(axis=0)
    return out


# ----------------------------------------------------------------------------- refinement


@pytest.fixture(scope="module")
def reference_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Data with varied class sizes and its Eqs. 6-10 reference, computed once."""
    old, new, labels = _data(SIZES)
    return old, new, labels, _reference_refine(old, new, labels, len(SIZES), lam=0.9, tau=0.05)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 100, 32768])
def test_refine_matches_direct_equations(
    chunk_size: int, reference_case: tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]
) -> None:
    old, new, labels, ref = reference_case
    got = refine_prototypes(old, new, labels, len(SIZES), chunk_size=chunk_size)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-5, rtol=0)


def test_weights_match_mean_row_of_explicit_inverse() -> None:
    old, new, labels = _data(SIZES, seed=5)
    got = refinement_weights(new, labels, len(SIZES), lam=0.8, tau=0.1, chunk_size=30, dtype=torch.float64)
    f, y = new.double().numpy(), labels.numpy()
    for c in range(len(SIZES)):
        idx = np.nonzero(y == c)[0]
        m = len(idx)
        if m == 1:
            assert got[idx[0]] == 1.0
            continue
        fc = _unit(f[idx])
        s = fc @ fc.T / 0.1
        np.fill_diagonal(s, -np.inf)
        e = np.exp(s - s.max(1, keepdims=True))
        e /= e.sum(1, keepdims=True)
        expected = ((1 - 0.8) * np.linalg.inv(np.eye(m) - 0.8 * e)).mean(axis=0)
        np.testing.assert_allclose(got[idx].numpy(), expected, atol=1e-10, rtol=0)
        assert abs(float(got[idx].sum()) - 1.0) < 1e-10 and float(got[idx].min()) > 0
    # the prototypes are these weights applied to the normalised old features
    protos = refine_prototypes(old, new, labels, len(SIZES), lam=0.8, tau=0.1, dtype=torch.float64)
    unit_old = torch.nn.functional.normalize(old.double(), dim=1)
    direct = torch.zeros_like(protos).index_add_(0, labels, unit_old * got[:, None])
    torch.testing.assert_close(protos, direct, atol=1e-12, rtol=0)


def test_weighted_means_of_the_weights_are_the_refined_prototypes(tmp_path: Path) -> None:
    old, new, labels = _data(SIZES, seed=8)
    w = refinement_weights(new, labels, len(SIZES))
    mm = np.lib.format.open_memmap(tmp_path / "old.npy", mode="w+", dtype=np.float16, shape=tuple(old.shape))
    mm[:] = old.numpy()
    mm.flush()
    mapped = np.load(tmp_path / "old.npy", mmap_mode="r")
    from_mm = weighted_means(mapped, w, labels, len(SIZES), chunk_size=7)
    as_f32 = torch.from_numpy(mm.astype(np.float32))
    torch.testing.assert_close(from_mm, refine_prototypes(as_f32, new, labels, len(SIZES)), atol=1e-5, rtol=0)
    torch.testing.assert_close(weighted_means(old, w, labels, len(SIZES)),
                               refine_prototypes(old, new, labels, len(SIZES)), atol=1e-6, rtol=0)
    with pytest.raises(DataError, match="weights have shape"):
        weighted_means(old, w[:-1], labels, len(SIZES))
    with pytest.raises(DataError, match="NaN"):
        weighted_means(old, w.index_fill(0, torch.tensor([0]), float("nan")), labels, len(SIZES))


def test_weight_summary_matches_loop() -> None:
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3, 3, 3])
    raw = torch.rand(10, generator=g, dtype=torch.float64) + 0.05
    raw[2] = 0.01  # far below the plain mean in class 0
    w = raw / torch.zeros(4, dtype=torch.float64).index_add_(0, labels, raw)[labels]
    got = weight_summary(w, labels, 4)
    ess, low, members = [], 0, 0
    for c in range(4):
        wc = w[labels == c]
        if len(wc) < 2:
            continue
        ess.append(float(wc.sum() ** 2 / (wc ** 2).sum()) / len(wc))
        low += int((wc * len(wc) < 0.5).sum())
        members += len(wc)
    assert got["ess"] == pytest.approx(sum(ess) / len(ess), abs=1e-12)
    assert got["low"] == pytest.approx(low / members, abs=1e-12) and got["low"] > 0
    uniform = weight_summary(torch.full((10,), 1.0) / torch.bincount(labels)[labels], labels, 4)
    assert uniform == pytest.approx({"ess": 1.0, "low": 0.0})


def test_weights_put_an_outlier_last() -> None:
    g = torch.Generator().manual_seed(2)
    centre = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    feats = torch.cat([centre + 0.1 * torch.randn(11, 16, generator=g), -centre[None]])
    w = refinement_weights(feats, torch.zeros(12, dtype=torch.int64), 1)
    assert int(w.argmin()) == 11 and float(w[11]) * 12 < 0.5
    with pytest.raises(ConfigError, match="tau"):
        refinement_weights(feats, torch.zeros(12, dtype=torch.int64), 1, tau=0.0)
    with pytest.raises(DataError, match="NaN"):
        refinement_weights(feats.index_fill(0, torch.tensor([3]), float("nan")),
                           torch.zeros(12, dtype=torch.int64), 1)


def test_refine_float64_and_other_hyperparameters() -> None:
    old, new, labels = _data(SIZES, seed=3)
    ref = _reference_refine(old, new, labels, len(SIZES), lam=0.5, tau=0.2)
    got = refine_prototypes(
        old, new, labels, len(SIZES), lam=0.5, tau=0.2, chunk_size=40, dtype=torch.float64
    )
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-10, rtol=0)


def test_chunk_plan_forces_padding_and_several_chunks() -> None:
    counts = torch.bincount(torch.cat([torch.full((s,), c) for c, s in enumerate(SIZES)]))
    plan = _plan_chunks(counts, 64)
    assert len(plan) > 3
    covered = torch.cat([cls for cls, _ in plan]).sort().values
    assert torch.equal(covered, torch.arange(len(SIZES)))
    assert any(int(counts[cls].min()) < m for cls, m in plan)  # some chunk is padded
    for cls, m in plan:
        assert m == int(counts[cls].max())
        assert cls.numel() == 1 or cls.numel() * m <= 64


def test_singletons_in_a_padded_chunk_and_unpadded_chunks_match_direct_equations() -> None:
    """Sizes 1 and 2 share a padded chunk when the 2s outnumber the 1s; equal sizes make chunks
    without padding (no masks); both normalisations."""
    sizes = [1, 2, 2, 1, 2, 2, 2, 3, 3, 3, 3]
    old, new, labels = _data(sizes, seed=21)
    counts = torch.tensor(sizes)
    assert any(bool((counts[cls] == 1).any()) and m == 2 for cls, m in _plan_chunks(counts, 64))
    assert any(bool((counts[cls] == m).all()) for cls, m in _plan_chunks(counts, 64))
    for column in (False, True):
        ref = _reference_refine(old, new, labels, len(sizes), lam=0.9, tau=0.05, column=column)
        got = refine_prototypes(old, new, labels, len(sizes), chunk_size=64,
                                normalize="column" if column else "row")
        np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-5, rtol=0)
        w = refinement_weights(new, labels, len(sizes), chunk_size=64,
                               normalize="column" if column else "row")
        assert torch.isfinite(w).all()
        torch.testing.assert_close(weighted_means(old, w, labels, len(sizes)), got, atol=1e-6, rtol=0)


def test_batches_merge_equal_sizes_within_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    from bctkit.losses.unibct import chunks

    monkeypatch.setattr(chunks, "_EDGE_BUDGET", 300)
    counts = torch.tensor([5] * 12 + [11, 11] + [3, 2])
    plan = _plan_chunks(counts, 10)
    padded = {int(c): m for cls, m in plan for c in cls}
    batches = chunks.batch_chunks(plan, 40)
    assert len(batches) < len(plan)
    assert sorted(torch.cat([cls for cls, _ in batches]).tolist()) == list(range(len(counts)))
    for cls, m in batches:
        assert all(padded[int(c)] == m for c in cls)  # every class keeps its padded size
        assert cls.numel() == 1 or (cls.numel() * m <= 40 and cls.numel() * m * m <= 300)


def test_batching_changes_weights_by_rounding_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each class keeps its padded size, so batching only changes the batched LU's rounding."""
    from bctkit.losses.unibct import chunks

    old, new, labels = _data(SIZES * 3, seed=4)
    k = len(SIZES) * 3
    batched = refinement_weights(new, labels, k, chunk_size=40)
    monkeypatch.setattr(chunks, "_BATCH_ROWS", 1)  # one batch per chunk
    torch.testing.assert_close(refinement_weights(new, labels, k, chunk_size=40), batched,
                               atol=1e-7, rtol=1e-6)


def test_refine_equals_limit_of_propagation() -> None:
    """The closed form equals the iteration V(t) = lam E V(t-1) + (1 - lam) V0 run to convergence."""
    old, new, labels = _data([6, 9], seed=5)
    lam, tau = 0.9, 0.05
    got = refine_prototypes(old, new, labels, 2, lam=lam, tau=tau, dtype=torch.float64)
    for c in range(2):
        v0 = torch.nn.functional.normalize(old[labels == c].double(), dim=1)
        f = torch.nn.functional.normalize(new[labels == c].double(), dim=1)
        s = f @ f.T / tau
        s.fill_diagonal_(float("-inf"))
        e = torch.softmax(s, dim=1)
        v = v0.clone()
        for _ in range(300):
            v = lam * e @ v + (1 - lam) * v0
        torch.testing.assert_close(got[c], v.mean(0), atol=1e-11, rtol=0)


def test_column_softmax_reproduces_plain_mean() -> None:
    old, new, labels = _data(SIZES, seed=1)
    col = refine_prototypes(old, new, labels, len(SIZES), normalize="column", chunk_size=50)
    ref_col = _reference_refine(old, new, labels, len(SIZES), 0.9, 0.05, column=True)
    means = class_means(old, labels, len(SIZES))
    torch.testing.assert_close(col, means, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ref_col, means.double().numpy(), atol=1e-6)
    row = refine_prototypes(old, new, labels, len(SIZES))
    multi = torch.tensor(SIZES) > 2  # classes of 1 or 2 samples cannot differ from the mean
    assert (row - means)[multi].norm(dim=1).min() > 1e-3


def test_refine_moves_towards_dense_cluster() -> None:
    g = torch.Generator().manual_seed(11)
    d = 16
    centre = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    cluster = centre + 0.05 * torch.randn(9, d, generator=g)
    outlier = -centre + 0.05 * torch.randn(1, d, generator=g)
    feats = torch.cat([cluster, outlier])  # old and new features alike
    labels = torch.zeros(10, dtype=torch.int64)
    refined = refine_prototypes(feats, feats, labels, 1)[0]
    plain = class_means(feats, labels, 1)[0]
    cluster_centre = torch.nn.functional.normalize(cluster, dim=1).mean(0)
    assert (refined - plain).norm() > 0.05
    assert (refined - cluster_centre).norm() < 0.5 * (plain - cluster_centre).norm()


def test_singleton_keeps_feature_and_duplicates_are_stable() -> None:
    feat_a = torch.tensor([[3.0, 4.0, 0.0]])
    dup = torch.tensor([1.0, -2.0, 2.0]).repeat(5, 1)
    old = torch.cat([feat_a, dup])
    new = torch.cat([torch.tensor([[1.0, 0.0]]), torch.tensor([0.0, 5.0]).repeat(5, 1)])
    labels = torch.tensor([0, 1, 1, 1, 1, 1])
    got = refine_prototypes(old, new, labels, 2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], torch.tensor([0.6, 0.8, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], torch.tensor([1.0, -2.0, 2.0]) / 3, atol=1e-6, rtol=0)
    raw = refine_prototypes(old, new, labels, 2, normalize_inputs=False)
    torch.testing.assert_close(raw[0], feat_a[0], atol=1e-6, rtol=0)


def test_refine_numpy_and_old_new_dims_differ() -> None:
    old, new, labels = _data(SIZES, d_old=7, d_new=20, seed=2)
    t = refine_prototypes(old, new, labels, len(SIZES), chunk_size=30)
    a = refine_prototypes(old.numpy(), new.numpy(), labels.numpy(), len(SIZES), chunk_size=30)
    assert a.shape == (len(SIZES), 7)
    torch.testing.assert_close(a, t, atol=0, rtol=0)


def test_memmap_float16_matches_in_memory(tmp_path: Path) -> None:
    old, new, labels = _data(SIZES, d_old=32, d_new=24, seed=4)
    maps = []
    for name, x in (("old", old), ("new", new)):
        mm = np.memmap(tmp_path / f"{name}.f16", dtype=np.float16, mode="w+", shape=tuple(x.shape))
        mm[:] = x.numpy().astype(np.float16)
        mm.flush()
        maps.append(np.memmap(tmp_path / f"{name}.f16", dtype=np.float16, mode="r",
                              shape=tuple(x.shape)))
    got = refine_prototypes(maps[0], maps[1], labels.numpy(), len(SIZES), chunk_size=60)
    rounded = refine_prototypes(
        torch.from_numpy(np.array(maps[0])).float(),
        torch.from_numpy(np.array(maps[1])).float(),
        labels, len(SIZES), chunk_size=60,
    )
    full = refine_prototypes(old, new, labels, len(SIZES), chunk_size=60)
    torch.testing.assert_close(got, rounded, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, full, atol=5e-3, rtol=0)
    torch.testing.assert_close(
        class_means(maps[0], labels, len(SIZES), block_rows=13),
        class_means(old, labels, len(SIZES)), atol=2e-3, rtol=0,
    )


# ----------------------------------------------------------------------------- bad input


def test_nan_and_inf_raise_data_error() -> None:
    old, new, labels = _data(SIZES)
    bad = new.clone()
    bad[17, 3] = float("nan")
    with pytest.raises(DataError, match="new_feats row 17"):
        refine_prototypes(old, bad, labels, len(SIZES), chunk_size=20)
    bad = old.clone()
    bad[5, 0] = float("inf")
    with pytest.raises(DataError, match="old_feats row 5"):
        refine_prototypes(bad, new, labels, len(SIZES))
    with pytest.raises(DataError, match="feats row 5"):
        class_means(bad, labels, len(SIZES), block_rows=4)
    with pytest.raises(DataError, match="feats row 5"):
        drop_means(bad.numpy(), labels, len(SIZES))


def test_shape_and_label_errors() -> None:
    old, new, labels = _data(SIZES)
    k = len(SIZES)
    with pytest.raises(DataError, match="new_feats has"):
        refine_prototypes(old, new[:-1], labels, k)
    with pytest.raises(DataError, match="labels has shape"):
        refine_prototypes(old, new, labels[:-1], k)
    with pytest.raises(DataError, match="old_feats has shape"):
        refine_prototypes(old[:, 0], new, labels, k)
    with pytest.raises(DataError, match=r"expected class ids in \[0, 13\)"):
        refine_prototypes(old, new, labels, k - 1)
    neg = labels.clone()
    neg[0] = -1
    with pytest.raises(DataError, match="labels has values"):
        class_means(old, neg, k)
    with pytest.raises(DataError, match="integer class ids"):
        class_means(old, labels.float(), k)
    with pytest.raises(DataError, match=r"classes \[14, 15\]"):
        refine_prototypes(old, new, labels, k + 2)
    with pytest.raises(ConfigError):
        refine_prototypes(old, new, labels, k, lam=1.0)
    with pytest.raises(ConfigError):
        refine_prototypes(old, new, labels, k, normalize="col")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        drop_means(old, labels, k, drop=1.0)


def test_allow_empty_gives_zero_rows() -> None:
    old, new, labels = _data(SIZES)
    k = len(SIZES) + 2
    for out in (
        class_means(old, labels, k, allow_empty=True),
        drop_means(old, labels, k, allow_empty=True),
        refine_prototypes(old, new, labels, k, allow_empty=True),
    ):
        assert torch.equal(out[-2:], torch.zeros(2, old.shape[1]))
        assert out[:-2].norm(dim=1).min() > 0


# ----------------------------------------------------------------------------- means


@pytest.mark.parametrize("normalize", [True, False])
def test_class_means_matches_loop(normalize: bool) -> None:
    old, _, labels = _data(SIZES, seed=6)
    x = old.double().numpy()
    if normalize:
        x = _unit(x)
    ref = np.stack([x[labels.numpy() == c].mean(0) for c in range(len(SIZES))])
    got = class_means(old, labels, len(SIZES), normalize=normalize, block_rows=10)
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("drop", "normalize"), [(0.1, True), (0.3, False), (0.0, True)])
def test_drop_means_matches_loop(drop: float, normalize: bool) -> None:
    old, _, labels = _data(SIZES, seed=7)
    x = old.double().numpy()
    if normalize:
        x = _unit(x)
    ref = []
    for c in range(len(SIZES)):
        rows = x[labels.numpy() == c]
        n_c = len(rows)
        keep = max(1, n_c - math.floor(drop * n_c + 1e-9))
        dist = np.linalg.norm(rows - rows.mean(0), axis=1)
        ref.append(rows[np.argsort(dist, kind="stable")[:keep]].mean(0))
    got = drop_means(old, labels, len(SIZES), drop=drop, normalize=normalize, block_rows=9)
    np.testing.assert_allclose(got.double().numpy(), np.stack(ref), atol=1e-6, rtol=0)
    if drop > 0:
        big = torch.tensor(SIZES) >= 10
        plain = class_means(old, labels, len(SIZES), normalize=normalize)
        assert (got - plain)[big].norm(dim=1).min() > 1e-4


def test_drop_means_removes_outlier() -> None:
    feats = torch.tensor([[1.0, 0.0]] * 9 + [[-1.0, 0.0]])
    labels = torch.zeros(10, dtype=torch.int64)
    torch.testing.assert_close(drop_means(feats, labels, 1)[0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(class_means(feats, labels, 1)[0], torch.tensor([0.8, 0.0]))


def test_input_dtypes_and_overflow() -> None:
    old, new, labels = _data(SIZES, seed=8)
    k = len(SIZES)
    ref = refine_prototypes(old, new, labels, k, chunk_size=50)
    for o, f in ((old.half(), new.half()), (old.double(), new.double())):
        got = refine_prototypes(o, f, labels, k, chunk_size=50)
        assert got.dtype == torch.float32
        tol = 1e-6 if o.dtype == torch.float64 else 5e-3
        torch.testing.assert_close(got, ref, atol=tol, rtol=0)
    big = old.clone()
    big[3] = 1e30
    with pytest.raises(DataError, match="old_feats row 3 has a norm that overflows"):
        refine_prototypes(big, new, labels, k)
    ok = refine_prototypes(big, new, labels, k, dtype=torch.float64)
    assert torch.isfinite(ok).all()
    with pytest.raises(DataError, match="expected native-endian"):
        class_means(old.numpy().astype(">f4"), labels, k)


def test_no_rows_with_allow_empty() -> None:
    labels = torch.zeros(0, dtype=torch.int64)
    out = refine_prototypes(torch.zeros(0, 3), torch.zeros(0, 2), labels, 2, allow_empty=True)
    assert torch.equal(out, torch.zeros(2, 3))
    assert torch.equal(drop_means(np.zeros((0, 3)), labels, 2, allow_empty=True),
                       torch.zeros(2, 3))


def test_memmap_page_release_keeps_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read unmaps the memmap's pages and every chunk is its own prefetch group; results
    must not change."""
    old, new, labels = _data(SIZES, d_old=16, d_new=16, seed=9)
    maps = []
    for name, x in (("old", old), ("new", new)):
        np.save(tmp_path / f"{name}.npy", x.numpy())
        maps.append(np.load(tmp_path / f"{name}.npy", mmap_mode="r"))
    expected = refine_prototypes(old, new, labels, len(SIZES), chunk_size=40)
    monkeypatch.setattr(rows, "_MAPPED_BUDGET_BYTES", 0)
    monkeypatch.setattr(rows, "_STAGING_BYTES", 1)  # one prefetch group per chunk
    calls = []
    real = rows._release_mapped_pages
    monkeypatch.setattr(rows, "_release_mapped_pages", lambda x: calls.append(1) or real(x))
    got = refine_prototypes(maps[0], maps[1], labels, len(SIZES), chunk_size=40)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert len(calls) > 3
    torch.testing.assert_close(
        class_means(maps[0], labels, len(SIZES), block_rows=7),
        class_means(old, labels, len(SIZES)), atol=1e-6, rtol=0,
    )


def test_large_classes_with_two_threads_match_float64() -> None:
    """Regression: torch's threaded batched LU (MKL inside torch's parallel loop) returned wrong
    solutions or invalid pivots for ~150-row systems with 2 threads; the solve must stay exact."""
    sizes = [150 + i for i in range(12)]
    old, new, labels = _data(sizes, d_old=8, d_new=16, seed=12)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = refine_prototypes(old, new, labels, len(sizes))
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    o, f, y = old.double().numpy(), new.double().numpy(), labels.numpy()
    for c, m in enumerate(sizes):
        v0, fc = _unit(o[y == c]), _unit(f[y == c])
        s = fc @ fc.T / 0.05
        np.fill_diagonal(s, -np.inf)
        e = np.exp(s - s.max(axis=1, keepdims=True))
        e /= e.sum(axis=1, keepdims=True)
        ref = (0.1 * np.linalg.solve(np.eye(m) - 0.9 * e, v0)).mean(axis=0)
        np.testing.assert_allclose(got[c].double().numpy(), ref, atol=1e-5, rtol=0)
