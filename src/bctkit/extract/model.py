"""The model of ``bctkit extract``: a bctkit model file (a run's ``models/<name>/model.safetensors``
or its folder, trained or imported) or a ``bctkit export`` folder / file (TorchScript ``model.pt``,
ONNX ``model.onnx``, ``embedding.safetensors``, each with the ``card.json`` beside it). Every one
carries its preprocessing (the saved spec, or the card's input), so images are read as it expects."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from bctkit.data.transforms import Preprocess
from bctkit.engine.loader import Feed
from bctkit.errors import DataError, FileFormatError
from bctkit.export import CARD_FORMAT, CARD_NAME, _onnx_runtime, input_shape, sha256_file
from bctkit.models.config import BackboneConfig
from bctkit.models.factory import build_backbone
from bctkit.models.store import LoadedModel, fingerprint, freeze, load_model
from bctkit.storage import load_tensors, read_header, read_json

__all__ = ["EXPORT_PREFERENCE", "ExtractModel", "check_input", "from_loaded", "open_model"]

EXPORT_PREFERENCE = ("safetensors", "torchscript", "onnx")
"""Which export of a folder holding several is used: the rebuilt bctkit network first (exactly the
model's function), then TorchScript, then ONNX (needs onnxruntime)."""
_META_KEYS = ("method", "params", "train_images", "num_classes")


@dataclass
class ExtractModel:
    """A network that maps normalised images [B, C, H, W] to embeddings [B, dim], how images are read
    for it, and what a feature file says about it. ``identity`` keys resumable extractions: the
    fingerprint, plus the format and file hash of an export (its rounding is its own)."""

    net: nn.Module
    preprocess: Preprocess
    input_shape: tuple[int, int, int]
    dim: int
    meta: dict[str, Any]
    identity: str


def open_model(path: str | Path, device: torch.device) -> ExtractModel:
    """The model at ``path`` (see the module docstring) on ``device``, in eval mode; a one-line
    FileFormatError for a path that is none of them."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return _bctkit_model(p / "model.safetensors", device)
        if (p / CARD_NAME).is_file():
            return _exported(p, None, device)
        raise FileFormatError(f"{p}: not a model folder: it holds neither model.safetensors (a run's "
                              f"models/<name>/) nor {CARD_NAME} (a bctkit export)")
    if not p.is_file():
        raise FileFormatError(f"{p}: model not found")
    if p.suffix == ".safetensors":
        if "architecture" in read_header(p)[1] and (p.parent / CARD_NAME).is_file():
            return _exported(p.parent, p, device)
        return _bctkit_model(p, device)
    if p.suffix in (".pt", ".onnx"):
        if not (p.parent / CARD_NAME).is_file():
            raise FileFormatError(f"{p}: no {CARD_NAME} beside it; an exported model is read with the card "
                                  "`bctkit export` wrote (its input spec)")
        return _exported(p.parent, p, device)
    raise FileFormatError(f"{p}: not a model: expected a bctkit model (model.safetensors or its folder) or "
                          f"a bctkit export (model.pt, model.onnx or embedding.safetensors with {CARD_NAME})")


def check_input(net: ExtractModel, feed: Feed, where: str) -> None:
    """The images of ``feed``, read through the model's preprocessing, must be the model's input
    [C, H, W]: a one-line :class:`DataError` naming ``where`` (the model), the first image, what it
    becomes and what the model takes (the loader holds every later image to the first one's shape)."""
    got = feed.input_shape
    if tuple(got) != tuple(net.input_shape):
        show = "x".join
        raise DataError(
            f"{where}: the model takes {show(map(str, net.input_shape))} (C x H x W) images but "
            f"{feed.source.describe(0)} read through its preprocessing is {show(map(str, got))}; the "
            "data does not fit this model (channels or size)")


def _bctkit_model(path: Path, device: torch.device) -> ExtractModel:
    model = from_loaded(load_model(path), str(path), path.parent.name, str(path.resolve()))
    model.net.to(device)
    return model


def from_loaded(loaded: LoadedModel, where: str, default_name: str = "model", file: str | None = None
                ) -> ExtractModel:
    """A loaded bctkit model as an :class:`ExtractModel` (its network on its current device);
    ``where`` names it in errors."""
    if loaded.backbone is None:
        raise FileFormatError(f"{where}: the model has no network (known by its features only)")
    meta = loaded.meta
    spec = meta.get("preprocessing")
    if not isinstance(spec, dict):
        raise FileFormatError(f"{where}: the model records no preprocessing; it cannot embed images")
    try:
        pre = Preprocess.from_spec(spec)
    except ValidationError as exc:
        raise FileFormatError(f"{where}: unreadable preprocessing ({_first_error(exc)})") from None
    info = {
        "model": str(meta.get("name") or default_name), "model_fingerprint": loaded.fingerprint,
        "model_format": "bctkit", "model_file": file,
        **{k: meta.get(k) for k in _META_KEYS},
        "compat_dims": meta.get("compat_dims"), "compat_prefixes": meta.get("compat_prefixes"),
        "layout": meta.get("layout"),
    }
    return ExtractModel(loaded.backbone, pre, input_shape(loaded), loaded.output_dim, info,
                        f"bctkit:{loaded.fingerprint}")


def _exported(folder: Path, file: Path | None, device: torch.device) -> ExtractModel:
    """An export of ``folder`` (``file``, or the preferred format its card lists)."""
    card_path = folder / CARD_NAME
    card = read_json(card_path)
    if not isinstance(card, dict) or card.get("card_format") != CARD_FORMAT:
        raise FileFormatError(f"{card_path}: not a bctkit export card (card_format {CARD_FORMAT!r})")
    exports = card.get("exports") or {}
    if file is None:
        found = [f for f in EXPORT_PREFERENCE
                 if f in exports and (folder / str(exports[f].get("file"))).is_file()]
        if not found:
            raise FileFormatError(f"{card_path}: lists no exported file present in {folder}")
        fmt = found[0]
    else:
        fmt = next((f for f, e in exports.items() if e.get("file") == file.name), "")
        if not fmt:
            raise FileFormatError(f"{file}: not listed in {card_path} (exports: {sorted(exports)})")
    entry = exports[fmt]
    target = folder / str(entry["file"])
    digest = sha256_file(target)
    if digest != entry.get("sha256"):
        raise FileFormatError(f"{target}: its sha256 differs from the one in {card_path}; the file was "
                              "changed after the export")
    try:
        inp, model, emb = card["input"], card["model"], card["embedding"]
        shape = (int(inp["channels"]), int(inp["height"]), int(inp["width"]))
        pre = Preprocess.from_card_input(inp)
        dim, fp = int(emb["dim"]), str(model["fingerprint"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FileFormatError(f"{card_path}: incomplete card ({type(exc).__name__}: {_first_error(exc)})"
                              ) from None
    build = {"torchscript": _torchscript, "onnx": _onnx, "safetensors": _weights}[fmt]
    net = build(target, entry, device, fp)
    compat = card.get("compatibility") or {}
    info = {
        "model": str(model.get("name") or folder.name), "model_fingerprint": fp, "model_format": fmt,
        "model_file": str(target.resolve()), "model_sha256": digest,
        **{k: model.get(k) for k in _META_KEYS},
        "compat_dims": compat.get("compat_dims"), "compat_prefixes": compat.get("compat_prefixes"),
        "layout": emb.get("layout"),
    }
    return ExtractModel(net, pre, shape, dim, info, f"{fmt}:{fp}:{digest}")


def _torchscript(path: Path, entry: dict[str, Any], device: torch.device, fp: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates TorchScript; it still loads
        try:
            net = torch.jit.load(str(path), map_location=device)
        except Exception as exc:  # TorchScript's loader raises many types for a bad file
            raise FileFormatError(f"{path}: not a TorchScript file ({str(exc).splitlines()[0]})") from None
    return net.eval()


def _weights(path: Path, entry: dict[str, Any], device: torch.device, fp: str) -> nn.Module:
    tensors, meta = load_tensors(path)
    try:
        net = build_backbone(BackboneConfig(**meta["architecture"]))
        net.load_state_dict(tensors)
    except (KeyError, TypeError, ValidationError, RuntimeError) as exc:
        raise FileFormatError(f"{path}: not an exported embedding network ({_first_error(exc)})") from None
    if fingerprint(net) != fp:
        raise FileFormatError(f"{path}: the weights do not rebuild the fingerprint {fp} of its card")
    return freeze(net).to(device)


class _OnnxNet(nn.Module):
    """An ONNX model run by onnxruntime, as a module: float32 in, float32 out on the input's device
    (CUDA's execution provider for a CUDA device when onnxruntime has it, else the CPU's)."""

    def __init__(self, path: Path, entry: dict[str, Any], device: torch.device) -> None:
        super().__init__()
        ort = _onnx_runtime()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for a bad file
            raise FileFormatError(f"{path}: not a usable ONNX file ({str(exc).splitlines()[0]})") from None
        self.input_name = str(entry.get("input_name", "input"))
        self.output_name = str(entry.get("output_name", "embedding"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([self.output_name], {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def _onnx(path: Path, entry: dict[str, Any], device: torch.device, fp: str) -> nn.Module:
    return _OnnxNet(path, entry, device)


def _first_error(exc: Exception) -> str:
    """The first line of an error; for pydantic's, its first field and message."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__
