"""The packaged recipes: each runs end to end on a miniature of its data layout (files written here
from the formats' descriptions, models shrunk with --set), reading the data by the keys the recipe
documents; a recipe without its data is refused naming every key; ``bctkit recipes`` lists them."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bctkit.cli import main
from bctkit.errors import ConfigError
from bctkit.run.config import load_config, packaged_config
from bctkit.run.recipes import list_recipes, required_keys

RECIPES = ("bct-imagenet", "bct-places365", "bt2-cifar100", "bt2-imagenet", "mixbct-ms1mv3", "unibct-gldv2")
SMALL = {"arch": "r8", "width": 4, "embedding_dim": 8, "image_size": 16, "in_channels": 3}
SHRINK = [f"old.backbone={json.dumps(SMALL)}", f"new.backbone={json.dumps(SMALL)}",
          "old.train.epochs=1", "new.train.epochs=1", "old.train.batch_size=16", "new.train.batch_size=16",
          "data.transform.resize=16", "data.transform.crop=null", "data.num_workers=0",
          "evaluation.batch_size=64", "old.train.schedule={name: constant}",
          "new.train.schedule={name: constant}"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BCTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))


def image_bytes(rng: np.random.Generator, fmt: str = "JPEG", side: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side + 4, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def run_recipe(name: str, out: Path, sets: list[str]) -> dict:
    """``bctkit run NAME --set ...`` (shrunk), returning the report.json it wrote."""
    args = ["run", name, "--out", str(out), "--quiet"]
    for s in [*SHRINK, *sets]:
        args += ["--set", s]
    assert main(args) == 0
    return json.loads((out / "report.json").read_text())


def test_every_recipe_is_listed_and_refused_without_its_data(capsys):
    listed = {r.name: r for r in list_recipes()}
    assert tuple(sorted(listed)) == RECIPES
    for name, r in listed.items():
        assert r.required and r.title
        with pytest.raises(ConfigError, match="give the data this config needs: " + " ".join(
                f"--set {k}=\\.\\.\\." for k in r.required)):
            load_config(packaged_config(name))
        fill = [f"{k}=/nowhere" for k in r.required]
        assert not required_keys(load_config(packaged_config(name), fill).model_dump(mode="json"))
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(f"bctkit run {n} " in out for n in RECIPES)
    assert main(["recipes", "bt2-cifar100"]) == 0
    assert capsys.readouterr().out == packaged_config("bt2-cifar100").read_text()
    assert main(["run", "bt2-cifar100", "--out", "x"]) == 2
    assert "--set data.cifar.root=... --set data.eval.cifar.root=..." in capsys.readouterr().err


def cifar100_python(root: Path, classes: int, per: int, seed: int) -> Path:
    """cifar-100-python/{train,test}: pickled dicts (protocol 2, as Python 2 wrote them) with ``data``
    uint8 [N, 3072] (R, G, B planes) and ``fine_labels`` / ``coarse_labels``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", per), ("test", max(2, per // 2))):
        fine = np.repeat(np.arange(classes), n)
        base = rng.integers(0, 256, (classes, 3072), dtype=np.uint8)
        noisy = base[fine].astype(int) + rng.integers(-40, 40, (len(fine), 3072))
        data = np.clip(noisy, 0, 255).astype(np.uint8)
        d = {"data": data, "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
             "filenames": [f"{i}.png" for i in range(len(fine))], "batch_label": split}
        (folder / split).write_bytes(pickle.dumps(d, protocol=2))
    return root


def test_bt2_cifar100(tmp_path):
    root = cifar100_python(tmp_path / "data", classes=10, per=8, seed=0)
    rep = run_recipe("bt2-cifar100", tmp_path / "run",
                     [f"data.cifar.root={root}", f"data.eval.cifar.root={root}"])
    assert rep["allocation"]["old_classes"] == 5 and rep["allocation"]["new_classes"] == 10
    assert rep["allocation"]["classes"] == "first in dataset order"
    metrics = {(r["query_model"], r["gallery_model"], r["metric"]) for r in rep["results"]}
    assert {("bt2", "old", "top1"), ("bct", "old", "top5"), ("paragon", "paragon", "map")} <= metrics
    assert "leave-one-out" in rep["dataset"]


def imagenet(root: Path, synsets: list[str], per: int, seed: int) -> dict[str, Path]:
    """train/<synset>/*.JPEG, a flat val/ folder with LOC_val_solution.csv + LOC_synset_mapping.txt."""
    rng = np.random.default_rng(seed)
    for s in synsets:
        (root / "train" / s).mkdir(parents=True)
        for j in range(per):
            (root / "train" / s / f"{s}_{j}.JPEG").write_bytes(image_bytes(rng))
    (root / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    k = 0
    for s in reversed(synsets):  # val order is not class order
        for _ in range(3):
            k += 1
            name = f"ILSVRC2012_val_{k:08d}"
            (root / "val" / f"{name}.JPEG").write_bytes(image_bytes(rng))
            rows.append(f"{name},{s} 10 10 50 50 {s} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{s} class {s}\n" for s in sorted(synsets)))
    return {"train": root / "train", "val": root / "val", "labels": root / "LOC_val_solution.csv",
            "synsets": root / "LOC_synset_mapping.txt"}


@pytest.mark.parametrize("recipe", ["bt2-imagenet", "bct-imagenet"])
def test_imagenet_recipes(tmp_path, recipe):
    synsets = [f"n{10000 + 7 * i:08d}" for i in range(6)]
    d = imagenet(tmp_path / "in", synsets, per=6, seed=1)
    rep = run_recipe(recipe, tmp_path / "run", [
        f"data.imagefolder.root={d['train']}", f"data.eval.imagenet_val.root={d['val']}",
        f"data.eval.imagenet_val.labels={d['labels']}", f"data.eval.imagenet_val.synsets={d['synsets']}"])
    assert rep["allocation"]["old_classes"] == 3 and rep["allocation"]["new_classes"] == 6
    cross = [r for r in rep["results"] if r["gallery_model"] == "old" and r["metric"] == "top1"]
    assert {r["query_model"] for r in cross} >= {"old", "bct" if recipe == "bct-imagenet" else "bt2"}


def test_bct_places365(tmp_path):
    rng = np.random.default_rng(2)
    large, val = tmp_path / "data_large", tmp_path / "val_large"
    lines, vlines = [], []
    for c, name in enumerate(["abbey", "airfield", "alley", "arcade"]):
        (large / name[0] / name).mkdir(parents=True)
        for j in range(6):
            (large / name[0] / name / f"{j:08d}.jpg").write_bytes(image_bytes(rng))
            lines.append(f"/{name[0]}/{name}/{j:08d}.jpg {c}")
        for j in range(3):
            val.mkdir(exist_ok=True)
            f = f"Places365_val_{c * 3 + j + 1:08d}.jpg"
            (val / f).write_bytes(image_bytes(rng))
            vlines.append(f"{f} {c}")
    (tmp_path / "places365_train_standard.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "places365_val.txt").write_text("\n".join(vlines) + "\n")
    rep = run_recipe("bct-places365", tmp_path / "run", [
        f"data.list.file={tmp_path / 'places365_train_standard.txt'}", f"data.list.root={large}",
        f"data.eval.list.file={tmp_path / 'places365_val.txt'}", f"data.eval.list.root={val}"])
    assert rep["allocation"]["old_classes"] == 2
    assert {"bct", "l2"} <= {r["query_model"] for r in rep["results"]}


def gldv2_train(root: Path, landmarks: list[int], per: int, seed: int) -> Path:
    """root/train/a/b/c/<id>.jpg and root/train_clean.csv (``landmark_id,images``)."""
    rng = np.random.default_rng(seed)
    rows = ["landmark_id,images"]
    for lm in landmarks:
        ids = [f"{lm:03x}{j:x}{seed:x}abc{j}" for j in range(per)]
        for image_id in ids:
            path = root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(rng))
        rows.append(f"{lm},{' '.join(ids)}")
    (root / "train_clean.csv").write_text("\n".join(rows) + "\n")
    return root


def test_unibct_gldv2_with_its_three_test_sets(tmp_path):
    from tests.evaluation.protocols.test_gldv2 import SOLUTION
    from tests.evaluation.protocols.test_gldv2 import write_root as write_gldv2_test
    from tests.evaluation.protocols.test_revisited import write_root as write_revisited

    train = gldv2_train(tmp_path / "gldv2", [7, 19, 23, 140, 141, 300, 301, 302], per=6, seed=3)
    rox = write_revisited(tmp_path / "roxford5k")
    rpar = write_revisited(tmp_path / "rparis6k")
    (rpar / "gnd_roxford5k.pkl").rename(rpar / "gnd_rparis6k.pkl")
    gld_test = write_gldv2_test(tmp_path / "gld-test", SOLUTION)
    unibct = [f"methods.{i}.params.{k}" for i in (2, 3) for k in ("warmup_epochs=0", "rebuild_epochs=[0]")]
    rep = run_recipe("unibct-gldv2", tmp_path / "run", [
        f"data.gldv2.root={train}", "data.eval_classes=2", "data.eval_images_per_class=3", *unibct,
        "evaluation.topk=[1]",
        f"evaluation.test_sets.0.data.0={rox}", f"evaluation.test_sets.1.data.0={rpar}",
        f"evaluation.test_sets.2.data.0={gld_test}"])
    assert set(rep["test_sets"]) == {"roxford", "rparis", "gldv2"}
    for name, metric in (("roxford", "map_medium"), ("rparis", "map_hard"), ("gldv2", "map@100_private")):
        sub = json.loads((tmp_path / "run" / "test_sets" / name / "report.json").read_text())
        pairs = {(r["query_model"], r["gallery_model"]) for r in sub["results"] if r["metric"] == metric}
        assert {("unibct", "old"), ("unibct-avg", "old"), ("old", "old")} <= pairs, name
        claims = {c["query"] for c in rep["test_sets"][name]["certificates"]}
        assert claims == {"l2", "contrastive", "unibct-avg", "unibct"}


def test_mixbct_ms1mv3_with_ijbc(tmp_path):
    from bctkit.data.sources.recordio_writer import write_insightface
    from tests.data.sources.test_ijb import make_ijb

    rng = np.random.default_rng(5)
    images = [(image_bytes(rng, side=16), c) for c in range(8) for _ in range(6)]
    write_insightface(tmp_path / "ms1mv3", images)
    make_ijb(tmp_path / "IJBC")
    unibct = [f"methods.2.params.{k}" for k in ("warmup_epochs=0", "rebuild_epochs=[0]")]
    rep = run_recipe("mixbct-ms1mv3", tmp_path / "run", [
        f"data.recordio.path={tmp_path / 'ms1mv3'}", "data.eval_classes=2", "data.eval_images_per_class=3",
        "evaluation.topk=[1]",
        *unibct, f"evaluation.test_sets.0.data.0={tmp_path / 'IJBC'}", "evaluation.test_sets.0.topk=[1]"])
    sub = json.loads((tmp_path / "run" / "test_sets" / "ijbc" / "report.json").read_text())
    queries = {r["query_model"] for r in sub["results"] if r["gallery_model"] == "old"}
    assert queries >= {"mixbct", "bct", "old"}
    assert rep["allocation"]["scenario"] == "extended-data"


def test_a_truncated_cifar_file_stops_the_recipe_in_one_line(tmp_path, capsys):
    """The binary form's records are 1 coarse + 1 fine label byte and 3072 pixel bytes; a file cut
    inside a record is refused before anything trains, naming the file, exit 2."""
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    record = bytes([3, 17]) + bytes(range(256)) * 12
    (folder / "train.bin").write_bytes(record * 4 + record[:100])
    (folder / "test.bin").write_bytes(record * 2)
    code = main(["run", "bt2-cifar100", "--out", str(tmp_path / "run"), "--quiet",
                 "--set", f"data.cifar.root={tmp_path}", "--set", f"data.eval.cifar.root={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert str(folder / "train.bin") in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run" / "models").exists()
