"""The engine a model is trained and run with: device, precision and this process's place among
torchrun's processes. Training, the old-feature cache and extraction all take one, so a CPU run, a
GPU run and a torchrun run are the same code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bctkit.engine import distributed as D
from bctkit.engine.device import resolve_device
from bctkit.engine.loader import Batch
from bctkit.engine.precision import Precision, PrecisionName
from bctkit.errors import ConfigError

__all__ = ["Engine"]


@dataclass
class Engine:
    """Device + precision; the world (ranks) is the process group's, read when needed."""

    device: torch.device
    precision: Precision

    @classmethod
    def create(cls, device: str = "auto", precision: PrecisionName = "fp32", field: str = "train.device"
               ) -> Engine:
        """Resolve ``device`` for this process and join torchrun's process group when launched with
        several processes. ``field`` names the device option in errors."""
        dev = resolve_device(device, D.local_rank(), D.launched_world(), field=field)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        D.init_from_env(dev)
        return cls(dev, Precision(precision, dev))

    def with_precision(self, name: PrecisionName) -> Engine:
        return Engine(self.device, Precision(name, self.device))

    @property
    def world(self) -> int:
        return D.world_size()

    @property
    def rank(self) -> int:
        return D.rank()

    @property
    def is_main(self) -> bool:
        return D.is_main()

    def local_batch(self, batch: Batch) -> Batch:
        """This rank's share of a global training batch (the whole batch in one process)."""
        if self.world == 1:
            return batch
        n = len(batch.indices)
        if n % self.world:
            raise ConfigError(
                f"a training batch of {n} images cannot be split evenly over {self.world} processes; "
                f"make train.batch_size (and the training set, if smaller) a multiple of {self.world}")
        per = n // self.world
        return batch.share(self.rank * per, (self.rank + 1) * per)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` (the trainable modules only) wrapped for data parallelism under several
        processes; as is in one process. Buffers are not broadcast per step: every rank computes
        the same ones (BatchNorm statistics are global, see :mod:`bctkit.engine.batchnorm`)."""
        if self.world == 1 or not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
