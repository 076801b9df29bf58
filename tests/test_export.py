"""bctkit export: ONNX / TorchScript / safetensors of the embedding network, each checked against the
bctkit model (also in a Python without bctkit), the card's fields and report, and bad input."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bctkit.cli import main
from bctkit.errors import BctkitError, ConfigError, FileFormatError
from bctkit.evaluation.analysis import compatibility_summary
from bctkit.export import export_model
from bctkit.models.config import BackboneConfig, BT2Layout
from bctkit.models.factory import build_backbone
from bctkit.models.heads import HeadConfig, build_head
from bctkit.models.store import LoadedModel, fingerprint, load_model, save_model
from bctkit.storage import save_tensors, write_json

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnx / onnxruntime not installed")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
PRE = {"color": "rgb", "resize": [20, 20], "crop": [16, 16], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
       "input": [3, 16, 16]}


def _model(path: Path, name: str = "new", bt2: BT2Layout | None = None, seed: int = 0, **meta) -> Path:
    """A tiny untrained model (r8, width 4, 3 x 16 x 16, 8-d) with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    cfg = BackboneConfig(arch="r8", width=4, in_channels=3, image_size=16, embedding_dim=8, bt2=bt2)
    net = build_backbone(cfg).train()
    with torch.no_grad():
        net(torch.randn(16, 3, 16, 16) * 2 + 0.3)
    hcfg = HeadConfig(type="arcface")
    head = build_head(hcfg, cfg.embedding_dim, 5)
    full = {"name": name, "method": "bct", "params": {"kd": False}, "preprocessing": PRE, "compat_dims": None,
            "compat_prefixes": [], "layout": None, "compatible_with": "old", "run_id": "r1", **meta}
    save_model(path, net.eval(), head, hcfg, full)
    return path


def _images(n: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return _model(tmp_path / "m" / "model.safetensors")


@needs_ort
def test_onnx_matches_pytorch(model: Path, tmp_path: Path) -> None:
    import onnxruntime

    files = export_model(model, "onnx", tmp_path / "onnx")
    card = json.loads(files.card.read_text())
    session = onnxruntime.InferenceSession(str(files.file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert session.get_inputs()[0].shape[1:] == [3, 16, 16]
    x = _images(7)
    got = session.run(["embedding"], {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = load_model(model).backbone(x).numpy()
    assert got.shape == (7, 8)
    assert np.abs(got - ref).max() < 1e-4
    assert card["exports"]["onnx"]["check"]["max_abs_diff"] <= 1e-4


def test_exports_load_without_bctkit(model: Path, tmp_path: Path) -> None:
    """TorchScript (and ONNX when installed) load in a Python where bctkit cannot be imported, and
    compute the bctkit model's embeddings; both exports share one folder and one card."""
    out = tmp_path / "both"
    formats = ["torchscript", "onnx"] if HAS_ORT else ["torchscript"]
    for fmt in formats:
        export_model(model, fmt, out)
    x = _images(6)
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        sys.path.append({str(Path(torch.__file__).parents[1])!r})
        assert importlib.util.find_spec("bctkit") is None, "bctkit is importable"
        import numpy as np, torch
        x = np.load({str(tmp_path / "x.npy")!r})
        out = {{"torchscript": torch.jit.load({str(out / "model.pt")!r})(torch.from_numpy(x))
                .detach().numpy().tolist()}}
        if {HAS_ORT!r}:
            import onnxruntime
            s = onnxruntime.InferenceSession({str(out / "model.onnx")!r}, providers=["CPUExecutionProvider"])
            out["onnx"] = s.run(["embedding"], {{"input": x}})[0].tolist()
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    with torch.no_grad():
        ref = load_model(model).backbone(x).numpy()
    for fmt in formats:
        assert np.abs(np.array(got[fmt]) - ref).max() < 1e-4, fmt
    card = json.loads((out / "card.json").read_text())
    assert sorted(card["exports"]) == sorted(formats)
    assert card["exports"]["torchscript"]["how"].startswith("scripted")


def test_safetensors_round_trip_is_exact(model: Path, tmp_path: Path) -> None:
    files = export_model(model, "safetensors", tmp_path / "st")
    card = json.loads(files.card.read_text())
    tensors = load_file(str(files.file))
    loaded = load_model(model)
    assert set(tensors) == set(loaded.backbone.state_dict())
    assert not any(k.startswith(("backbone.", "head.")) for k in tensors)
    net = build_backbone(BackboneConfig(**card["architecture"]["config"])).eval()
    net.load_state_dict(tensors)
    assert fingerprint(net) == loaded.fingerprint
    x = _images(3)
    with torch.no_grad():
        assert torch.equal(net(x), loaded.backbone(x))


def test_bt2_model_exports_its_stored_embedding(tmp_path: Path) -> None:
    layout = {"bct": [0, 8], "added": [8, 12], "self_test": [0, 12], "cross_test": [0, 8], "f_dim": 8,
              "C": 2.0}
    path = _model(tmp_path / "b" / "model.safetensors", bt2=BT2Layout(old_dim=8, k=4), method="bt2",
                  compat_dims=8, compat_prefixes=[8], layout=layout)
    loaded = load_model(path)
    x = _images(4)
    with torch.no_grad():
        ref = loaded.backbone(x)
    assert ref.shape == (4, 12)
    files = export_model(path, "torchscript", tmp_path / "ts")
    with torch.no_grad():
        got = torch.jit.load(str(files.file))(x)
    assert (got - ref).abs().max() < 1e-4
    card = json.loads(files.card.read_text())
    assert card["embedding"]["dim"] == 12 and card["embedding"]["layout"] == layout
    assert card["compatibility"]["compat_dims"] == 8 and card["compatibility"]["compat_prefixes"] == [8]
    assert card["compatibility"]["ancestors"] == [{"name": "old", "dim": 8, "query_dims": [0, 8]}]
    if HAS_ORT:
        import onnxruntime

        files = export_model(path, "onnx", tmp_path / "onnx")
        session = onnxruntime.InferenceSession(str(files.file), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": x.numpy()})[0]
        assert np.abs(got - ref.numpy()).max() < 1e-4
    files = export_model(path, "safetensors", tmp_path / "st")
    net = build_backbone(BackboneConfig(**card["architecture"]["config"])).eval()
    net.load_state_dict(load_file(str(files.file)))
    with torch.no_grad():
        assert torch.equal(net(x), ref)


def test_card_fields(model: Path, tmp_path: Path) -> None:
    files = export_model(model, "torchscript", tmp_path / "ts")
    card = json.loads(files.card.read_text())
    loaded = load_model(model)
    assert (card["card_format"], card["card_version"]) == ("bctkit-export-card", 1)
    assert card["architecture"]["config"] == loaded.meta["backbone"]
    inp = card["input"]
    assert inp["shape"] == ["batch", 3, 16, 16] and inp["dtype"] == "float32" and inp["layout"] == "NCHW"
    assert inp["mean"] == PRE["mean"] and inp["std"] == PRE["std"] and inp["channel_order"] == "R, G, B"
    assert (inp["resize"], inp["crop"], inp["recorded"]) == ([20, 20], [16, 16], True)
    assert card["embedding"]["dim"] == 8 and card["embedding"]["layout"] is None
    assert card["model"]["fingerprint"] == loaded.fingerprint
    assert card["model"]["sha256"] == _sha(model)
    assert (card["model"]["method"], card["model"]["params"]) == ("bct", {"kd": False})
    entry = card["exports"]["torchscript"]
    assert entry["sha256"] == _sha(files.file) and entry["file"] == "model.pt"
    assert entry["check"]["max_abs_diff"] <= 1e-4
    assert card["compatibility"]["compatible_with"] == "old"
    assert card["evaluation"]["reports"] == [] and "no report found" in card["evaluation"]["note"]


def test_card_reads_the_run_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _model(run / "models" / "old" / "model.safetensors", name="old", seed=1, method=None, params=None,
           compatible_with=None)
    path = _model(run / "models" / "new" / "model.safetensors")
    fp = load_model(path).fingerprint
    values = {("old", "old"): 0.5, ("new", "old"): 0.6, ("new", "new"): 0.8, ("paragon", "paragon"): 0.9,
              ("paragon", "old"): 0.1}
    records = [{"query_model": q, "gallery_model": g, "metric": "top1", "value": v, "n": 10, "protocol": "p"}
               for (q, g), v in values.items()]
    names = ["old", "paragon", "new"]
    models = {"old": {"fingerprint": "x"}, "paragon": {"fingerprint": "y"}, "new": {"fingerprint": fp}}
    report = {"models": models, "results": records, "compatibility": compatibility_summary(records, names),
              "config": {"evaluation": {"flip": True}}, "dataset": "synthetic"}
    write_json(run / "report.json", report)
    write_json(run / "validation" / "report.json", {**report, "models": {"new": {"fingerprint": "stale"}}})
    card = json.loads(export_model(path, "safetensors", tmp_path / "st").card.read_text())
    test, validation = card["evaluation"]["reports"]
    assert test["split"] == "test" and test["flip_test"] is True
    top1 = test["criterion"]["top1"]
    assert (top1["cross"], top1["self"], top1["old_self"], top1["criterion"]) == (0.6, 0.8, 0.5, True)
    assert top1["update_gain"] == pytest.approx((0.6 - 0.5) / (0.9 - 0.5))
    pairs = {(r["query_model"], r["gallery_model"]) for r in test["results"]}
    assert pairs == {("new", "old"), ("new", "new")}
    assert validation["split"] == "validation" and "another version" in validation["note"]
    assert "results" not in validation
    assert card["compatibility"]["ancestors"] == [{"name": "old", "dim": 8, "query_dims": [0, 8]}]


def _failed_run(tmp_path: Path, certificate: bool) -> tuple[Path, Path]:
    """A run whose model 'new' failed its criterion (top1 cross 0.4 <= old self 0.5), with or without
    its certificate; (model file, report file)."""
    run = tmp_path / "run"
    _model(run / "models" / "old" / "model.safetensors", name="old", seed=1, method=None, params=None,
           compatible_with=None)
    path = _model(run / "models" / "new" / "model.safetensors")
    fp = load_model(path).fingerprint
    values = {("old", "old"): 0.5, ("new", "old"): 0.4, ("new", "new"): 0.8}
    records = [{"query_model": q, "gallery_model": g, "metric": m, "value": v, "n": 10, "protocol": "p"}
               for (q, g), v in values.items() for m in ("top1", "top5")]
    records[3]["value"] = 0.9  # top5 cross passes: the criterion is the headline top1
    report = {"models": {"old": {"fingerprint": "x"}, "new": {"fingerprint": fp}}, "results": records,
              "compatibility": compatibility_summary(records, ["old", "new"]), "headline": ["top1"]}
    if certificate:
        cert = {"query": {"name": "new", "fingerprint": fp}, "gallery": {"name": "old", "fingerprint": "x"},
                "criterion": {"metric": "top1", "cross": 0.4, "old_self": 0.5, "passed": False},
                "passed": False}
        write_json(run / "certificates" / "new__old.json", cert)
        report["certificates"] = ["certificates/new__old.json"]
    write_json(run / "report.json", report)
    return path, run / "report.json"


@pytest.mark.parametrize("certificate", [True, False])
def test_export_of_a_failed_model_says_so_and_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    certificate: bool) -> None:
    path, report = _failed_run(tmp_path, certificate)
    assert main(["export", str(path), "--format", "safetensors", "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("bctkit: warning:") and "criterion failed" in err
    card = json.loads((tmp_path / "o" / "card.json").read_text())
    compat = card["compatibility"]
    source = report.parent / "certificates" / "new__old.json" if certificate else report
    assert compat["criterion"] == {"passed": False, "metric": "top1", "cross": 0.4, "old_self": 0.5,
                                   "source": str(source)}
    assert compat["compatible_with"] is None and compat["ancestors"] == []
    assert compat["trained_against"] == "old"
    assert "must not search" in compat["how"] and "query_dims" not in compat["how"]


def test_export_of_a_passed_model_does_not_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, report = _failed_run(tmp_path, certificate=False)
    rep = json.loads(report.read_text())
    rep["compatibility"]["new"]["top1"]["criterion"] = True
    write_json(report, rep)
    assert main(["export", str(path), "--format", "safetensors", "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().err == ""
    compat = json.loads((tmp_path / "o" / "card.json").read_text())["compatibility"]
    assert compat["compatible_with"] == "old" and compat["criterion"]["passed"] is True
    assert "query_dims" in compat["how"]


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript"])
def test_cli_export(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    assert main(["export", str(model.parent), "--format", fmt, "--out", str(tmp_path / "o")]) == 0
    assert "card.json" in capsys.readouterr().out


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bctkit: error:") and "\n" not in err
    return err


def test_bad_inputs(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    out = str(tmp_path / "o")
    assert "not a readable safetensors" in _cli_error(capsys, str(text), "--format", "onnx", "--out", out)
    feats = tmp_path / "feats.safetensors"
    save_tensors(feats, {"feats": torch.zeros(2, 3)}, {"model": "x"})
    assert "not a bctkit model" in _cli_error(capsys, str(feats), "--format", "onnx", "--out", out)
    assert "unknown" in _cli_error(capsys, str(model), "--format", "tflite", "--out", out)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "output folder" in _cli_error(capsys, str(model), "--format", "safetensors", "--out",
                                         str(blocker / "sub"))
    named_like_export = _model(tmp_path / "same" / "embedding.safetensors")
    with pytest.raises(ConfigError, match="replace the model file"):
        export_model(named_like_export, "safetensors", named_like_export.parent)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(FileFormatError, match="not writable"):
            export_model(model, "safetensors", locked)


def test_missing_onnx_names_the_extra(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BctkitError, match=r"pip install bctkit\[onnx\]"):
        export_model(model, "onnx", tmp_path / "o")
    assert not (tmp_path / "o" / "model.onnx").exists()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_that_does_not_reproduce_the_model_is_refused(
        model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    if fmt == "onnx" and not HAS_ORT:
        pytest.skip("onnx / onnxruntime not installed")
    import bctkit.export as export

    original = export.embedding_network

    def perturbed(loaded: LoadedModel) -> torch.nn.Module:
        net = original(loaded)
        with torch.no_grad():
            net.fc.bias.add_(0.01)
        return net

    monkeypatch.setattr(export, "embedding_network", perturbed)
    with pytest.raises(FileFormatError, match="differ from PyTorch's"):
        export_model(model, fmt, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing written, not even the folder


def test_iresnet18_exports(tmp_path: Path) -> None:
    """arcface_torch's IResNet-18 (112 x 112, BatchNorm statistics of one random batch, so that its
    embeddings have the scale of a trained model's) scripts and exports to ONNX within 1e-4."""
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(arch="iresnet18", embedding_dim=32))
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # the running statistics become exactly this batch's
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 112, 112) * 2 - 1)
    path = tmp_path / "iresnet" / "model.safetensors"
    save_model(path, net.eval(), None, HeadConfig(), {"name": "iresnet"})
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        ref = load_model(path).backbone(x)
    bound = 1e-4 * max(1.0, float(ref.abs().max()))
    assert ref.abs().max() < 100
    files = export_model(path, "torchscript", tmp_path / "out")
    assert json.loads(files.card.read_text())["exports"]["torchscript"]["how"].startswith("scripted")
    with torch.no_grad():
        assert (torch.jit.load(str(files.file))(x) - ref).abs().max() < bound
    if HAS_ORT:
        import onnxruntime

        files = export_model(path, "onnx", tmp_path / "out")
        session = onnxruntime.InferenceSession(str(files.file), providers=["CPUExecutionProvider"])
        got = session.run(["embedding"], {"input": x.numpy()})[0]
        assert np.abs(got - ref.numpy()).max() < bound


def test_folder_without_a_model_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m").mkdir()
    err = _cli_error(capsys, str(tmp_path / "m"), "--format", "safetensors", "--out", str(tmp_path / "o"))
    assert "holds no model.safetensors" in err and not (tmp_path / "o").exists()


def test_a_full_disk_leaves_no_output_folder(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(path: Path, *_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("bctkit.export.save_tensors", no_space)
    err = _cli_error(capsys, str(model), "--format", "safetensors", "--out", str(tmp_path / "o"))
    assert "No space left on device" in err and not (tmp_path / "o").exists()
