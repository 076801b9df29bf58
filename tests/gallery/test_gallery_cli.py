"""``bctkit gallery`` end to end on an image folder (on every backend): add with the old model, new
queries refused until a certificate allows them, then searching old items, a partial backfill,
status."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bctkit.cli import main
from bctkit.data.sources.recordio_writer import write_insightface
from bctkit.evaluation.certificate import make_certificate, write_certificate
from bctkit.features import FeatureSet
from bctkit.gallery import open_gallery
from bctkit.gallery.backends.sqlite.store import GalleryStore
from bctkit.models.store import load_model
from tests.gallery.test_backfill import tiny_model


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    for split, ids in (("gallery", 6), ("queries", 2)):
        for k in range(ids):
            folder = tmp_path / split / f"p{k}"
            folder.mkdir(parents=True)
            for j in range(3):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(folder / f"{j}.png")
    old = tiny_model(tmp_path / "old.safetensors", 8, 1)
    new = tiny_model(tmp_path / "new.safetensors", 12, 2)
    fp_old, fp_new = load_model(old).fingerprint, load_model(new).fingerprint
    labels = torch.arange(4)
    q = FeatureSet(torch.randn(4, 12), labels, {"model_fingerprint": fp_new, "compat_dims": 8})
    g = FeatureSet(torch.randn(4, 8), labels, {"model_fingerprint": fp_old})
    metrics = {"top1": {"cross": 0.6, "old_self": 0.5, "self": 0.7, "criterion": True, "update_gain": 0.5}}
    cert = make_certificate("new", q, "old", g, metrics, {"dataset": "t"})
    write_certificate(tmp_path / "new__old.json", cert)
    return tmp_path, old, new, fp_old, fp_new


def test_gallery_commands_end_to_end(setup, capsys, backend, new_store):
    root, old, new, fp_old, fp_new = setup
    store = new_store("store")
    wide = [] if backend == "sqlite" else ["--dim", "12"]  # a Milvus collection's dim is fixed
    assert main(["gallery", "create", store, *wide]) == 0
    images = ["--images", str(root / "gallery"), "--quiet"]
    assert main(["gallery", "add", store, "--model", str(old), *images]) == 0
    search = ["gallery", "search", store, "--model", str(new), "--images", str(root / "queries"), "-k", "4",
              "--quiet", "--out", str(root / "hits.json")]
    capsys.readouterr()
    assert main(search) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "certificate" in err and fp_new in err and fp_old in err
    assert main(["gallery", "certify", store, str(root / "new__old.json")]) == 0
    assert main(search) == 0
    hits = json.loads((root / "hits.json").read_text())["queries"]
    assert len(hits) == 6 and all(len(h["results"]) == 4 for h in hits)
    assert {r["version"] for h in hits for r in h["results"]} == {fp_old}
    # a second store without the certificate: a partial backfill is refused, unless explicitly allowed
    other = new_store("other")
    assert main(["gallery", "create", other, *wide]) == 0
    assert main(["gallery", "add", other, "--model", str(old), *images]) == 0
    partial = ["--model", str(new), "--images", str(root / "gallery"), "--limit", "9", "--seed", "1",
               "--quiet"]
    capsys.readouterr()
    assert main(["gallery", "backfill", other, *partial]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--unsearchable-while-partial" in err
    assert main(["gallery", "backfill", other, *partial, "--unsearchable-while-partial"]) == 0
    assert main(["gallery", "backfill", store, *partial]) == 0
    with open_gallery(store) as s:
        assert s.count(fp_new) == 9 and s.count(fp_old) == 9
        assert sorted(s.ids()) == sorted(f"p{k}/{j}.png" for k in range(6) for j in range(3))
    assert main(search) == 0
    hits = json.loads((root / "hits.json").read_text())["queries"]
    assert {r["version"] for h in hits for r in h["results"]} <= {fp_old, fp_new}
    capsys.readouterr()
    assert main(["gallery", "status", store]) == 0
    assert "18 items" in capsys.readouterr().out


def test_gallery_bad_input_is_one_line(setup, capsys):
    root, old, _, _, _ = setup
    assert main(["gallery", "add", str(root / "nowhere"), "--model", str(old), "--images", str(root)]) == 2
    assert main(["gallery", "create", str(root / "s")]) == 0
    capsys.readouterr()
    assert main(["gallery", "add", str(root / "s"), "--model", str(old), "--images", str(root / "none")]) == 2
    assert "--images" in capsys.readouterr().err


def test_gallery_add_reads_a_recordio_set(setup):
    """--images takes a RecordIO set (folder or .rec file), as bctkit extract does: the same images
    as the folder give the same vectors, the items named by record id (images are records 1..N)."""
    root, old, _, fp_old, _ = setup
    files = [root / "gallery" / f"p{k}" / f"{j}.png" for k in range(6) for j in range(3)]
    write_insightface(root / "rec", [(f.read_bytes(), k // 3) for k, f in enumerate(files)])
    sets = (("folder", root / "gallery"), ("rec", root / "rec"), ("recfile", root / "rec" / "train.rec"))
    for name, images in sets:
        assert main(["gallery", "create", str(root / f"s-{name}")]) == 0
        assert main(["gallery", "add", str(root / f"s-{name}"), "--model", str(old), "--images", str(images),
                     "--quiet"]) == 0
    with GalleryStore.open(root / "s-folder") as f, GalleryStore.open(root / "s-rec") as r, \
            GalleryStore.open(root / "s-recfile") as rf:
        rec_ids = [str(i) for i in range(1, 19)]
        assert sorted(r.ids(), key=int) == rec_ids and sorted(rf.ids(), key=int) == rec_ids
        vf, _ = f.get([f"p{k}/{j}.png" for k in range(6) for j in range(3)])
        vr, versions = r.get(rec_ids)
        vrf, _ = rf.get(rec_ids)
    assert versions == [fp_old] * 18
    np.testing.assert_array_equal(vr, vf)
    np.testing.assert_array_equal(vrf, vr)


def test_an_export_is_the_same_gallery_version_as_its_model(setup):
    """A gallery embedded by the exported TorchScript model holds the version and, to rounding, the
    vectors the bctkit model gives (serving and the gallery may use the export)."""
    root, old, _, fp_old, _ = setup
    assert main(["export", str(old), "--format", "torchscript", "--out", str(root / "export")]) == 0
    for name, model in (("a", old), ("b", root / "export")):
        assert main(["gallery", "create", str(root / name)]) == 0
        assert main(["gallery", "add", str(root / name), "--model", str(model), "--images",
                     str(root / "gallery"), "--quiet"]) == 0
    with GalleryStore.open(root / "a") as a, GalleryStore.open(root / "b") as b:
        ids = a.ids()
        assert ids == b.ids() and len(ids) == 18
        va, versions_a = a.get(ids)
        vb, versions_b = b.get(ids)
    assert versions_a == versions_b == [fp_old] * 18
    np.testing.assert_allclose(vb, va, rtol=1e-5, atol=1e-5)
