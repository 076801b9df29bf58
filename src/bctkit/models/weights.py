"""Loading published weights (arcface_torch, torchvision, timm, your own) into a built backbone.

Files are read as data only: ``.safetensors``, or ``.pt`` / ``.pth`` through
``torch.load(weights_only=True)``; a pickle that needs more than tensors is refused, never unpickled
in full. Matching is strict: every key of the module (but the skipped ones) must come with a tensor
of its shape, and no other key may come. Every failure is a one-line :class:`FileFormatError`.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from bctkit.errors import FileFormatError
from bctkit.models.iresnet import IRESNET_LAYERS
from bctkit.models.resnet import RESNET_LAYERS, Bottleneck

SHOWN = 5  # keys listed in a missing / unexpected message
STAGE_KEY = re.compile(r"layer(\d+)\.(\d+)\.")


def load_state_dict_file(path: str | Path, bare: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file on the CPU. A training checkpoint (``{"state_dict": ...}``, or
    arcface_torch's ``{"state_dict_backbone": ...}``) is unwrapped and a ``module.`` prefix on every
    key (DataParallel / DDP) removed. ``bare``: the name a torch file holding one bare tensor gets
    (older arcface_torch's ``rank_{r}_softmax_weight.pt``), read as data only like any torch file;
    without it such a file is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            tensors: object = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise FileFormatError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    elif suffix in (".pt", ".pth"):
        tensors = _torch_load(path)
        if bare is not None and isinstance(tensors, torch.Tensor):
            tensors = {bare: tensors}
    else:
        raise FileFormatError(f"{path}: unknown weights format {suffix or '(no suffix)'!r}; "
                              "give a .safetensors, .pt or .pth file")
    sd = _as_state_dict(tensors, str(path))
    _check_finite(sd, str(path))
    return sd


def load_backbone_weights(
    module: nn.Module, source: str | Path | Mapping[str, torch.Tensor], skip: Iterable[str] = ()
) -> None:
    """Copy the weights of ``source`` (a file, or a state dict) into ``module``, strictly: keys
    starting with a prefix in ``skip`` are ignored on both sides (``skip=("fc.",)`` takes a
    torchvision ImageNet trunk without its 1000-class classifier; the module keeps its own ``fc``)."""
    if isinstance(source, str | Path):
        name = str(source)
        sd = load_state_dict_file(source)
    else:
        name = "state dict"
        sd = _as_state_dict(dict(source), name)
        _check_finite(sd, name)
    prefixes = tuple(skip)
    given = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(prefixes)}
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_some(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
        hint = depth_mismatch(list(given), list(own), getattr(getattr(module, "config", None), "arch", None))
        if hint:
            raise FileFormatError(f"{name}: {hint} (does not fit {type(module).__name__}: {len(missing)} "
                                  f"missing, {len(unexpected)} unexpected key(s))")
        raise FileFormatError(f"{name}: does not fit {type(module).__name__} ({'; '.join(parts)})")
    for key, mine in own.items():
        if given[key].shape != mine.shape:
            raise FileFormatError(
                f"{name}: {key} has shape {list(given[key].shape)}, {type(module).__name__} expects "
                f"{list(mine.shape)}"
            )
    module.load_state_dict(given, strict=not prefixes)


def stage_depths(keys: Iterable[str]) -> tuple[int, ...]:
    """Blocks per stage of a ResNet-style state dict (keys ``layer<S>.<N>.*``, stages from 1), or ()
    when the keys have no such stages."""
    blocks: dict[int, int] = {}
    for key in keys:
        m = STAGE_KEY.match(key)
        if m:
            stage, block = int(m[1]), int(m[2])
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    if sorted(blocks) != list(range(1, len(blocks) + 1)):
        return ()
    return tuple(blocks[s] for s in sorted(blocks))


def depth_mismatch(given: list[str], own: list[str], arch: str | None) -> str:
    """'the file holds an iresnet18 (layers 2-2-2-2); the config says iresnet50 (layers 3-4-14-3)'
    when the file's keys and the module's differ in their blocks per stage, else ''. The file's
    depth is named from the family of ``arch`` (the config's); a depth of no named arch is shown as
    its layers only."""
    have, want = stage_depths(given), stage_depths(own)
    if not have or not want or have == want:
        return ""
    names: dict[tuple[int, ...], str] = {}
    if arch and arch.startswith("iresnet"):
        names = {layers: n for n, layers in IRESNET_LAYERS.items()}
    elif arch and arch.startswith("resnet"):
        bottleneck = any(".conv3." in k for k in given)
        names = {depths: n for n, (block, depths) in RESNET_LAYERS.items()
                 if (block is Bottleneck) == bottleneck}

    def fmt(d: tuple[int, ...]) -> str:
        return "layers " + "-".join(map(str, d))

    holds = names.get(have)
    what = (f"{'an' if holds[0] in 'aeiou' else 'a'} {holds} ({fmt(have)})" if holds
            else f"a network of {fmt(have)}")
    return f"the file holds {what}; the config says {arch or 'another depth'} ({fmt(want)})"


def _torch_load(path: Path) -> object:
    """``torch.load`` restricted to tensors and plain containers."""
    with open(path, "rb") as f:
        head = f.read(1)
    if not zipfile.is_zipfile(path) and head != b"\x80":  # torch.save: zip; legacy: a pickle
        raise FileFormatError(f"{path}: not a readable torch file (neither torch.save's zip format "
                              "nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FileFormatError(
            f"{path}: not a plain state dict: torch.load(weights_only=True) refused it "
            f"({_refusal(exc)}); save model.state_dict() instead of the model or a custom object"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise FileFormatError(f"{path}: not a readable torch file ({_first_line(exc)})") from None


WRAPPERS = ("state_dict", "state_dict_backbone")
"""Keys of a training checkpoint that hold the network's state dict: the common ``state_dict``, and
arcface_torch's ``checkpoint_gpu_<rank>.pt`` (``state_dict_backbone`` beside the Partial FC shard,
optimizer and scheduler states)."""


def _as_state_dict(obj: object, name: str) -> dict[str, torch.Tensor]:
    """Unwrap a checkpoint (:data:`WRAPPERS`) and a ``module.`` prefix; every value must be a tensor."""
    if isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        obj = obj if inner is None else inner
    if not isinstance(obj, Mapping):
        raise FileFormatError(f"{name}: holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise FileFormatError(f"{name}: not a state dict: entry {key!r} is a {type(value).__name__}, "
                                  "not a tensor")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _check_finite(sd: Mapping[str, torch.Tensor], name: str) -> None:
    for key, t in sd.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise FileFormatError(f"{name}: tensor {key} holds NaN or Inf values")


def _some(keys: list[str]) -> str:
    more = f", ... ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def _refusal(exc: BaseException) -> str:
    """The reason in torch's weights-only refusal, without its advice to unpickle in full."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
        return reason.split(". Please use", 1)[0].strip()
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
