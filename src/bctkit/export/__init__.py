"""Export of a trained model's embedding network (no classifier head) for serving without bctkit:
ONNX, TorchScript or safetensors weights, each with a JSON card that says what the input must be,
what the output means, which older models it is compatible with and what its run's report measured.

Every exported file is checked when it is written: the ONNX file under onnxruntime and the
TorchScript file after ``torch.jit.load`` must reproduce the bctkit model's embeddings on random
images within :data:`TOLERANCE` times the embeddings' scale (the largest absolute coordinate, at least
1: float32 rounding grows with the values, and cosine similarity does not see the scale); the
safetensors weights must rebuild the model's fingerprint.
Files are written atomically, so a failed check leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

import bctkit
from bctkit.errors import BctkitError, ConfigError, FileFormatError
from bctkit.export.card import compat_card, evaluation_card
from bctkit.models.config import BackboneConfig
from bctkit.models.factory import build_backbone
from bctkit.models.store import LoadedModel, fingerprint, load_model
from bctkit.storage import atomic_path, load_tensors, read_json, save_tensors, write_json

FORMATS = ("onnx", "torchscript", "safetensors")
# model.onnx / model.pt: the file names Triton's onnxruntime and PyTorch backends look for; the weights
# are not named model.safetensors, which is what a bctkit model file is called.
FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "safetensors": "embedding.safetensors"}
CARD_NAME = "card.json"
CARD_FORMAT, CARD_VERSION = "bctkit-export-card", 1
TOLERANCE = 1e-4
EXAMPLE_BATCH = 2
CHECK_BATCHES = (1, 3)  # other sizes than the example's: the batch axis must really be dynamic
ONNX_OPSET = 17


class ExportedFiles(NamedTuple):
    """What :func:`export_model` wrote: the exported model and its card."""

    file: Path
    card: Path


def export_model(model_path: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str]) -> ExportedFiles:
    """Export the embedding network of the bctkit model file ``model_path`` (or its folder) as
    ``fmt`` into the folder ``out``, check it against the model and write ``out/card.json``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: unknown; expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _onnx_runtime()
    path = Path(model_path)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise FileFormatError(f"{path}: not a model folder: it holds no model.safetensors (export "
                                  "takes a run's models/<name>/ or its model.safetensors)")
        path = path / "model.safetensors"
    loaded = load_model(path)
    if loaded.backbone is None:
        raise ConfigError(f"{path}: the model has no network (an old model known by its features only); "
                          "there is nothing to export")
    made = not Path(out).exists()
    out = _output_dir(Path(out))
    try:
        return _export_into(path, loaded, fmt, out)
    except BaseException:
        if made and not any(out.iterdir()):  # a failed export leaves no empty folder behind
            out.rmdir()
        raise


def _export_into(path: Path, loaded: LoadedModel, fmt: str, out: Path) -> ExportedFiles:
    """:func:`export_model` once its output folder exists."""
    target = out / FILES[fmt]
    if target.resolve() == path.resolve():
        raise ConfigError(f"--out {out}: the export would replace the model file {path}; "
                          "choose another folder")
    shape = input_shape(loaded)
    inputs = {b: _random_input(loaded, shape, b, seed=b) for b in (EXAMPLE_BATCH, *CHECK_BATCHES)}
    with torch.no_grad():
        expected = {b: loaded.backbone(x) for b, x in inputs.items()}
    exporter = {"onnx": _export_onnx, "torchscript": _export_torchscript, "safetensors": _export_safetensors}
    details = exporter[fmt](loaded, target, inputs, expected)
    entry = {"file": target.name, "sha256": sha256_file(target), "bytes": target.stat().st_size, **details}
    card_path = out / CARD_NAME
    write_json(card_path, _merge_exports(card_path, model_card(path, loaded, {fmt: entry}), out))
    return ExportedFiles(target, card_path)


def embedding_network(loaded: LoadedModel) -> nn.Module:
    """A copy of the model's backbone in eval mode with every parametrisation (BT^2's orthogonal
    matrices) replaced by its current value: plain weights, computing the same function, which
    TorchScript and ONNX can represent."""
    net = build_backbone(loaded.backbone.config)
    net.load_state_dict(loaded.backbone.state_dict())
    with torch.no_grad():
        for module in net.modules():
            if parametrize.is_parametrized(module):
                for name in list(module.parametrizations):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    net.eval().requires_grad_(False)
    return net


def input_shape(loaded: LoadedModel) -> tuple[int, int, int]:
    """[C, H, W] of one input image: the recorded preprocessing's, else the backbone config's."""
    pre = loaded.meta.get("preprocessing") or {}
    if pre.get("input"):
        c, h, w = (int(v) for v in pre["input"])
        return c, h, w
    cfg = loaded.backbone.config
    size = cfg.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return cfg.in_channels, h, w


def _mean_std(loaded: LoadedModel, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in units of 255 (bctkit's default 0.5 / 0.5 when none was recorded)."""
    pre = loaded.meta.get("preprocessing") or {}
    mean, std = pre.get("mean") or [0.5], pre.get("std") or [0.5]
    return ([float(v) for v in (mean * channels if len(mean) == 1 else mean)],
            [float(v) for v in (std * channels if len(std) == 1 else std)])


def _random_input(loaded: LoadedModel, shape: tuple[int, int, int], batch: int, seed: int) -> torch.Tensor:
    """Random uint8 images normalised as the model's input: what the export is checked on."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, *shape), generator=gen, dtype=torch.uint8)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in _mean_std(loaded, shape[0]))
    return ((pixels.float() / 255.0 - mean) / std).contiguous()


def _max_diff(outputs: dict[int, torch.Tensor], expected: dict[int, torch.Tensor],
              what: str) -> tuple[float, float]:
    """(largest absolute difference over the checked batches, the bound it must keep); a one-line
    error beyond the bound."""
    diff, scale = 0.0, 1.0
    for b, ref in expected.items():
        got = outputs[b]
        if tuple(got.shape) != tuple(ref.shape):
            raise FileFormatError(f"{what}: output shape {list(got.shape)} for a batch of {b}, expected "
                                  f"{list(ref.shape)}; the export is not usable")
        diff = max(diff, float((got.double() - ref.double()).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    bound = TOLERANCE * scale
    if not diff <= bound:
        raise FileFormatError(f"{what}: embeddings differ from PyTorch's by {diff:.3g} (> {bound:.3g}); "
                              "nothing was written")
    return diff, bound


def _onnx_runtime() -> Any:
    """onnxruntime, after checking that the optional ONNX packages are installed."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime
    except ImportError as exc:
        raise BctkitError(f"--format onnx needs onnx and onnxruntime ({exc.name} is missing): "
                          "pip install bctkit[onnx]") from None
    return onnxruntime


def _export_onnx(loaded: LoadedModel, target: Path, inputs: dict[int, torch.Tensor],
                 expected: dict[int, torch.Tensor]) -> dict[str, Any]:
    """TorchScript-based exporter (``dynamo=False``: needs no onnxscript), dynamic batch axis,
    checked under onnxruntime on the CPU."""
    ort = _onnx_runtime()
    net = embedding_network(loaded)
    with atomic_path(target) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (inputs[EXAMPLE_BATCH],), str(tmp), input_names=["input"],
                              output_names=["embedding"], opset_version=ONNX_OPSET, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        outputs = {b: torch.from_numpy(session.run(["embedding"], {"input": x.numpy()})[0])
                   for b, x in inputs.items()}
        diff = _max_diff(outputs, expected, f"{target} (onnxruntime)")
    return {
        "format": "onnx", "exporter": "torch.onnx.export(dynamo=False), the TorchScript-based exporter",
        "opset": ONNX_OPSET, "input_name": "input", "output_name": "embedding", "dynamic_axes": {"batch": 0},
        "load": f"onnxruntime.InferenceSession('{target.name}').run(['embedding'], {{'input': x}})[0]",
        "check": _check_entry(diff, f"onnxruntime {ort.__version__}, CPUExecutionProvider"),
    }


def _export_torchscript(loaded: LoadedModel, target: Path, inputs: dict[int, torch.Tensor],
                        expected: dict[int, torch.Tensor]) -> dict[str, Any]:
    """Scripted when the network allows it (any input size the architecture takes), else traced
    with the example's C, H, W (the batch stays free); checked after ``torch.jit.load``."""
    net = embedding_network(loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module, how = torch.jit.script(net), "scripted (torch.jit.script)"
        except Exception:  # TorchScript's frontend raises many types for an unsupported construct
            module = torch.jit.trace(net, (inputs[EXAMPLE_BATCH],), check_trace=False)
            c, h, w = inputs[EXAMPLE_BATCH].shape[1:]
            how = f"traced (torch.jit.trace) with input [B, {c}, {h}, {w}]"
    with atomic_path(target) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates TorchScript; it still saves and loads
        torch.jit.save(module, str(tmp))
        reloaded = torch.jit.load(str(tmp), map_location="cpu")
        with torch.no_grad():
            outputs = {b: reloaded(x) for b, x in inputs.items()}
        diff = _max_diff(outputs, expected, f"{target} (torch.jit.load)")
    return {
        "format": "torchscript", "how": how,
        "load": f"torch.jit.load('{target.name}').eval()(x)  # torch only, no bctkit",
        "check": _check_entry(diff, f"torch {torch.__version__} torch.jit.load"),
    }


def _export_safetensors(loaded: LoadedModel, target: Path, inputs: dict[int, torch.Tensor],
                        expected: dict[int, torch.Tensor]) -> dict[str, Any]:
    """The backbone's state dict as bctkit names it (keys without ``backbone.``): rebuilding needs
    bctkit's architecture; checked by rebuilding the model and comparing fingerprints."""
    cfg = loaded.backbone.config
    meta = {"architecture": cfg.model_dump(), "fingerprint": loaded.fingerprint,
            "preprocessing": loaded.meta.get("preprocessing")}
    save_tensors(target, loaded.backbone.state_dict(), meta)
    tensors, _ = load_tensors(target)
    rebuilt = build_backbone(BackboneConfig(**cfg.model_dump())).eval()
    rebuilt.load_state_dict(tensors)
    with torch.no_grad():
        outputs = {b: rebuilt(x) for b, x in inputs.items()}
    if fingerprint(rebuilt) != loaded.fingerprint:
        target.unlink(missing_ok=True)
        raise FileFormatError(f"{target}: the written weights do not rebuild the model's fingerprint")
    diff = _max_diff(outputs, expected, f"{target} (rebuilt)")
    return {
        "format": "safetensors", "keys": "the backbone's state_dict (no 'backbone.' prefix, no head)",
        "load": ("from bctkit.models import BackboneConfig, build_backbone; from safetensors.torch "
                 "import load_file; net = build_backbone(BackboneConfig(**card['architecture']['config']));"
                 f" net.load_state_dict(load_file('{target.name}')); net.eval()"),
        "check": {**_check_entry(diff, "bctkit build_backbone + load_state_dict"),
                  "fingerprint_rebuilt": True},
    }


def _check_entry(diff: tuple[float, float], runtime: str) -> dict[str, Any]:
    return {"max_abs_diff": diff[0], "tolerance": diff[1],
            "tolerance_rule": f"{TOLERANCE:g} x max(1, largest |coordinate| of the PyTorch embeddings)",
            "runtime": runtime,
            "batches": [EXAMPLE_BATCH, *CHECK_BATCHES],
            "inputs": "random uint8 images, normalised as stated in 'input', vs the bctkit model in PyTorch"}


def model_card(model_path: Path, loaded: LoadedModel | None = None,
               exports: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The card of a bctkit model (what a server needs to use an export of it): architecture,
    input, embedding, compatibility with older models and, when the model sits in a run directory,
    its report's results; ``exports`` describes the exported files."""
    loaded = loaded or load_model(model_path)
    meta, cfg = loaded.meta, loaded.backbone.config
    where = Path(model_path).resolve()
    name = str(meta.get("name") or where.parent.name)
    run = where.parents[2] if where.parent.parent.name == "models" else None
    return {
        "card_format": CARD_FORMAT, "card_version": CARD_VERSION,
        "written_by": f"bctkit {bctkit.__version__}, torch {torch.__version__}",
        "model": {
            "name": name, "file": str(model_path), "sha256": sha256_file(model_path),
            "fingerprint": loaded.fingerprint, "run_id": meta.get("run_id"), "method": meta.get("method"),
            "params": meta.get("params"), "train_images": meta.get("train_images"),
            "classifier_head": "not exported (training only)",
        },
        "architecture": {
            "config": cfg.model_dump(),
            "rebuild": "bctkit.models.build_backbone(bctkit.models.BackboneConfig(**config))",
        },
        "input": _input_card(loaded),
        "embedding": {
            "name": "embedding", "dtype": "float32", "shape": ["batch", cfg.output_dim],
            "dim": cfg.output_dim, "layout": meta.get("layout"), "l2_normalized": False,
            "similarity": "cosine: L2-normalise each embedding, then take inner products",
        },
        "compatibility": compat_card(meta, cfg.output_dim, run, name, loaded.fingerprint),
        "evaluation": evaluation_card(run, name, loaded.fingerprint),
        "exports": exports or {},
    }


def _input_card(loaded: LoadedModel) -> dict[str, Any]:
    c, h, w = input_shape(loaded)
    pre = loaded.meta.get("preprocessing")
    mean, std = _mean_std(loaded, c)
    color = (pre or {}).get("color", "stored")
    order = {"rgb": "R, G, B", "bgr": "B, G, R", "grey": "grey (ITU-R 601-2 luma)"}.get(
        color, "as the training images were stored (Pillow's decoding: R, G, B for colour images, one "
               "channel for greyscale)")
    return {
        "name": "input", "dtype": "float32", "layout": "NCHW", "shape": ["batch", c, h, w],
        "channels": c, "height": h, "width": w, "color": color, "channel_order": order,
        "mean": mean, "std": std,
        "normalization": "x[:, c] = (pixel / 255 - mean[c]) / std[c], pixel the uint8 value in [0, 255]",
        "resize": (pre or {}).get("resize"), "crop": (pre or {}).get("crop"),
        "outside_the_model": ("decoding to uint8, colour conversion, resize (Pillow bilinear, antialiased "
                              "when shrinking) to 'resize' [H, W], centred crop to 'crop' [H, W], then the "
                              "normalisation; with neither, images must already be H x W"),
        "recorded": pre is not None,
    }


def _merge_exports(card_path: Path, card: dict[str, Any], out: Path) -> dict[str, Any]:
    """Keep the entries of an existing card in ``out`` for other formats of the same model whose
    files are still there unchanged, so that one folder can hold several formats and one card."""
    try:
        previous = read_json(card_path) if card_path.is_file() else None
    except FileFormatError:
        previous = None
    if not isinstance(previous, dict) or (previous.get("model") or {}).get("fingerprint") != card["model"][
            "fingerprint"]:
        return card
    kept = {}
    for fmt, entry in (previous.get("exports") or {}).items():
        file = out / str(entry.get("file", ""))
        if fmt not in card["exports"] and file.is_file() and sha256_file(file) == entry.get("sha256"):
            kept[fmt] = entry
    return {**card, "exports": {**kept, **card["exports"]}}


def _output_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileFormatError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise FileFormatError(f"{out}: the output folder is not writable")
    return out


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
