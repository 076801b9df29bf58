"""Backbones from outside bctkit: ``timm:<model>`` (needs ``pip install bctkit[timm]``) and
``python:<module>:<factory>`` (any function returning an nn.Module).

Either is held as ``.model`` inside an :class:`AdaptedBackbone`, so its own parameter names appear
under ``model.``; load a plain timm or user state dict with
``load_backbone_weights(backbone.model, path)``. Nothing is downloaded: timm models are built with
``pretrained=False``. At build time the module is run once on a zero batch and must return
[B, embedding_dim].
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from bctkit.errors import ConfigError
from bctkit.models.base import EmbeddingNet
from bctkit.models.config import BackboneConfig


class AdaptedBackbone(EmbeddingNet):
    """An external nn.Module (``.model``) behind bctkit's backbone interface."""

    def __init__(self, cfg: BackboneConfig, model: nn.Module) -> None:
        super().__init__(cfg)
        self.model = model
        _check_output(cfg, model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build_timm(cfg: BackboneConfig) -> AdaptedBackbone:
    """``timm.create_model(name, num_classes=embedding_dim, in_chans=in_channels)``, with ``img_size``
    where the model takes one (ViT-like models) and ``drop_rate`` = ``dropout`` when set."""
    try:
        import timm
    except Exception as exc:  # not installed, or a torchvision build that breaks on import
        raise ConfigError(
            f"backbone {cfg.arch} needs timm, which does not import ({_first_line(exc)}); "
            "pip install bctkit[timm]"
        ) from None
    name = cfg.arch.removeprefix("timm:")
    _, h, w = cfg.input_shape
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": cfg.embedding_dim,
                              "in_chans": cfg.in_channels}
    if cfg.dropout:
        kwargs["drop_rate"] = cfg.dropout
    if not timm.is_model(name):
        raise ConfigError(f"backbone {cfg.arch}: timm has no model {name!r} (timm.list_models() lists them)")
    try:
        model = timm.create_model(name, img_size=(h, w), **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise ConfigError(f"backbone {cfg.arch}: timm.create_model failed ({_first_line(exc)})") from None
        model = timm.create_model(name, **kwargs)  # a model with no fixed input size (convolutional)
    return AdaptedBackbone(cfg, model)


def build_python(cfg: BackboneConfig) -> AdaptedBackbone:
    """Import ``<module>``, call ``<factory>`` with those of ``embedding_dim``, ``in_channels``,
    ``image_size`` (int or (height, width)) and ``dropout`` that it accepts."""
    _, module_name, factory_name = cfg.arch.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"backbone {cfg.arch}: cannot import {module_name} ({_first_line(exc)})"
        ) from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ConfigError(f"backbone {cfg.arch}: {module_name} has no callable {factory_name!r}")
    offered = {"embedding_dim": cfg.embedding_dim, "in_channels": cfg.in_channels,
               "image_size": cfg.image_size, "dropout": cfg.dropout}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_any or k in params}
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ConfigError(
            f"backbone {cfg.arch}: {factory_name}({', '.join(kwargs)}) failed ({_first_line(exc)})"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"backbone {cfg.arch}: {factory_name} returned a {type(model).__name__}, "
                          "not a torch.nn.Module")
    return AdaptedBackbone(cfg, model)


def _check_output(cfg: BackboneConfig, model: nn.Module) -> None:
    """Run ``model`` once in eval mode on two zero images of the configured shape; it must return
    [2, embedding_dim]. Eval mode leaves batch-norm statistics untouched."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *cfg.input_shape))
    except Exception as exc:
        raise ConfigError(
            f"backbone {cfg.arch}: forward on a [2, {', '.join(map(str, cfg.input_shape))}] input failed "
            f"({_first_line(exc)})"
        ) from None
    finally:
        model.train(was_training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, cfg.embedding_dim):
        raise ConfigError(
            f"backbone {cfg.arch}: output is {shape} on a batch of 2, expected (2, {cfg.embedding_dim}) "
            "= [B, embedding_dim]"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
