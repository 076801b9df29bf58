"""Upgrade mode end to end: a production old model from a checkpoint (random iresnet18 weights in
arcface_torch's layout + a classifier) or only its features, on a tiny image folder."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bctkit.cli import main
from bctkit.data.sources import ImageFolderSource
from bctkit.errors import ConfigError
from bctkit.features import load_features
from bctkit.models.config import BackboneConfig
from bctkit.models.factory import build_backbone
from bctkit.models.store import fingerprint, load_model
from bctkit.run.config import load_config
from bctkit.run.launch import run_pipeline, run_scenarios
from tests.data.sources.conftest import encoded_images, write_folder

TRAIN_IDS, EVAL_IDS, PER, DIM = 10, 4, 5, 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Training and evaluation image folders (20 x 24, RGB and grey), an iresnet18 state dict saved
    with torch.save as arcface_torch does, a 12-row classifier and a map naming 6 training classes."""
    root = tmp_path_factory.mktemp("upgrade")
    write_folder(root / "train", encoded_images(TRAIN_IDS, PER, size=(20, 24), seed=1))
    write_folder(root / "eval", encoded_images(EVAL_IDS, PER, size=(20, 24), seed=2),
                 names=[f"person{i}" for i in range(EVAL_IDS)])
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(arch="iresnet18", embedding_dim=DIM))
    with torch.no_grad():  # non-trivial BN statistics, so a wrong layout or preprocessing shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), root / "backbone.pth")
    np.save(root / "classifier.npy", np.random.default_rng(3).standard_normal((12, DIM)).astype(np.float32))
    (root / "map.json").write_text(json.dumps({f"id{k:02d}": 11 - k for k in range(6)}))
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BCTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))


def tree(files, old: dict, methods: list[dict], **extra) -> dict:
    return {
        "data": {"dataset": "imagefolder", "imagefolder": {"root": str(files / "train")},
                 "eval": {"dataset": "imagefolder", "imagefolder": {"root": str(files / "eval")}},
                 "transform": {"color": "grey", "resize": 16}, "num_workers": 0},
        "old": {"backbone": {"arch": "iresnet18", "embedding_dim": DIM}, **old},
        "new": {"backbone": {"arch": "r8", "width": 4, "embedding_dim": DIM, "image_size": 16},
                "train": {"epochs": 2, "batch_size": 16, "schedule": {"name": "constant"}}},
        "methods": methods,
        "evaluation": {"fars": [0.1], "topk": [1], "backfill": False},
        "paragon": False,
        **extra,
    }


def checkpoint_old(files) -> dict:
    return {"source": "checkpoint", "weights": str(files / "backbone.pth"),
            "transform": {"color": "rgb", "resize": 112},
            "classifier": {"weights": str(files / "classifier.npy"), "label_map": str(files / "map.json")}}


def reference_features(files, folder: str) -> np.ndarray:
    """The old network by hand: the saved state dict in a freshly built iresnet18, each image opened
    with Pillow, converted to RGB, resized to 112 x 112 and scaled to [-1, 1]."""
    net = build_backbone(BackboneConfig(arch="iresnet18", embedding_dim=DIM))
    net.load_state_dict(torch.load(files / "backbone.pth", weights_only=True))
    net.eval()
    src = ImageFolderSource(files / folder)
    rows = []
    for i in range(len(src)):
        img = Image.open(files / folder / src.key(i)).convert("RGB")
        img = img.resize((112, 112), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
        with torch.no_grad():
            rows.append(net((x - 0.5) / 0.5)[0].numpy())
    return np.stack(rows)


def test_checkpoint_upgrade_end_to_end(files, tmp_path, capsys):
    methods = [{"method": "bct"}, {"method": "l2"}]
    cfg = load_config_tree(tree(files, checkpoint_old(files), methods), tmp_path)
    report = run_pipeline(cfg, tmp_path / "run", progress=False)
    log = capsys.readouterr().err
    assert "[old] imported" in log and "[upgrade] the new models train on all 50 training images" in log
    assert "6 of them in the old classifier" in log and "[old] training" not in log
    assert set(report["models"]) == {"old", "bct", "l2"}
    old = load_model(tmp_path / "run" / "models" / "old" / "model.safetensors")
    net = build_backbone(BackboneConfig(arch="iresnet18", embedding_dim=DIM))
    net.load_state_dict(torch.load(files / "backbone.pth", weights_only=True))
    assert old.fingerprint == fingerprint(net) == report["models"]["old"]["fingerprint"]
    assert old.meta["source"] == "checkpoint" and old.meta["preprocessing"]["input"] == [3, 112, 112]
    assert torch.equal(old.head.weight, torch.from_numpy(np.load(files / "classifier.npy")))
    got = load_features(tmp_path / "run" / "features" / "old.safetensors").feats.numpy()
    ref = reference_features(files, "eval")  # random weights: values of order 1e7
    assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max()
    new = load_features(tmp_path / "run" / "features" / "bct.safetensors")
    assert new.feats.shape == (EVAL_IDS * PER, DIM)
    assert any(r["query_model"] == "bct" and r["gallery_model"] == "old" for r in report["results"])
    # random old weights: the claims fail, and their diagnosis compares the models on the training
    # images too, split by the 6 classes (of 10) the old classifier knew
    assert [d["query"] for d in report["diagnosis"]] == ["bct", "l2"]
    for d in report["diagnosis"]:
        assert (d["train"]["images"], d["train"]["known_images"]) == (TRAIN_IDS * PER, 6 * PER)
    run_pipeline(cfg, tmp_path / "run", resume=True, progress=False)
    assert "[bct] reusing finished model" in capsys.readouterr().err


def load_config_tree(data: dict, tmp_path) -> object:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def given_files(files, tmp_path) -> dict:
    """Old features of the training images in the data's order (.npy) and of the evaluation images
    keyed by path in shuffled order (.npz)."""
    rng = np.random.default_rng(5)
    train = ImageFolderSource(files / "train")
    labels = train.labels
    centres = rng.standard_normal((TRAIN_IDS, DIM)).astype(np.float32)
    feats = centres[labels] + 0.3 * rng.standard_normal((len(train), DIM)).astype(np.float32)
    np.save(tmp_path / "old_train.npy", feats)
    ev = ImageFolderSource(files / "eval")
    ev_feats = rng.standard_normal((len(ev), DIM)).astype(np.float32)
    perm = rng.permutation(len(ev))
    keys = np.array([ev.key(int(i)) for i in perm])
    np.savez(tmp_path / "old_eval.npz", features=ev_feats[perm], keys=keys)
    return {"source": "features", "features": {"train": str(tmp_path / "old_train.npy"),
                                               "eval": str(tmp_path / "old_eval.npz")}}, ev_feats


def test_features_only_upgrade_trains_the_methods_that_need_only_features(files, tmp_path):
    old, ev_feats = given_files(files, tmp_path)
    methods = [{"method": "l2"}, {"method": "bct", "params": {"new_classes": "synthesize_all"}},
               {"method": "unibct", "params": {"warmup_epochs": 1}}, {"method": "mixbct"},
               {"method": "contrastive"}, {"method": "bt2"}]
    cfg = load_config_tree(tree(files, old, methods, paragon=True), tmp_path)
    report = run_pipeline(cfg, tmp_path / "run", progress=False)
    assert set(report["models"]) == {"old", "paragon", "l2", "bct", "unibct", "mixbct", "contrastive", "bt2"}
    assert report["models"]["old"]["fingerprint"].startswith("features:")
    got = load_features(tmp_path / "run" / "features" / "old.safetensors").feats.numpy()
    assert np.array_equal(got, ev_feats)
    assert not (tmp_path / "run" / "models" / "old").exists()


@pytest.mark.parametrize("method,match", [
    ({"method": "bct"}, r"methods.0: bct needs the old model's classifier; give .*synthesize_all"),
    ({"method": "lwf"}, r"methods.0: lwf needs the old model's classifier"),
])
def test_methods_that_need_the_classifier_are_refused_without_one(files, tmp_path, method, match):
    old, _ = given_files(files, tmp_path)
    with pytest.raises(ConfigError, match=match):
        load_config_tree(tree(files, old, [method]), tmp_path)


@pytest.mark.parametrize("extra,match", [
    ({"evaluation": {"flip": True}}, r"evaluation.flip: the flip test needs the old network"),
    ({"cache": {"flip": True}}, r"cache.flip: the flip test needs the old network"),
    ({"allocation": {"scenario": "open-class"}}, r"allocation: old.source=features .*no old/new re-split"),
    ({"chain": [{"method": "l2", "ratio": 0.5}]}, r"chain.0.ratio: old.source=features"),
    ({"methods": [{"method": "bt2"}]}, r"methods.0: bt2 learns from the paragon's features; set paragon"),
])
def test_conflicting_options_are_load_time_errors(files, tmp_path, extra, match):
    old, _ = given_files(files, tmp_path)
    data = tree(files, old, [{"method": "l2"}])
    data.update({k: ({**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v)
                 for k, v in extra.items()})
    with pytest.raises(ConfigError, match=match):
        load_config_tree(data, tmp_path)


@pytest.mark.parametrize("old,match", [
    ({"source": "checkpoint"}, r"old.source=checkpoint needs old.weights"),
    ({"source": "features"}, r"old.source=features needs old.features.train and old.features.eval"),
    ({"weights": "w.pth"}, r"old.weights does not apply to old.source=train"),
    ({"source": "features", "weights": "w.pth", "features": {"train": "a", "eval": "b"}},
     r"old.weights does not apply to old.source=features"),
])
def test_old_source_options_are_checked(files, tmp_path, old, match):
    with pytest.raises(ConfigError, match=match):
        load_config_tree(tree(files, old, [{"method": "l2"}]), tmp_path)


def test_a_trained_old_model_dumps_as_before(tmp_path):
    dump = load_config(None).model_dump(mode="json")
    assert set(dump["old"]) == {"backbone", "head", "train"} and "paragon" not in dump


def test_bad_checkpoints_stop_before_training(files, tmp_path):
    old = checkpoint_old(files)
    sd = torch.load(files / "backbone.pth", weights_only=True)
    del sd["fc.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    cfg = load_config_tree(tree(files, {**old, "weights": str(tmp_path / "partial.pth")}, [{"method": "l2"}]),
                           tmp_path)
    with pytest.raises(Exception, match=r"partial.pth: .*missing.*fc.weight"):
        run_pipeline(cfg, tmp_path / "a", progress=False)
    cfg = load_config_tree(tree(files, {**old, "transform": {"color": "grey", "resize": 112}},
                                [{"method": "l2"}]), tmp_path)
    with pytest.raises(ConfigError, match=r"old.backbone takes 3x112x112 images .* gives 1x112x112"):
        run_pipeline(cfg, tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "models").exists()


def test_no_scenarios_and_no_reused_old_in_upgrade_mode(files, tmp_path):
    old, _ = given_files(files, tmp_path)
    cfg = load_config_tree(tree(files, old, [{"method": "l2"}]), tmp_path)
    with pytest.raises(ConfigError, match=r"--scenarios: old.source=features .*no allocations"):
        run_scenarios(cfg, tmp_path / "s", ["extended-data"], progress=False)
    with pytest.raises(ConfigError, match=r"--reuse-old-from: old.source=features already gives"):
        run_pipeline(cfg, tmp_path / "r", reuse_old_from=tmp_path, progress=False)


def test_cli_upgrade_error_is_one_line(files, tmp_path, capsys):
    old, _ = given_files(files, tmp_path)
    np.save(tmp_path / "old_train.npy", np.zeros((3, DIM), np.float32))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree(files, old, [{"method": "l2"}])))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("bctkit: error: ")
    assert "old_train.npy: 3 rows, but the training data has 50 images" in last


def production_net(embedding_dim: int, in_channels: int) -> torch.nn.Module:
    """A user's own embedding network (``python:tests.run.test_upgrade:production_net``)."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, embedding_dim))


def test_a_users_own_network_as_the_old_model(files, tmp_path):
    """``python:<module>:<factory>`` old model: its plain state dict (no bctkit prefix) loads."""
    torch.manual_seed(1)
    net = production_net(DIM, 3)
    torch.save(net.state_dict(), tmp_path / "mine.pth")
    arch = "python:tests.run.test_upgrade:production_net"
    old = {"source": "checkpoint", "weights": str(tmp_path / "mine.pth"),
           "transform": {"color": "rgb", "resize": 48},
           "backbone": {"arch": arch, "embedding_dim": DIM, "image_size": 48}}
    data = tree(files, {}, [{"method": "l2"}])
    data["old"] = old
    report = run_pipeline(load_config_tree(data, tmp_path), tmp_path / "run", progress=False)
    got = load_features(tmp_path / "run" / "features" / "old.safetensors").feats
    src = ImageFolderSource(files / "eval")
    imgs = [Image.open(files / "eval" / src.key(i)).convert("RGB").resize((48, 48), Image.Resampling.BILINEAR)
            for i in range(len(src))]
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in imgs])
    x = x / 127.5 - 1.0
    with torch.no_grad():
        assert torch.allclose(got, net.eval()(x), atol=1e-5)
    assert set(report["models"]) == {"old", "l2"}



@pytest.mark.parametrize("kind", ["checkpoint", "features"])
def test_upgrade_with_a_seeded_test_split(files, tmp_path, capsys, kind):
    """No data.eval: the split holds out 3 of the 10 training folders, so the training classes' ids
    have gaps. The identity map of a 10-row classifier (one row per folder) is accepted and gives
    each of the 7 training classes its folder's row; features mode without a classifier trains."""
    data = tree(files, {}, [{"method": "l2"}])
    del data["data"]["eval"]
    data["data"].update({"eval_classes": 3, "eval_images_per_class": PER})
    if kind == "checkpoint":
        np.save(tmp_path / "fc10.npy", np.random.default_rng(4).standard_normal((10, DIM)).astype(np.float32))
        data["old"].update({**checkpoint_old(files), "classifier": {"weights": str(tmp_path / "fc10.npy"),
                                                                    "label_map": "identity"}})
        data["methods"] = [{"method": "bct"}]
    else:
        src = ImageFolderSource(files / "train")
        feats = np.random.default_rng(6).standard_normal((len(src), DIM)).astype(np.float32)
        np.savez(tmp_path / "old.npz", features=feats, keys=np.array([src.key(i) for i in range(len(src))]))
        data["old"].update({"source": "features", "features": {"train": str(tmp_path / "old.npz"),
                                                               "eval": str(tmp_path / "old.npz")}})
        data["methods"] = [{"method": "l2"}, {"method": "unibct", "params": {"warmup_epochs": 1}}]
    report = run_pipeline(load_config_tree(data, tmp_path), tmp_path / "run", progress=False)
    how = report["allocation"]
    assert (how["new_classes"], how["new_images"]) == (7, 35)
    for d in report["diagnosis"]:  # given features: their rows of the training sample
        assert d["train"]["unseen_images"] == (0 if kind == "checkpoint" else 35)
    assert how["shared_classes"] == (7 if kind == "checkpoint" else 0)
    assert set(report["models"]) == {"old", *(m["method"] for m in data["methods"])}
