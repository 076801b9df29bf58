"""Preprocessing: how a decoded image becomes a model's input, declared in the config and saved with
every model (its ``preprocessing`` metadata), so that whoever embeds images with the model later
feeds it exactly what it was trained on.

Two stages, split where a GPU wants them split:

1. :class:`Preprocess` (in DataLoader workers, uint8 in, uint8 out): colour (``stored`` | ``rgb`` |
   ``grey``, ITU-R 601-2 luma for grey), ``resize`` to (height, width) with Pillow's bilinear filter
   (antialiased when shrinking), then a centred ``crop``. Batches travel as uint8, four times
   smaller than floats.
2. :meth:`Preprocess.normalize` (on the model's device): ``x / (255 std) - mean / std`` per channel,
   i.e. ``(x / 255 - mean) / std``; the default mean = std = 0.5 maps [0, 255] to [-1, 1]
   (arcface_torch's convention) with the same floating-point operations bctkit always used.

With no transform configured images are used at their stored size and colour, and every image must
have the same; train-time randomness (flip, padded random crop) is each model's ``train.augment``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bctkit.data.sources.base import to_chw
from bctkit.errors import DataError

__all__ = ["Preprocess", "TransformConfig", "augment_batch"]

Size = tuple[int, int]


def _size(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    return value


class TransformConfig(BaseModel):
    """Deterministic preprocessing of every image a model reads (training, old-feature cache,
    extraction, evaluation). ``resize`` / ``crop``: one side (square) or [height, width]."""

    model_config = ConfigDict(extra="forbid")

    color: Literal["stored", "rgb", "bgr", "grey"] = Field(
        "stored", description="stored: as the files are; bgr: RGB with the channels reversed (OpenCV order)")
    resize: Size | None = None
    crop: Size | None = Field(None, description="centred crop after resize")
    mean: list[float] = Field(default_factory=lambda: [0.5], min_length=1, max_length=3,
                              description="per channel (or one for all), in units of 255")
    std: list[float] = Field(default_factory=lambda: [0.5], min_length=1, max_length=3)

    @field_validator("resize", "crop", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        return _size(value)

    @model_validator(mode="after")
    def _check(self) -> TransformConfig:
        for name in ("resize", "crop"):
            size = getattr(self, name)
            if size is not None and min(size) < 1:
                raise ValueError(f"{name} must be positive, got {list(size)}")
        if self.resize and self.crop and (self.crop[0] > self.resize[0] or self.crop[1] > self.resize[1]):
            raise ValueError(f"crop {list(self.crop)} is larger than resize {list(self.resize)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if 1 not in (len(self.mean), len(self.std)) and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values and std {len(self.std)}")
        if self.color == "grey" and max(len(self.mean), len(self.std)) > 1:
            raise ValueError("color: grey has one channel; give one mean and one std")
        return self

    @property
    def channels(self) -> int | None:
        """Channels of the output, when the config fixes them."""
        return {"rgb": 3, "bgr": 3, "grey": 1}.get(self.color)

    @property
    def output_size(self) -> Size | None:
        """(height, width) of the output, when the config fixes it."""
        return self.crop or self.resize


class Preprocess:
    """Callable ``image -> uint8 [C, H, W]`` for one :class:`TransformConfig` (picklable)."""

    def __init__(self, cfg: TransformConfig | None = None) -> None:
        self.cfg = cfg or TransformConfig()
        c = self.cfg
        self.identity = c.color == "stored" and c.resize is None and c.crop is None
        self._mode = {"rgb": "RGB", "bgr": "RGB", "grey": "L"}.get(c.color)

    def __call__(self, img: Image.Image | np.ndarray) -> np.ndarray:
        chw = to_chw(self.image(img))
        return np.ascontiguousarray(chw[::-1]) if self.cfg.color == "bgr" else chw

    def into(self, img: Image.Image | np.ndarray, out: np.ndarray) -> tuple[int, ...]:
        """Preprocess ``img`` straight into ``out`` (uint8 [C, H, W], C-ordered) when its shape is
        out's, and return that shape (out is left alone when it differs): the bytes of ``self(img)``,
        an RGB image copied once instead of twice."""
        img = self.image(img)
        if isinstance(img, Image.Image) and img.mode == "RGB" and out.flags.c_contiguous:
            shape: tuple[int, ...] = (3, img.height, img.width)
            if shape == out.shape:  # Pillow keeps RGB as RGBX: its bytes, channel by channel
                px = np.frombuffer(img.tobytes("raw", "RGBX"), np.uint8).reshape(-1, 4)
                out.reshape(3, -1)[...] = (px[:, 2::-1] if self.cfg.color == "bgr" else px[:, :3]).T
            return shape
        chw = to_chw(img)
        chw = chw[::-1] if self.cfg.color == "bgr" else chw
        if chw.shape == out.shape:
            out[...] = chw
        return chw.shape

    def image(self, img: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        """The colour, resize and crop steps, before the [C, H, W] layout (identity: ``img`` as is)."""
        if self.identity:
            return img
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        if self._mode is not None and img.mode != self._mode:
            img = img.convert(self._mode)
        c = self.cfg
        if c.resize is not None and img.size != (c.resize[1], c.resize[0]):
            img = img.resize((c.resize[1], c.resize[0]), Image.Resampling.BILINEAR)
        if c.crop is not None:
            w, h = img.size
            ch, cw = c.crop
            if ch > h or cw > w:
                raise DataError(f"crop {ch}x{cw} is larger than the {h}x{w} image; set data.transform.resize")
            top, left = (h - ch) // 2, (w - cw) // 2
            img = img.crop((left, top, left + cw, top + ch))
        return img

    def spec(self, input_shape: tuple[int, int, int]) -> dict[str, Any]:
        """The preprocessing as saved with a model: the config plus the [C, H, W] input it yields."""
        return {**self.cfg.model_dump(mode="json"), "input": list(input_shape)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Preprocess:
        """The preprocessing a model was saved with (the inverse of :meth:`spec`)."""
        return cls(TransformConfig(**{k: v for k, v in spec.items() if k != "input"}))

    @classmethod
    def from_card_input(cls, inp: dict[str, Any]) -> Preprocess:
        """The preprocessing an export card's ``input`` section describes (``color``, ``mean`` and
        ``std`` required; ``resize`` and ``crop`` may be absent)."""
        return cls(TransformConfig(color=inp["color"], resize=inp.get("resize"), crop=inp.get("crop"),
                                   mean=inp["mean"], std=inp["std"]))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float32 model input (see the module docstring)."""
        mean, std = _expand(self.cfg.mean, x.shape[1]), _expand(self.cfg.std, x.shape[1])
        scale = torch.tensor([255.0 * s for s in std], dtype=torch.float32, device=x.device)
        shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32,
                             device=x.device)
        return x.float().div_(scale.view(1, -1, 1, 1)).sub_(shift.view(1, -1, 1, 1))


def _expand(values: list[float], channels: int) -> list[float]:
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise DataError(f"data.transform has {len(values)} mean/std values for {channels}-channel images")
    return values


def augment_batch(x: np.ndarray, hflip: bool, crop_pad: int, rng: np.random.Generator, offset: int = 0,
                  total: int | None = None) -> np.ndarray:
    """Train-time augmentation of a uint8 [B, C, H, W] batch: each image mirrored with probability
    1/2, then cropped back to its size at a random offset from a copy padded by ``crop_pad`` pixels
    (edge pixels repeated). Draws depend only on ``rng``, so a batch is the same in any worker.
    ``x`` may be rows ``offset``.. of a batch of ``total`` rows (one rank's share): the draws are made
    for the whole batch and this share's rows taken, so they do not depend on how it is split."""
    n, _, h, w = x.shape
    total = n if total is None else total
    rows_of = slice(offset, offset + n)
    if hflip:
        flip = (rng.random(total) < 0.5)[rows_of]
        x = np.where(flip[:, None, None, None], x[..., ::-1], x)
    if crop_pad:
        p = crop_pad
        padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="edge")
        dy = rng.integers(0, 2 * p + 1, total)[rows_of]
        dx = rng.integers(0, 2 * p + 1, total)[rows_of]
        rows = dy[:, None] + np.arange(h)
        cols = dx[:, None] + np.arange(w)
        x = padded[np.arange(n)[:, None, None, None], np.arange(x.shape[1])[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    return np.ascontiguousarray(x)
