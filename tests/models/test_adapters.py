"""External backbones: python:<module>:<factory> (keywords it accepts, the output check, one-line
errors), timm:<model> (skipped where timm does not import; the missing-timm error everywhere)."""

import sys

import pytest
import torch
from torch import nn

from bctkit.errors import ConfigError
from bctkit.models import BackboneConfig, build_backbone
from bctkit.models.adapters import AdaptedBackbone
from bctkit.models.weights import load_backbone_weights

HERE = "python:tests.models.test_adapters"
CALLS: list[dict] = []


def pooled_linear(embedding_dim: int, in_channels: int) -> nn.Module:
    """A factory taking two of the offered keywords."""
    CALLS.append({"embedding_dim": embedding_dim, "in_channels": in_channels})
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(in_channels * 4, embedding_dim))


def takes_everything(**kwargs) -> nn.Module:
    CALLS.append(kwargs)
    c, d = kwargs["in_channels"], kwargs["embedding_dim"]
    return nn.Sequential(nn.Conv2d(c, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, d))


def wrong_width(embedding_dim: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(embedding_dim + 1))


def not_a_module() -> str:
    return "resnet"


def broken(embedding_dim: int) -> nn.Module:
    raise RuntimeError("no GPU here\nsecond line")


def _cfg(factory: str, **kw) -> BackboneConfig:
    base = {"in_channels": 1, "image_size": 16, "embedding_dim": 8}
    return BackboneConfig(arch=f"{HERE}:{factory}", **{**base, **kw})


def test_python_factory_gets_the_keywords_it_accepts():
    CALLS.clear()
    net = build_backbone(_cfg("pooled_linear"))
    assert isinstance(net, AdaptedBackbone)
    assert CALLS == [{"embedding_dim": 8, "in_channels": 1}]
    assert set(net.state_dict()) == {"model.2.weight", "model.2.bias"}
    x = torch.randn(3, 1, 16, 16)
    assert net(x).shape == (3, 8) and net.embedding_dim == 8
    assert torch.equal(net.forward_train(x)[1], net(x))

    CALLS.clear()
    net = build_backbone(_cfg("takes_everything", image_size=[16, 24], dropout=0.1))
    assert CALLS == [{"embedding_dim": 8, "in_channels": 1, "image_size": (16, 24), "dropout": 0.1}]
    assert net.training and net.model.training  # the build-time check ran in eval mode, then restored
    bn = net.model[1]
    assert int(bn.num_batches_tracked) == 0  # ... and so left the BN statistics alone


def test_plain_state_dict_loads_into_the_wrapped_model():
    a, b = build_backbone(_cfg("pooled_linear")), build_backbone(_cfg("pooled_linear"))
    load_backbone_weights(b.model, a.model.state_dict())
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize(("factory", "message"), [
    ("wrong_width", r"output is \(2, 9\) on a batch of 2, expected \(2, 8\)"),
    ("not_a_module", "returned a str, not a torch.nn.Module"),
    ("broken", r"broken\(embedding_dim\) failed \(RuntimeError: no GPU here\)"),
    ("missing", "has no callable 'missing'"),
])
def test_python_factory_errors(factory, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_backbone(_cfg(factory))
    assert "\n" not in str(err.value)


def test_python_module_that_does_not_import():
    with pytest.raises(ConfigError, match="cannot import no_such_pkg.nets") as err:
        build_backbone(BackboneConfig(arch="python:no_such_pkg.nets:make"))
    assert "\n" not in str(err.value)


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install bctkit\[timm\]") as err:
        build_backbone(BackboneConfig(arch="timm:resnet18"))
    assert "\n" not in str(err.value)


def _timm_imports() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:  # absent, or its torchvision dependency breaks on import
        return False
    return True


@pytest.mark.skipif(not _timm_imports(), reason="timm does not import here")
def test_timm_model():
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(arch="timm:resnet18", in_channels=1, image_size=64, embedding_dim=16))
    assert net.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 16)
    vit = build_backbone(BackboneConfig(arch="timm:vit_tiny_patch16_224", image_size=32, embedding_dim=16))
    assert vit.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    with pytest.raises(ConfigError, match="timm has no model"):
        build_backbone(BackboneConfig(arch="timm:no_such_model_xyz"))
