"""Backbone registry and config: existing configs dump (and fingerprint) exactly as before, arch names
are checked at load time, family defaults and conflicting options, input_shape."""

import json

import pytest
import torch
from pydantic import ValidationError

from bctkit.models import BackboneConfig, ResNet, build_backbone
from bctkit.models.base import EmbeddingNet
from bctkit.models.bt2 import BT2Net
from bctkit.models.config import (
    FAMILIES,
    IRESNET_ARCHS,
    RESNET_ARCHS,
    SMALL_ARCHS,
    VIT_ARCHS,
    BT2Layout,
    known_archs,
)
from bctkit.models.iresnet import IRESNET_LAYERS
from bctkit.models.registry import BUILDERS
from bctkit.models.resnet import RESNET_LAYERS
from bctkit.models.small_resnet import DEPTHS
from bctkit.models.store import fingerprint
from bctkit.models.vit import VIT_SIZES


def test_existing_dumps_are_unchanged():
    assert BackboneConfig().model_dump() == {
        "arch": "r14", "width": 16, "in_channels": 1, "image_size": 32, "embedding_dim": 128, "dropout": 0.0,
    }
    cfg = BackboneConfig(arch="r8", width=8, image_size=16, embedding_dim=12, bt2=BT2Layout(old_dim=10, k=6))
    assert cfg.model_dump() == {
        "arch": "r8", "width": 8, "in_channels": 1, "image_size": 16, "embedding_dim": 12, "dropout": 0.0,
        "bt2": {"old_dim": 10, "k": 6, "C": 2.0},
    }
    # the bytes the model store hashes and writes, key order included
    assert json.dumps(BackboneConfig().model_dump()) == (
        '{"arch": "r14", "width": 16, "in_channels": 1, "image_size": 32, "embedding_dim": 128, '
        '"dropout": 0.0}'
    )


@pytest.mark.parametrize(("kwargs", "vectorised", "generic"), [
    ({}, "98e12a50a4b2394c", "f022ba360b572820"),
    ({"arch": "r8", "width": 8, "image_size": 16, "embedding_dim": 12},
     "1d6145ac14c1d4f6", "fa5bf002d5ad0519"),
    ({"arch": "r18", "width": 4, "in_channels": 3, "image_size": 32, "embedding_dim": 16, "dropout": 0.1},
     "09c169ea3212dbbe", "9fb3f2a112f18d2b"),
    ({"arch": "r8", "width": 4, "image_size": 16, "embedding_dim": 12, "bt2": BT2Layout(old_dim=10, k=6)},
     "652070a53db79a07", "0e4e79b45678ed7f"),
])
def test_existing_fingerprints_are_unchanged(kwargs, vectorised, generic):
    """Seeded builds hash as they did before the registry (values computed with the code of commit
    a73ea2d; torch is pinned, so its initialisation draws the same numbers). BT^2's since its
    orthonormal starting bases stopped coming from LAPACK, whose QR differs between CPUs (its
    earlier value was 8e5b479642646153 on one CPU, 5569c8137942abdc on another).

    torch's float32 ``normal_`` and ``uniform_`` (every conv and linear initialisation) round
    differently in its generic CPU kernels, which it uses only on x86-64 CPUs without AVX2 (or with
    ATEN_CPU_CAPABILITY=default), than in its AVX2 and AVX512 kernels, which agree: so the seeded
    weights, hence the fingerprints, have one value per kind of kernel. Checked with
    ATEN_CPU_CAPABILITY=default, avx2 and avx512 and with MKL_CBWR=COMPATIBLE."""
    torch.manual_seed(0)
    expected = generic if torch.backends.cpu.get_cpu_capability() == "DEFAULT" else vectorised
    assert fingerprint(build_backbone(BackboneConfig(**kwargs))) == expected


def test_known_names_and_unknown_arch():
    names = known_archs()
    for name in ["r8", "r14", "r20", "r18", "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200",
                 "resnet18", "resnet34", "resnet50", "resnet101", "vit_tiny", "vit_small"]:
        assert name in names
    with pytest.raises(ValidationError, match=r"unknown arch 'resnet19'; known: r8, .*iresnet50.*vit_small"):
        BackboneConfig(arch="resnet19")


def test_family_tables_agree_with_config_names():
    """Each family module keys its layer table by the names config lists, and the registry builds
    every family config lists."""
    assert tuple(DEPTHS) == SMALL_ARCHS
    assert tuple(IRESNET_LAYERS) == IRESNET_ARCHS
    assert tuple(RESNET_LAYERS) == RESNET_ARCHS
    assert tuple(VIT_SIZES) == VIT_ARCHS
    assert set(BUILDERS) == {f.name for f in FAMILIES}


@pytest.mark.parametrize("arch", ["timm:convnext_tiny", "timm:vit_small_patch16_224.augreg_in21k",
                                  "python:mypkg.nets:make_net", "python:m:f"])
def test_external_forms_validate_without_importing(arch):
    assert BackboneConfig(arch=arch).arch == arch


@pytest.mark.parametrize("arch", ["timm:", "timm:hf-hub:org/model", "python:mod", "python:mod:",
                                  "python:a b:f", "python:1mod:f"])
def test_malformed_external_forms(arch):
    with pytest.raises(ValidationError, match="malformed"):
        BackboneConfig(arch=arch)


def test_family_defaults():
    ir = BackboneConfig(arch="iresnet50")
    assert (ir.input_shape, ir.embedding_dim, ir.width, ir.patch_size) == ((3, 112, 112), 512, None, None)
    assert ir.model_dump() == {"arch": "iresnet50", "in_channels": 3, "image_size": 112, "embedding_dim": 512,
                               "dropout": 0.0}
    rn = BackboneConfig(arch="resnet18", in_channels=1, embedding_dim=64)
    assert (rn.input_shape, rn.embedding_dim) == ((1, 224, 224), 64)
    vt = BackboneConfig(arch="vit_small")
    assert (vt.input_shape, vt.patch_size) == ((3, 224, 224), 16)
    assert BackboneConfig(arch="r20").width == 16


def test_image_size_forms():
    cfg = BackboneConfig(arch="resnet18", image_size=[256, 128])
    assert cfg.input_shape == (3, 256, 128)
    assert BackboneConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert BackboneConfig(arch="resnet18", image_size=[96, 96]).image_size == 96  # one square, one form
    assert BackboneConfig(image_size=[24, 24]).model_dump() == BackboneConfig(image_size=24).model_dump()
    with pytest.raises(ValidationError, match="r14 takes square images"):
        BackboneConfig(image_size=[32, 16])
    for bad, message in [([112], "give one int"), ([64, 32, 3], "give one int"), ("big", "give one int"),
                         (True, "give one int"), (4, "between 8 and 1024"),
                         ([64, 2048], "between 8 and 1024")]:
        with pytest.raises(ValidationError, match=message) as err:
            BackboneConfig(arch="resnet18", image_size=bad)
        assert len(err.value.errors()) == 1 and err.value.errors()[0]["loc"] == ("image_size",)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"arch": "iresnet50", "image_size": 120}, "image_size=120"),
    ({"arch": "iresnet18", "image_size": [112, 96]}, "image_size="),
    ({"arch": "resnet50", "patch_size": 16}, "patch_size=16"),
    ({"arch": "iresnet50", "patch_size": 8}, "patch_size=8"),
    ({"arch": "resnet18", "width": 32}, "width=32"),
    ({"arch": "vit_tiny", "width": 8}, "width=8"),
    ({"arch": "vit_tiny", "image_size": 120}, "patch_size=16"),
    ({"arch": "vit_tiny", "image_size": 64, "patch_size": 12}, "patch_size=12"),
])
def test_conflicting_options(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        BackboneConfig(**kwargs)


def test_default_width_on_another_family_is_dropped():
    """A config merged onto a dumped r* one carries width 16; it means nothing to other families."""
    merged = {**BackboneConfig().model_dump(), "arch": "resnet18"}
    cfg = BackboneConfig(**merged)
    assert cfg.width is None and "width" not in cfg.model_dump()
    assert cfg.input_shape == (1, 32, 32)  # the merged keys win over the family defaults


def test_every_backbone_shares_the_interface():
    small = build_backbone(BackboneConfig(arch="r8", width=4, image_size=16, embedding_dim=8))
    assert isinstance(small, ResNet) and isinstance(small, EmbeddingNet)
    wide = build_backbone(BackboneConfig(arch="resnet18", image_size=32, embedding_dim=8,
                                         bt2=BT2Layout(old_dim=6, k=4)))
    assert isinstance(wide, BT2Net) and isinstance(wide, EmbeddingNet)
    assert type(wide.net).__name__ == "TorchvisionResNet"
    for net, d in ((small, 8), (wide, 10)):
        net.eval()
        x = torch.randn(2, *net.config.input_shape)
        e = net(x)
        assert net.embedding_dim == d and e.shape == (2, d)
        assert torch.equal(net.forward_train(x)[1], e)
