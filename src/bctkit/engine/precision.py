"""Mixed precision: autocast for the backbone's forward pass, a gradient scaler for fp16.

Only the backbone runs under autocast. Its features are cast to float32 before the classification
head and the compatibility term, so softmax, log and exp in margin heads and in the contrastive and
distillation terms are always computed in float32 (a bf16 softmax over thousands of classes loses the
target's probability). The fp16 gradient scaler's state is part of every checkpoint, so a resumed run
scales exactly as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch

from bctkit.errors import ConfigError

__all__ = ["Precision", "PrecisionName"]

PrecisionName = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast and gradient scaling for ``name`` on ``device``."""

    def __init__(self, name: PrecisionName, device: torch.device) -> None:
        if name not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision={name!r}; expected fp32, bf16 or fp16")
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no "
                              "bfloat16 support; use fp16")
        self.name, self.device = name, device
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast to the reduced dtype (nothing for fp32)."""
        if self.name == "fp32":
            yield
            return
        with torch.autocast(self.device.type, dtype=_DTYPES[self.name]):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Before clipping: gradients back to their true scale."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        """The optimiser step (skipped by the fp16 scaler when gradients overflowed)."""
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else dict(self.scaler.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
