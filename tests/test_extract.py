"""bctkit extract: features against a hand-written preprocessing and forward pass, row keys (image
folder, list file, RecordIO), the flip test, exported models, the feature file's key tensors (read
from a file built byte by byte), given old features matched by key, evaluate reading the file, and
bad input through the CLI."""

from __future__ import annotations

import errno
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bctkit.cli import main
from bctkit.data.sources.imagefolder import ImageFolderSource
from bctkit.data.sources.recordio_writer import write_insightface
from bctkit.errors import FileFormatError
from bctkit.export import export_model
from bctkit.extract import extract_to_file, partial_dir
from bctkit.features import load_features
from bctkit.models.config import BackboneConfig
from bctkit.models.factory import build_backbone
from bctkit.models.heads import HeadConfig, build_head
from bctkit.models.store import load_model, save_model
from bctkit.oldside.given import given_features

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
PRE = {"color": "rgb", "resize": [20, 20], "crop": [16, 16], "mean": MEAN, "std": STD, "input": [3, 16, 16]}
CLASSES = ["bob", "alice", "carol"]  # folder order is sorted: alice 0, bob 1, carol 2


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BCTKIT_CACHE", str(tmp_path / "cache"))


def make_model(path: Path, pre: dict | None = None, seed: int = 0, bt2_meta: bool = False) -> Path:
    """A tiny model saved as a run saves it (models/<name>/model.safetensors + .json)."""
    torch.manual_seed(seed)
    cfg = BackboneConfig(arch="r8", width=4, in_channels=3, image_size=16, embedding_dim=8)
    net = build_backbone(cfg).train()
    with torch.no_grad():
        net(torch.randn(16, 3, 16, 16) * 2 + 0.3)  # non-trivial BatchNorm statistics
    hcfg = HeadConfig(type="arcface")
    meta = {"name": path.parent.name, "method": "bct", "params": {}, "preprocessing": pre or PRE,
            "compat_dims": 6 if bt2_meta else None, "compat_prefixes": [6] if bt2_meta else [],
            "layout": {"bct": [0, 6]} if bt2_meta else None, "compatible_with": "old", "train_images": 50}
    save_model(path, net.eval(), build_head(hcfg, 8, 4), hcfg, meta)
    return path


def make_folder(root: Path, per_class: int = 3) -> list[str]:
    """root/<identity>/<image>: RGB and greyscale PNG / JPEG of several sizes; returns the keys in
    the order the source must list them (sorted identities, then sorted file names)."""
    rng = np.random.default_rng(3)
    keys = []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            h, w = 18 + 3 * j, 22 - c
            grey = (c + j) % 4 == 3
            pixels = rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)
            file = root / name / f"{'g' if grey else 'i'}{j}.png"
            Image.fromarray(pixels, "L" if grey else "RGB").save(file)
    for name in sorted(CLASSES):
        keys += [f"{name}/{f}" for f in sorted(os.listdir(root / name))]
    return keys


def by_hand(model: Path, files: list[Path], flip: bool = False) -> np.ndarray:
    """Preprocessing written out step by step (RGB, bilinear 20 x 20, centred 16 x 16 crop,
    (x / 255 - mean) / std), then the network on all images at once."""
    rows = []
    for f in files:
        img = Image.open(f).convert("RGB").resize((20, 20), Image.Resampling.BILINEAR).crop((2, 2, 18, 18))
        arr = np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 255.0
        rows.append((arr - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None])
    x = torch.tensor(np.stack(rows), dtype=torch.float32)
    net = load_model(model).backbone
    with torch.no_grad():
        out = net(x) + (net(x.flip(3)) if flip else 0)
    return out.numpy()


@pytest.fixture
def setup(tmp_path):
    model = make_model(tmp_path / "run" / "models" / "new" / "model.safetensors")
    keys = make_folder(tmp_path / "data")
    return model, tmp_path / "data", keys


def test_features_keys_labels_meta_against_hand_computation(setup, tmp_path):
    model, data, keys = setup
    out = extract_to_file(model.parent, data, tmp_path / "f" / "new.safetensors", batch_size=4,
                          chunk_batches=1, device="cpu", progress=False)
    fs = load_features(out)
    assert [fs.keys[i] for i in range(len(fs.keys))] == keys
    assert fs.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expected = by_hand(model, [data / k for k in keys])
    assert np.abs(fs.feats.numpy() - expected).max() < 1e-4
    m = fs.meta
    assert m["model"] == "new" and m["model_fingerprint"] == load_model(model).fingerprint
    assert m["flip"] is False and m["images_fingerprint"] == ImageFolderSource(data).fingerprint()
    assert m["preprocessing"] == PRE and m["model_format"] == "bctkit"
    assert not list((tmp_path / "f").glob("*partial*"))  # the chunks are gone once the file is written


def test_loader_workers_change_nothing(setup, tmp_path):
    model, data, _ = setup
    a = extract_to_file(model, data, tmp_path / "a.safetensors", batch_size=2, chunk_batches=2, workers=0,
                        device="cpu", progress=False)
    b = extract_to_file(model, data, tmp_path / "b.safetensors", batch_size=2, chunk_batches=2, workers=2,
                        device="cpu", progress=False)
    assert a.read_bytes() == b.read_bytes()


def test_flip_adds_mirrored_features(setup, tmp_path):
    model, data, keys = setup
    out = extract_to_file(model, data, tmp_path / "flip.safetensors", batch_size=5, flip=True, device="cpu",
                          progress=False)
    fs = load_features(out)
    assert fs.meta["flip"] is True
    assert np.abs(fs.feats.numpy() - by_hand(model, [data / k for k in keys], flip=True)).max() < 1e-4


def test_compat_meta_is_the_models(tmp_path):
    model = make_model(tmp_path / "m" / "bt2" / "model.safetensors", bt2_meta=True)
    make_folder(tmp_path / "data")
    fs = load_features(extract_to_file(model, tmp_path / "data", tmp_path / "o.safetensors", device="cpu",
                                       progress=False))
    assert fs.compat_dims == 6 and fs.compat_prefixes == [6] and fs.meta["layout"] == {"bct": [0, 6]}


def test_list_file_and_recordio_keys(setup, tmp_path):
    model, data, keys = setup
    lst = tmp_path / "list.txt"
    order = [keys[i] for i in (4, 0, 7)]
    lst.write_text("".join(f"data/{k} {5 + i}\n" for i, k in enumerate(order)))
    fs = load_features(extract_to_file(model, lst, tmp_path / "l.safetensors", device="cpu", progress=False))
    assert [fs.keys[i] for i in range(3)] == [f"data/{k}" for k in order] and fs.labels.tolist() == [5, 6, 7]
    assert np.abs(fs.feats.numpy() - by_hand(model, [data / k for k in order])).max() < 1e-4

    encoded = []
    for k in keys[:5]:
        buf = io.BytesIO()
        Image.open(data / k).convert("RGB").save(buf, "PNG")
        encoded.append((buf.getvalue(), int(keys.index(k) >= 3)))
    write_insightface(tmp_path / "rec", encoded)
    fs = load_features(extract_to_file(model, tmp_path / "rec", tmp_path / "r.safetensors", device="cpu",
                                       progress=False))
    assert [fs.keys[i] for i in range(5)] == ["1", "2", "3", "4", "5"]  # record ids: images are 1..N
    assert fs.labels.tolist() == [0, 0, 0, 1, 1]
    assert np.abs(fs.feats.numpy() - by_hand(model, [data / k for k in keys[:5]])).max() < 1e-4
    named = load_features(extract_to_file(model, tmp_path / "rec" / "train.rec", tmp_path / "r2.safetensors",
                                          device="cpu", progress=False))
    assert torch.equal(named.feats, fs.feats)
    assert named.meta["images_fingerprint"] == fs.meta["images_fingerprint"]


def test_exports_give_the_same_rows(setup, tmp_path):
    model, data, _ = setup
    ref = load_features(extract_to_file(model, data, tmp_path / "ref.safetensors", batch_size=4,
                                        device="cpu", progress=False))
    export_model(model, "torchscript", tmp_path / "ts")
    ts = load_features(extract_to_file(tmp_path / "ts", data, tmp_path / "ts.safetensors", batch_size=4,
                                       device="cpu", progress=False))
    assert ts.meta["model_format"] == "torchscript"
    assert ts.meta["model_fingerprint"] == ref.meta["model_fingerprint"]
    assert np.abs(ts.feats.numpy() - ref.feats.numpy()).max() < 1e-5
    assert ts.labels.tolist() == ref.labels.tolist() and ts.meta["preprocessing"] == PRE
    export_model(model, "safetensors", tmp_path / "w")
    w = load_features(extract_to_file(tmp_path / "w" / "embedding.safetensors", data,
                                      tmp_path / "w.safetensors", batch_size=4, device="cpu", progress=False))
    assert w.meta["model_format"] == "safetensors" and torch.equal(w.feats, ref.feats)


def test_onnx_export_gives_the_same_rows(setup, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, data, _ = setup
    ref = load_features(extract_to_file(model, data, tmp_path / "ref.safetensors", device="cpu",
                                        progress=False))
    export_model(model, "onnx", tmp_path / "x")
    got = load_features(extract_to_file(tmp_path / "x" / "model.onnx", data, tmp_path / "x.safetensors",
                                        device="cpu", progress=False))
    assert got.meta["model_format"] == "onnx" and np.abs(got.feats.numpy() - ref.feats.numpy()).max() < 1e-4


def test_usable_as_given_old_features_and_by_evaluate(setup, tmp_path):
    model, data, keys = setup
    out = extract_to_file(model, data, tmp_path / "old.safetensors", device="cpu", progress=False)
    fs = load_features(out)
    src = ImageFolderSource(data)
    perm = np.array([5, 2, 8, 0, 7, 1, 4, 3, 6])
    got = given_features(out, src.subset(perm), 8, "training")  # rows matched by key, not by position
    assert torch.equal(got, fs.feats[perm])
    with pytest.raises(Exception, match=r"no features for 2 of 11 images"):
        (data / "alice" / "new0.png").write_bytes((data / keys[0]).read_bytes())
        (data / "bob" / "new1.png").write_bytes((data / keys[0]).read_bytes())
        given_features(out, ImageFolderSource(data), 8, "training")

    new = make_model(tmp_path / "run" / "models" / "l2" / "model.safetensors", seed=1)
    make_folder(tmp_path / "ev", per_class=4)
    a = extract_to_file(model, tmp_path / "ev", tmp_path / "a.safetensors", device="cpu", progress=False)
    b = extract_to_file(new, tmp_path / "ev", tmp_path / "b.safetensors", device="cpu", progress=False)
    assert main(["evaluate", "--old", str(a), "--new", str(b), "--out", str(tmp_path / "rep"),
                 "--no-backfill", "--topk", "1"]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {r["query_model"] for r in report["results"]} == {"old", "l2"}


def _safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], meta: dict) -> bytes:
    """A safetensors file from its description: u64 little-endian header size, the JSON header
    (dtype, shape, [begin, end) byte offsets into the data), then the data."""
    header: dict = {"__metadata__": {"bctkit": json.dumps(meta)}}
    data, pos = b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
        data, pos = data + raw, pos + len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def test_key_tensors_read_from_a_hand_built_file(tmp_path):
    keys = ["a/x.png", "b/ü.jpg", "c"]
    blob = "".join(keys).encode()
    offsets = [0, 7, 7 + len("b/ü.jpg".encode()), len(blob)]
    feats = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    good = {"feats": ("F32", [3, 2], feats), "labels": ("I64", [3], struct.pack("<3q", 0, 1, 1)),
            "keys_blob": ("U8", [len(blob)], blob),
            "keys_offsets": ("I64", [4], struct.pack("<4q", *offsets))}
    (tmp_path / "k.safetensors").write_bytes(_safetensors_bytes(good, {"model": "m"}))
    fs = load_features(tmp_path / "k.safetensors")
    assert [fs.keys[i] for i in range(3)] == keys and fs.feats.tolist() == [[1, 2], [3, 4], [5, 6]]
    bad = {**good, "keys_offsets": ("I64", [4], struct.pack("<4q", 0, 9, 7, len(blob)))}
    (tmp_path / "bad.safetensors").write_bytes(_safetensors_bytes(bad, {}))
    with pytest.raises(FileFormatError, match="key offsets must rise from 0"):
        load_features(tmp_path / "bad.safetensors")
    short = {**good, "keys_offsets": ("I64", [3], struct.pack("<3q", 0, 7, len(blob)))}
    (tmp_path / "short.safetensors").write_bytes(_safetensors_bytes(short, {}))
    with pytest.raises(FileFormatError, match=r"expected uint8 \[bytes\] \+ int64 \[4\]"):
        load_features(tmp_path / "short.safetensors")


def _cli_error(capsys, *argv: str) -> str:
    assert main(["extract", *argv, "--device", "cpu", "--quiet", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bctkit: error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_exit_2(setup, tmp_path, capsys):
    model, data, _ = setup
    out = str(tmp_path / "o.safetensors")
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    assert "not a readable safetensors" in _cli_error(capsys, str(tmp_path / "junk.safetensors"), str(data),
                                                      "--out", out)
    (tmp_path / "empty").mkdir()
    assert "not a model:" in _cli_error(capsys, str(tmp_path / "notes.txt"), str(data), "--out", out)
    assert "not a model folder" in _cli_error(capsys, str(tmp_path / "empty"), str(data), "--out", out)
    assert "model not found" in _cli_error(capsys, str(tmp_path / "nope"), str(data), "--out", out)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "flat" / "a.png")
    assert "not a dataset folder" in _cli_error(capsys, str(model), str(tmp_path / "flat"), "--out", out)
    assert "data not found" in _cli_error(capsys, str(model), str(tmp_path / "nowhere"), "--out", out)
    assert "one image" in _cli_error(capsys, str(model), str(tmp_path / "flat" / "a.png"), "--out", out)
    blocked = str(tmp_path / "notes.txt" / "o.safetensors")
    assert "cannot create its folder" in _cli_error(capsys, str(model), str(data), "--out", blocked)
    assert "end its name with .safetensors" in _cli_error(capsys, str(model), str(data), "--out",
                                                          str(tmp_path / "o.npy"))
    stored = make_model(tmp_path / "s" / "model.safetensors",  # reads images in their stored colour
                        pre={"color": "stored", "resize": [16, 16], "crop": None, "mean": [0.5], "std": [0.5],
                             "input": [3, 16, 16]})
    (tmp_path / "grey" / "x").mkdir(parents=True)
    Image.new("L", (16, 16)).save(tmp_path / "grey" / "x" / "a.png")
    err = _cli_error(capsys, str(stored), str(tmp_path / "grey"), "--out", out)
    assert "takes 3x16x16" in err and "is 1x16x16" in err
    export_model(model, "torchscript", tmp_path / "ts")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "model.pt").write_bytes((tmp_path / "ts" / "model.pt").read_bytes())
    assert "no card.json beside it" in _cli_error(capsys, str(tmp_path / "loose" / "model.pt"), str(data),
                                                  "--out", out)
    with open(tmp_path / "ts" / "model.pt", "ab") as fh:
        fh.write(b"\0")
    assert "sha256 differs" in _cli_error(capsys, str(tmp_path / "ts"), str(data), "--out", out)
    assert not (tmp_path / "o.safetensors").exists() and not list(tmp_path.glob("*partial*"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_folder(setup, tmp_path, capsys):
    model, data, _ = setup
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        err = _cli_error(capsys, str(model), str(data), "--out", str(ro / "f.safetensors"))
        assert "is not writable" in err
    finally:
        ro.chmod(0o700)


RESUME_WORKER = """
import sys, time
from pathlib import Path
from bctkit.data.sources.imagefolder import ImageFolderSource
from bctkit.extract import extract_to_file, partial_dir

class Slow(ImageFolderSource):
    reads = 0
    def read(self, i):
        Slow.reads += 1
        time.sleep(float(sys.argv[4]))
        return super().read(i)

model, data, out = sys.argv[1:4]
extract_to_file(model, Slow(data), out, batch_size=2, chunk_batches=1, device="cpu", progress=False)
Path(out + ".reads").write_text(str(Slow.reads))
"""


def test_sigkill_then_resume_equals_an_uninterrupted_run(setup, tmp_path):
    """A run killed (SIGKILL) after at least one finished chunk, rerun: it reads only the images of
    the chunks not written, and the file is byte for byte the one an uninterrupted run writes."""
    import signal
    import subprocess
    import sys
    import time

    model, _, _ = setup
    data = tmp_path / "many"
    make_folder(data, per_class=6)  # 18 images: 9 chunks of one batch of 2
    worker = tmp_path / "worker.py"
    worker.write_text(RESUME_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def run(out: Path, delay: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(worker), str(model), str(data), str(out), str(delay)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    out = tmp_path / "killed" / "f.safetensors"
    proc = run(out, 0.15)
    deadline = time.monotonic() + 120
    chunks: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        chunks = list(out.parent.glob("f.safetensors.partial-*/chunk-*.safetensors"))
        if chunks:
            break
        time.sleep(0.02)
    assert proc.poll() is None and chunks, "the run ended before a chunk was written: " + str(proc.stderr)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = len(list(out.parent.glob("f.safetensors.partial-*/chunk-*.safetensors")))
    assert 1 <= done < 9
    resumed = run(out, 0.0)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    assert int(Path(str(out) + ".reads").read_text()) == 1 + 18 - 2 * done  # + the first image's shape
    assert not list(out.parent.glob("*partial*"))
    whole = run(tmp_path / "whole" / "f.safetensors", 0.0)
    assert whole.wait(timeout=120) == 0, whole.stderr.read()
    assert out.read_bytes() == (tmp_path / "whole" / "f.safetensors").read_bytes()


def _no_space(path, *_args, **_kwargs):
    """A write on a full disk: its folder is made, then the write fails."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_leaves_no_partial_folder(setup, tmp_path, capsys, monkeypatch):
    model, data, _ = setup
    monkeypatch.setattr("bctkit.extract.run.write_json", _no_space)
    err = _cli_error(capsys, str(model), str(data), "--out", str(tmp_path / "o.safetensors"))
    assert "No space left on device" in err
    assert not list(tmp_path.glob("o.safetensors*"))


def test_chunks_of_other_settings_go_once_the_file_is_written(setup, tmp_path):
    """An interrupted run with another batch size left its chunks: the finished file removes them."""
    model, data, _ = setup
    out = tmp_path / "o.safetensors"
    stale = partial_dir(out, "0123456789abcdef")
    stale.mkdir()
    (stale / "plan.json").write_text("{}")
    (stale / "chunk-000000.safetensors").write_bytes(b"x")
    other = tmp_path / "o2.safetensors.partial-0123456789abcdef"  # another output's: kept
    other.mkdir()
    extract_to_file(model, data, out, batch_size=4, chunk_batches=1, device="cpu", progress=False)
    assert out.is_file() and not list(tmp_path.glob("o.safetensors.partial-*")) and other.is_dir()


def test_device_error_names_the_option(setup, tmp_path, capsys):
    model, data, _ = setup
    out = str(tmp_path / "o.safetensors")
    assert main(["extract", str(model), str(data), "--out", out, "--device", "tpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--device='tpu'" in err and "train.device" not in err
