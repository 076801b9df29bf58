"""The embedded ``synthetic`` dataset: procedurally generated many-class images, no downloads.

Each class is a random smooth pattern built from a basis shared by all classes (so classes resemble
one another, as faces do) plus class-specific strokes. Each image is the class pattern under a random
nuisance: affine geometry, contrast and brightness, blur-free sensor noise and an occluding patch.
Class ``c``'s images depend only on (seed, c), so a dataset with more classes extends a smaller one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F

from bctkit.data.sources.array import ArraySource
from bctkit.errors import ConfigError

GENERATOR_VERSION = 1
"""Bump when a code change alters the generated pixels (it is part of the dataset's identity)."""


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the generator; the defaults give a benchmark hard enough for methods to differ."""

    num_classes: int = 400
    images_per_class: int = 20
    size: int = 32
    channels: int = 1
    seed: int = 0
    basis: int = 24
    strokes: int = 3
    class_detail: float = 0.45
    rotation_deg: float = 18.0
    scale: float = 0.15
    shift: float = 0.12
    contrast: float = 0.35
    noise: float = 0.18
    occlusion_prob: float = 0.5
    occlusion_max: float = 0.45
    first_class: int = 0

    def __post_init__(self) -> None:
        """Refuse values the generator cannot use, naming the field and its allowed range (they
        would otherwise fail deep inside torch or numpy, or give meaningless images)."""
        for name, low in _INT_MINIMUM.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral) or (low is not None and v < low):
                rule = "an integer" if low is None else f"an integer >= {low}"
                raise ConfigError(f"SyntheticSpec.{name}={v!r}: must be {rule}")
        for name, rule in _NUMBER_RANGE.items():
            v = getattr(self, name)
            ok = isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            if not ok or (rule == "in [0, 1]" and v > 1) or (rule == "in [0, 1)" and v >= 1):
                raise ConfigError(f"SyntheticSpec.{name}={v!r}: must be a number {rule}")


_INT_MINIMUM: dict[str, int | None] = {
    "num_classes": 1, "images_per_class": 1, "size": 4, "channels": 1, "basis": 1, "strokes": 0,
    "first_class": 0, "seed": None,
}
"""Integer fields of :class:`SyntheticSpec` and their smallest allowed value (None: any)."""
_NUMBER_RANGE = {
    "class_detail": ">= 0", "rotation_deg": ">= 0", "shift": ">= 0", "noise": ">= 0", "scale": "in [0, 1)",
    "contrast": "in [0, 1]", "occlusion_prob": "in [0, 1]", "occlusion_max": "in [0, 1]",
}
"""Float fields of :class:`SyntheticSpec` and their allowed range (``scale`` < 1 keeps the zoom
positive, ``contrast`` <= 1 keeps it non-negative)."""


def _smooth_field(gen: torch.Generator, n: int, channels: int, size: int, cutoff: int) -> torch.Tensor:
    """Random low-frequency fields [n, channels, size, size] with unit standard deviation."""
    coarse = torch.randn(n, channels, cutoff, cutoff, generator=gen)
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    field = field - field.mean(dim=(2, 3), keepdim=True)
    return field / field.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def _strokes(gen: torch.Generator, count: int, channels: int, size: int) -> torch.Tensor:
    """A few random anti-aliased line segments, the class's distinctive detail."""
    coords = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    img = torch.zeros(channels, size, size)
    for _ in range(count):
        p0 = torch.rand(2, generator=gen) * 1.4 - 0.7
        p1 = torch.rand(2, generator=gen) * 1.4 - 0.7
        width = 0.05 + 0.08 * float(torch.rand(1, generator=gen))
        sign = 1.0 if float(torch.rand(1, generator=gen)) < 0.5 else -1.0
        d = p1 - p0
        t = (((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / d.dot(d).clamp_min(1e-6)).clamp(0, 1)
        dist = torch.hypot(xx - (p0[0] + t * d[0]), yy - (p0[1] + t * d[1]))
        line = torch.sigmoid((width - dist) * size)
        chan = torch.rand(channels, 1, 1, generator=gen) * 0.5 + 0.5
        img += sign * chan * line
    return img


def _class_patterns(spec: SyntheticSpec, classes: range) -> torch.Tensor:
    basis_gen = torch.Generator().manual_seed(spec.seed * 7919 + 17)
    basis = _smooth_field(basis_gen, spec.basis, spec.channels, spec.size, cutoff=6)
    out = []
    for c in classes:
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + c * 7 + 1)
        coef = torch.randn(spec.basis, generator=gen) / math.sqrt(spec.basis)
        shared = torch.einsum("b,bchw->chw", coef, basis)
        own = _smooth_field(gen, 1, spec.channels, spec.size, cutoff=8)[0]
        pattern = shared + spec.class_detail * own + 1.2 * _strokes(
            gen, spec.strokes, spec.channels, spec.size
        )
        out.append((pattern - pattern.mean()) / pattern.std().clamp_min(1e-6))
    return torch.stack(out)


def _nuisance(spec: SyntheticSpec, pattern: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``images_per_class`` random views of one class pattern, as floats around 0."""
    n, c, s = spec.images_per_class, spec.channels, spec.size
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(spec.rotation_deg)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * spec.scale
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * spec.shift * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, [n, c, s, s], align_corners=False)
    x = F.grid_sample(pattern.expand(n, c, s, s), grid, padding_mode="border", align_corners=False)
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * spec.contrast
    bright = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * 0.3
    x = x * contrast + bright + spec.noise * torch.randn(x.shape, generator=gen)
    occluded = torch.rand(n, generator=gen) < spec.occlusion_prob
    for i in torch.nonzero(occluded).flatten().tolist():
        h = max(2, int(s * spec.occlusion_max * float(torch.rand(1, generator=gen))))
        w = max(2, int(s * spec.occlusion_max * float(torch.rand(1, generator=gen))))
        y0 = int(torch.randint(0, s - h + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, s - w + 1, (1,), generator=gen))
        x[i, :, y0 : y0 + h, x0 : x0 + w] = float(torch.randn(1, generator=gen))
    return x


def make_synthetic(spec: SyntheticSpec) -> ArraySource:
    """Generate the dataset for ``spec``: labels ``first_class .. first_class + num_classes - 1``."""
    classes = range(spec.first_class, spec.first_class + spec.num_classes)
    patterns = _class_patterns(spec, classes)
    images = np.empty(
        (spec.num_classes * spec.images_per_class, spec.channels, spec.size, spec.size), np.uint8
    )
    for j, c in enumerate(classes):
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + c * 7 + 2)
        views = _nuisance(spec, patterns[j : j + 1], gen)
        block = (views * 48 + 128).round().clamp(0, 255).to(torch.uint8).numpy()
        images[j * spec.images_per_class : (j + 1) * spec.images_per_class] = block
    labels = np.repeat(np.arange(spec.num_classes, dtype=np.int64), spec.images_per_class)
    return ArraySource(images, labels, f"synthetic(seed={spec.seed})",
                       identity={"format": "synthetic", "generator": GENERATOR_VERSION, "spec": asdict(spec)})
