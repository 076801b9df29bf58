"""Tensor files: safetensors (never pickle) with bctkit's metadata as JSON under :data:`META_KEY` in
the header, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from bctkit.errors import FileFormatError
from bctkit.storage.atomic import atomic_path

META_KEY = "bctkit"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Save tensors as safetensors with ``meta`` embedded as JSON in the header, atomically; a failed
    write (disk full) is a one-line :class:`FileFormatError` and leaves no partial file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {META_KEY: json.dumps(meta, default=_json_default)}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=header)
        except SafetensorError as exc:
            raise FileFormatError(f"{path}: could not write ({exc})") from None


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file written by :func:`save_tensors`; returns (tensors, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, _decode_meta(raw, path)


def read_header(path: str | os.PathLike[str]) -> tuple[list[str], dict[str, Any]]:
    """(tensor names, bctkit metadata) of a safetensors file from its header alone: no tensor is
    read. Metadata that is not a JSON object reads as {}; an unreadable file or corrupt metadata is a
    one-line :class:`FileFormatError`."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            names = list(fh.keys())
            raw = (fh.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise FileFormatError(f"{path}: not a readable safetensors file ({first})") from None
    meta = _decode_meta(raw, path)
    return names, meta if isinstance(meta, dict) else {}


def _decode_meta(raw: str | None, path: Path) -> Any:
    """The bctkit metadata string of a header as JSON ({} when absent)."""
    try:
        return json.loads(raw) if raw is not None else {}
    except json.JSONDecodeError:
        raise FileFormatError(f"{path}: corrupt bctkit metadata in safetensors header") from None
