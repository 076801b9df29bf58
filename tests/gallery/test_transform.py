"""``gallery transform`` and the uncertainty backfill order on both backends: h applied to the stored
vectors (against an independent computation), the uncertainty order (against an independent
argsort), a SIGKILLed transform resuming to the uninterrupted result bit for bit, and the refusals."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bctkit.cli import main
from bctkit.errors import ConfigError
from bctkit.gallery.backfill_plan import UNTRANSFORMED, backfill_order, plan_backfill
from bctkit.gallery.interface import create_gallery, open_gallery
from bctkit.gallery.transform import TransformRefused, transform
from bctkit.models.transformation import (
    Transformation,
    TransformationConfig,
    load_transformation,
    save_transformation,
)
from tests.gallery.conftest import state, store_string
from tests.gallery.crash import kill_at
from tests.gallery.test_search import cert

ROOT = Path(__file__).resolve().parents[2]
OLD = "0123456789abcdef"


def make_h(path: Path, old_dim: int = 8, new_dim: int = 6, side_dim: int = 0, old_fp: str = OLD,
           uncertainty: bool = True):
    """A fixed random h (BatchNorm statistics made non-trivial) saved as a transformation file."""
    torch.manual_seed(1)
    cfg = TransformationConfig(old_dim=old_dim, new_dim=new_dim, side_dim=side_dim, inner_dim=16,
                               uncertainty=uncertainty)
    net = Transformation(cfg)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    save_transformation(path, net.eval(), {"name": "h(old)", "target": "new", "old_fingerprint": old_fp,
                                           "new_fingerprint": "fedcba9876543210"})
    return load_transformation(path)


def fill(store: str, n: int = 150, other: int = 10, dim: int = 12) -> np.ndarray:
    """A gallery of ``n`` 8-d items of version OLD and ``other`` 6-d items of another version
    (interleaved), returning the old vectors in insertion order."""
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((n, 8)).astype(np.float32)
    with create_gallery(store, **({"dim": dim} if store.startswith("milvus") else {})) as g:
        g.add_version(OLD, 8, name="old")
        g.add_version("aaaaaaaaaaaaaaaa", 6, name="added-new")
        g.add([f"o{i}" for i in range(n // 2)], vec[: n // 2], OLD)
        g.add([f"x{i}" for i in range(other)], rng.standard_normal((other, 6)).astype(np.float32),
              "aaaaaaaaaaaaaaaa")
        g.add([f"o{i}" for i in range(n // 2, n)], vec[n // 2:], OLD)
    return vec


def test_transform_is_h_of_the_stored_vectors(backend, tmp_path):
    store = store_string(backend, tmp_path / "g")
    vec = fill(store)
    h = make_h(tmp_path / "h.safetensors")
    with torch.no_grad():  # independent: the network on all rows at once, float64 exp
        ref, ref_lv = h.net(torch.from_numpy(vec))
    with open_gallery(store) as g:
        res = transform(g, h, batch_size=64, progress=False)
        assert (res.transformed, res.already, res.batches, res.version) == (150, 0, 3, h.version)
        versions = g.versions()
        assert versions[h.version]["dim"] == 6 and versions[h.version]["name"] == "h(old)"
        assert versions[h.version]["count"] == 150 and versions[OLD]["count"] == 0
        got, vers = g.get([f"o{i}" for i in range(150)])
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)
        assert set(vers) == {h.version}
        assert g.find(["x0"]) == ["aaaaaaaaaaaaaaaa"]
        priors = {i: p for part in g.scan(norms=False) for i, p in zip(part[0], part[3], strict=True)}
        np.testing.assert_allclose([priors[f"o{i}"] for i in range(150)], np.exp(ref_lv.double().numpy()),
                                   rtol=1e-5)
        assert priors["x0"] == -1
        assert g.backfill_orders()[h.version] == ["transform"]
        again = transform(g, h, batch_size=64, progress=False)
        assert (again.transformed, again.already, again.batches) == (0, 150, 0)


def test_uncertainty_order_against_an_independent_argsort(backend, tmp_path):
    store = store_string(backend, tmp_path / "g")
    vec = fill(store)
    h = make_h(tmp_path / "h.safetensors")
    with torch.no_grad():  # independent: h's log sigma^2 of every old vector at once
        log_var = h.net(torch.from_numpy(vec))[1].numpy()
    with open_gallery(store) as g:
        with pytest.raises(Exception, match="holds no transformed items"):
            backfill_order(g, "fedcba9876543210", "uncertainty")
        transform(g, h, batch_size=64, progress=False)
        ids = g.ids()
        prior = dict(zip(*[sum((list(p[k]) for p in g.scan(norms=False)), []) for k in (0, 3)], strict=True))
        g.add_version("fedcba9876543210", 6, name="new")
        order = backfill_order(g, "fedcba9876543210", "uncertainty")
        # never transformed first (insertion order), then largest sigma^2 first, ties by insertion
        untransformed = [i for i in ids if prior[i] < 0]
        rest = sorted((i for i in ids if prior[i] >= 0), key=lambda i: (-prior[i], ids.index(i)))
        assert order == untransformed + rest
        assert untransformed == [f"x{i}" for i in range(10)]
        by_h = [f"o{i}" for i in np.argsort(-log_var.astype(np.float64), kind="stable")]
        assert order[10:] == by_h
        # a partial uncertainty backfill keeps each replaced item's sigma^2: the plan stays the same
        plan = plan_backfill(g, "fedcba9876543210", "uncertainty", 0, 16, limit=20)
        assert plan.priors_of(order[:2]).tolist() == [UNTRANSFORMED, UNTRANSFORMED]
        first = plan.batches[0]
        g.replace(first, np.ones((len(first), 6), np.float32), "fedcba9876543210",
                  priors=plan.priors_of(first))
        after = backfill_order(g, "fedcba9876543210", "uncertainty")
        assert after == [i for i in order if i not in set(first)]


def test_refusals_name_both_fingerprints(tmp_path):
    store = str(tmp_path / "g")
    fill(store)
    before = state(store)
    other = make_h(tmp_path / "o.safetensors", old_fp="9999999999999999")
    wide = make_h(tmp_path / "w.safetensors", old_dim=10)
    side = make_h(tmp_path / "s.safetensors", side_dim=3)
    with open_gallery(store) as g:
        with pytest.raises(TransformRefused, match=rf"transform {other.fingerprint} maps old version "
                           rf"9999999999999999 .* no item of 9999999999999999 \(its versions: old "
                           rf"\({OLD}, 150 items\)"):
            transform(g, other, progress=False)
        with pytest.raises(TransformRefused, match=rf"transform {wide.fingerprint} takes 10-d vectors of "
                           rf"{OLD}; the gallery's version {OLD} is 8-d"):
            transform(g, wide, progress=False)
        with pytest.raises(TransformRefused, match="side information"):
            transform(g, side, progress=False)
    assert state(store) == before
    # the CLI: one line, exit 2
    assert main(["gallery", "transform", store, "--transform", str(tmp_path / "o.safetensors")]) == 2
    # the old version declared but holding no item (all removed): refused, not a silent no-op
    empty = str(tmp_path / "e")
    with create_gallery(empty) as g:
        g.add_version(OLD, 8, name="old")
        h = make_h(tmp_path / "h.safetensors")
        with pytest.raises(TransformRefused, match=rf"no item of {OLD} \(its versions: old \({OLD}, 0 items"):
            transform(g, h, progress=False)


def test_no_uncertainty_no_uncertainty_order(backend, tmp_path, capsys):
    """A transformation without uncertainty keeps no sigma^2: the uncertainty order is refused on
    both backends, and status still counts its items as transformed."""
    store = store_string(backend, tmp_path / "g")
    fill(store)
    h = make_h(tmp_path / "h.safetensors", uncertainty=False)
    with open_gallery(store) as g:
        transform(g, h, batch_size=64, progress=False)
        g.add_version("fedcba9876543210", 6, name="new")
        with pytest.raises(ConfigError, match="holds only items transformed without uncertainty"):
            backfill_order(g, "fedcba9876543210", "uncertainty")
    assert main(["gallery", "status", store]) == 0
    assert "gallery: 10 added, 150 transformed, 0 re-embedded" in capsys.readouterr().out


def run_worker(store: str, h: Path, *extra: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "tests/gallery/transform_worker.py"), store, str(h),
                          *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def priors_of(store: str) -> list:
    with open_gallery(store) as g:
        return [list(zip(p[0], p[1], p[3].tolist(), strict=True)) for p in g.scan(norms=False)]


@pytest.mark.parametrize(("backend", "stops", "extra"), [
    ("sqlite", ["replace committed 1", "replace written 2"], ()),
    # inside the first batch (64 rows written in 4 upserts of 20)
    ("milvus-lite", ["replace written 3"], ("--write-rows", "20")),
])
def test_killed_transform_resumes_bit_for_bit(backend, stops, extra, tmp_path):
    if backend == "milvus-lite":
        pytest.importorskip("milvus_lite")
    h = tmp_path / "h.safetensors"
    make_h(h)
    base = tmp_path / "base"
    fill(store_string(backend, base))
    copies = {}
    for name in ("ref", "killed"):
        if backend == "sqlite":
            shutil.copytree(base, tmp_path / name)
        else:
            shutil.copytree(Path(f"{base}.db"), tmp_path / f"{name}.db")
        copies[name] = store_string(backend, tmp_path / name)
    assert run_worker(copies["ref"], h, *extra).split() == ["finished", "150", "0", "3"]
    for stop in stops:
        kill_at([sys.executable, str(ROOT / "tests/gallery/transform_worker.py"), copies["killed"], str(h),
                 *extra], stop, tmp_path / "scratch")
    done = run_worker(copies["killed"], h, *extra).split()
    assert done[0] == "finished" and 0 < int(done[2]) < 150
    assert state(copies["killed"])[1:] == state(copies["ref"])[1:]
    assert priors_of(copies["killed"]) == priors_of(copies["ref"])


def test_cli_transform_status_and_forecast(tmp_path, capsys):
    from bctkit.gallery.forecast import expected_accuracy

    store = str(tmp_path / "g")
    fill(store)
    h = make_h(tmp_path / "h.safetensors")
    path = str(tmp_path / "h.safetensors")
    assert main(["gallery", "transform", store, "--transform", path, "--quiet"]) == 0
    assert main(["gallery", "status", store]) == 0
    out = capsys.readouterr().out
    assert f"gallery: transformed 150 items in 1 batches (0 done before) into {h.version}" in out
    assert "gallery: 10 added, 150 transformed, 0 re-embedded" in out
    with open_gallery(store) as g:
        g.add_version("fedcba9876543210", 6, name="new")
        g.replace(["o0", "o1"], np.ones((2, 6), np.float32), "fedcba9876543210")
        g.record_backfill_order("fedcba9876543210", "uncertainty")
        curve = {"fractions": [0.0, 1.0], "values": [0.4, 0.8]}
        models = {"h(old)": {"fingerprint": h.version}, "new": {"fingerprint": "fedcba9876543210"}}
        report = {"models": models,
                  "transforms": {"h(old)": {"target": "new"}},
                  "backfill": {"h(old)": {"uncertainty": curve}, "new": {"random": curve}}}
        assert expected_accuracy(g, report)[0].startswith("new: 1.2 % of items backfilled; the store refuses")
        for version, dim in ((h.version, 6), ("aaaaaaaaaaaaaaaa", 6)):
            g.add_certificate(cert("fedcba9876543210", 6, version, dim, [0, 6], [0, 6]))
        lines = expected_accuracy(g, report)
    # the transformed items are no backfill's share; the new version's line reads h(old)'s curves
    # ("new" has no uncertainty curve of its own): 0.4 + 2 / 160 * 0.4
    assert lines == ["new: 1.2 % of items backfilled; expected top-1 of new queries 40.50 % (the report's "
                     "uncertainty-order backfill curve from h(old) at that share)"]


def test_uncertainty_after_another_order_is_refused_where_restarts_read_priors(backend, tmp_path):
    """On Milvus a restart ranks the items already done by their priors: after a random or benefit
    backfill to the version those are vector norms, so the uncertainty order is refused there; the
    SQLite store plans only the items still to do and takes it."""
    store = store_string(backend, tmp_path / "g")
    fill(store)
    with open_gallery(store) as g:
        transform(g, make_h(tmp_path / "h.safetensors"), batch_size=64, progress=False)
        g.add_version("fedcba9876543210", 6, name="new")
        g.record_backfill_order("fedcba9876543210", "random")
        if backend == "sqlite":
            assert len(backfill_order(g, "fedcba9876543210", "uncertainty")) == 160
        else:
            with pytest.raises(Exception, match="was backfilled to fedcba9876543210 in order random"):
                backfill_order(g, "fedcba9876543210", "uncertainty")
