"""Old-to-new feature transformations: FCT's h(old [, side]) -> new and FastFill's uncertainty.

FCT (Ramanujan et al., CVPR 2022) maps a stored old embedding, optionally with a small side-information
vector stored beside it, into the new model's space with an MLP, so a gallery is upgraded without
reading an image. FastFill (Jaeckle et al., ICLR 2023) lets h also predict how far off each of its
outputs is likely to be, so the items worst served by h are re-embedded first.

The network follows FCT's ``MLP_BN_SIDE_PROJECTION`` (and keeps its module names ``p1``, ``p2``,
``mixer``, ``conv``, ``normalizer``): two blocks widen the old embedding to 2 x new, two the side
information, and a mixer of ``inner_dim`` units maps their concatenation to the new embedding. FCT's
1x1 convolutions over a 1x1 map are linear layers here. With ``uncertainty`` the mixer has one more
output: log sigma^2, the log of the predicted per-coordinate squared error.

A transformation file is safetensors (weights) plus JSON metadata: its own fingerprint and those of
the old, new and side models it was trained between. A gallery version made by it is
:func:`composed_fingerprint` (h's fingerprint composed with the old version's).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from bctkit.errors import DataError, FileFormatError
from bctkit.storage import load_tensors, save_tensors, write_json

FORMAT = "bctkit-transformation"


class TransformationConfig(BaseModel):
    """The shape of h: embedding sizes, side-information size (0: none), inner width, uncertainty."""

    model_config = ConfigDict(extra="forbid")

    old_dim: int = Field(ge=1)
    new_dim: int = Field(ge=1)
    side_dim: int = Field(0, ge=0)
    inner_dim: int = Field(2048, ge=1)
    uncertainty: bool = True


class _Block(nn.Module):
    """Linear -> BatchNorm -> ReLU (FCT's ConvBlock on a 1x1 map); the last block of the mixer is
    linear only."""

    def __init__(self, d_in: int, d_out: int, plain: bool = False) -> None:
        super().__init__()
        self.conv = nn.Linear(d_in, d_out, bias=plain)
        self.normalizer = None if plain else nn.BatchNorm1d(d_out)
        self.activation = None if plain else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.normalizer is not None:
            x = self.activation(self.normalizer(x))
        return x


class Transformation(nn.Module):
    """h: (old [N, d_o], side [N, d_s] or None) -> (new [N, d_n], log sigma^2 [N] or None)."""

    def __init__(self, config: TransformationConfig) -> None:
        super().__init__()
        c = self.config = config
        self.p1 = nn.Sequential(_Block(c.old_dim, 2 * c.old_dim), _Block(2 * c.old_dim, 2 * c.new_dim))
        self.p2 = (nn.Sequential(_Block(c.side_dim, 2 * c.side_dim), _Block(2 * c.side_dim, 2 * c.new_dim))
                   if c.side_dim else None)
        mixed = (4 if c.side_dim else 2) * c.new_dim
        self.mixer = nn.Sequential(_Block(mixed, c.inner_dim), _Block(c.inner_dim, c.inner_dim),
                                   _Block(c.inner_dim, c.new_dim + int(c.uncertainty), plain=True))

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.p1(old)
        if self.p2 is not None:
            if side is None:
                raise DataError(f"transformation: takes {self.config.side_dim}-d side information; "
                                "none given")
            x = torch.cat([x, self.p2(side)], dim=1)
        out = self.mixer(x)
        if self.config.uncertainty:
            return out[:, :-1], out[:, -1]
        return out, None


def transformation_fingerprint(h: Transformation) -> str:
    """Hash of h's configuration and every weight and buffer."""
    d = hashlib.sha256(json.dumps(h.config.model_dump(), sort_keys=True).encode())
    for name, t in sorted(h.state_dict().items()):
        d.update(name.encode())
        d.update(t.detach().cpu().contiguous().numpy().tobytes())
    return d.hexdigest()[:16]


def composed_fingerprint(h_fingerprint: str, old_fingerprint: str) -> str:
    """The embedding function h(old(x)): the gallery version a transformation writes."""
    return hashlib.sha256(f"{h_fingerprint}(o){old_fingerprint}".encode()).hexdigest()[:16]


@dataclass
class LoadedTransformation:
    """A frozen transformation and its metadata (``old_fingerprint``, ``new_fingerprint``,
    ``side_fingerprint``, ``name``, ``target``, ``history``)."""

    net: Transformation
    meta: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def old_fingerprint(self) -> str:
        return str(self.meta["old_fingerprint"])

    @property
    def version(self) -> str:
        """The gallery version of h(old) vectors."""
        return composed_fingerprint(self.fingerprint, self.old_fingerprint)

    @property
    def config(self) -> TransformationConfig:
        return self.net.config

    @torch.no_grad()
    def apply(self, old: np.ndarray | torch.Tensor, side: np.ndarray | torch.Tensor | None = None,
              batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray | None]:
        """(h(old) float32 [N, d_n], log sigma^2 float32 [N] or None) in batches; the input's width
        must be the old model's (and the side model's)."""
        x = torch.as_tensor(np.asarray(old, dtype=np.float32) if not isinstance(old, torch.Tensor) else old,
                            dtype=torch.float32)
        c = self.config
        if x.ndim != 2 or x.shape[1] != c.old_dim:
            raise DataError(f"transformation {self.fingerprint}: expected old vectors [N, {c.old_dim}], "
                            f"got {list(x.shape)}")
        s = None if side is None else torch.as_tensor(np.asarray(side, dtype=np.float32), dtype=torch.float32)
        if c.side_dim and (s is None or s.shape != (x.shape[0], c.side_dim)):
            raise DataError(f"transformation {self.fingerprint}: expected side information "
                            f"[{x.shape[0]}, {c.side_dim}], got {None if s is None else list(s.shape)}")
        outs, logs = [], []
        for i in range(0, x.shape[0], batch_size):
            y, lv = self.net(x[i:i + batch_size], None if s is None else s[i:i + batch_size])
            outs.append(y)
            if lv is not None:
                logs.append(lv)
        y = torch.cat(outs) if outs else torch.zeros(0, c.new_dim)
        lv = (torch.cat(logs) if logs else torch.zeros(0)) if c.uncertainty else None
        return y.numpy(), None if lv is None else lv.numpy()


def save_transformation(path: Path, h: Transformation, meta: dict[str, Any]) -> str:
    """Write ``path`` (safetensors) and ``path.json``; returns h's fingerprint."""
    fp = transformation_fingerprint(h)
    full = {**meta, "format": FORMAT, "fingerprint": fp, "config": h.config.model_dump(),
            "version": composed_fingerprint(fp, str(meta["old_fingerprint"]))}
    save_tensors(path, dict(h.state_dict()), full)
    write_json(Path(path).with_suffix(".json"), full)
    return fp


def load_transformation(path: str | Path) -> LoadedTransformation:
    """Load and check a transformation saved by :func:`save_transformation` (frozen, eval mode)."""
    path = Path(path)
    if path.is_dir():
        path = path / "transform.safetensors"
    tensors, meta = load_tensors(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FileFormatError(f"{path}: not a bctkit transformation file (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    try:
        h = Transformation(TransformationConfig(**meta["config"]))
        h.load_state_dict(tensors)
        old_fp = str(meta["old_fingerprint"])
    except (KeyError, TypeError, ValidationError, RuntimeError) as exc:
        first = str(exc).splitlines()[0]
        raise FileFormatError(f"{path}: not a bctkit transformation file ({first})") from None
    if transformation_fingerprint(h) != meta.get("fingerprint"):
        raise FileFormatError(f"{path}: weights do not match the fingerprint in the metadata")
    if meta.get("version") != composed_fingerprint(str(meta["fingerprint"]), old_fp):
        raise FileFormatError(f"{path}: its version is not its fingerprint composed with the old model's")
    h.eval()
    h.requires_grad_(False)
    return LoadedTransformation(h, meta)
