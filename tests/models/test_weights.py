"""Weights files: safetensors and torch files read as data only, checkpoint unwrapping, strict
matching with skip prefixes, and a one-line FileFormatError for each way a file can be wrong."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bctkit.errors import FileFormatError
from bctkit.models import BackboneConfig, build_backbone
from bctkit.models.weights import load_backbone_weights, load_state_dict_file

UNPICKLED: list[str] = []


class Sneaky:
    """A pickled object whose unpickling would run code: it must never be unpickled."""

    def __reduce__(self):
        return (UNPICKLED.append, ("ran",))


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone(BackboneConfig(arch="r8", width=4, image_size=16, embedding_dim=8))


def _fails(source, match: str, module: nn.Module | None = None, **kw) -> str:
    with pytest.raises(FileFormatError, match=match) as err:
        load_backbone_weights(module if module is not None else _net(1), source, **kw)
    assert "\n" not in str(err.value)
    return str(err.value)


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_safetensors_and_torch_files(tmp_path):
    src = _net(0)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    for name in ["w.safetensors", "w.pt", "ckpt.pth"]:
        dst = _net(1)
        assert not _same(src, dst)
        load_backbone_weights(dst, tmp_path / name)
        assert _same(src, dst), name
    assert set(load_state_dict_file(tmp_path / "ckpt.pth")) == set(sd)


def test_arcface_torch_training_checkpoint(tmp_path):
    """arcface_torch's checkpoint_gpu_<rank>.pt: the backbone beside the Partial FC shard, the
    optimizer and the scheduler, read with weights_only=True."""
    src = _net(0)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 4, "global_step": 1200, "state_dict_backbone": sd,
                "state_dict_softmax_fc": {"weight": torch.randn(7, 4)},
                "state_optimizer": opt.state_dict(), "state_lr_scheduler": {"last_epoch": 1200}},
               tmp_path / "checkpoint_gpu_0.pt")
    dst = _net(1)
    load_backbone_weights(dst, tmp_path / "checkpoint_gpu_0.pt")
    assert _same(src, dst)


def test_state_dict_source_and_skip():
    src, dst = _net(0), _net(1)
    fc_before = dst.fc.weight.detach().clone()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    _fails(sd, r"2 missing key\(s\): fc.weight, fc.bias")
    load_backbone_weights(dst, sd, skip=("fc.",))
    assert torch.equal(dst.fc.weight, fc_before)
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)


def test_missing_and_unexpected_keys():
    sd = _net(0).state_dict()
    msg = _fails({k: v for k, v in sd.items() if not k.startswith("stages.0.")},
                 r"state dict: does not fit ResNet \(24 missing key\(s\): stages.0.body.0.weight, "
                 r".*\(19 more\)\)")
    assert "unexpected" not in msg
    renamed = {k.replace("stem.", "conv_stem."): v for k, v in sd.items()}
    _fails(renamed, r"7 missing key\(s\): stem.0.weight.*; 7 unexpected key\(s\): conv_stem.0.weight")


@pytest.mark.parametrize("file_arch, config_arch, message", [
    ("iresnet18", "iresnet50", "the file holds an iresnet18 (layers 2-2-2-2); the config says iresnet50 "
                               "(layers 3-4-14-3)"),
    ("iresnet34", "iresnet18", "the file holds an iresnet34 (layers 3-4-6-3); the config says iresnet18 "
                               "(layers 2-2-2-2)"),
    ("resnet50", "resnet101", "the file holds a resnet50 (layers 3-4-6-3); the config says resnet101 "
                              "(layers 3-4-23-3)")])
def test_a_depth_mismatch_names_the_depth_of_the_file(tmp_path, file_arch, config_arch, message):
    """Counted from the layer blocks of the file's keys (layerS.N.*), not a list of hundreds of keys."""
    kw = {"image_size": 112} if file_arch.startswith("iresnet") else {}
    src = build_backbone(BackboneConfig(arch=file_arch, **kw)).state_dict()
    torch.save(src, tmp_path / "model.pt")
    module = build_backbone(BackboneConfig(arch=config_arch, **kw))
    err = _fails(tmp_path / "model.pt", "does not fit", module)
    assert err.startswith(f"{tmp_path / 'model.pt'}: {message}")
    assert len(err) < 400


def test_shape_mismatch(tmp_path):
    sd = _net(0).state_dict()
    sd["fc.weight"] = torch.zeros(9, sd["fc.weight"].shape[1])
    torch.save(sd, tmp_path / "w.pt")
    _fails(tmp_path / "w.pt", r"w.pt: fc.weight has shape \[9, 64\], ResNet expects \[8, 64\]")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_is_named(tmp_path, bad):
    sd = _net(0).state_dict()
    sd["stages.1.body.1.weight"][0, 0, 0, 0] = bad
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    _fails(tmp_path / "w.safetensors", "w.safetensors: tensor stages.1.body.1.weight holds NaN or Inf")
    _fails(sd, "state dict: tensor stages.1.body.1.weight holds NaN or Inf")


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    UNPICKLED.clear()
    torch.save({"model": Sneaky()}, tmp_path / "sneaky.pt")
    msg = _fails(tmp_path / "sneaky.pt",
                 r"sneaky.pt: not a plain state dict: torch.load\(weights_only=True\) refused it "
                 r"\(Unsupported global: GLOBAL ")
    assert "weights_only` set to `False`" not in msg  # torch's advice to unpickle in full is not passed on
    assert UNPICKLED == []  # never fell back to full unpickling
    torch.save(_net(0), tmp_path / "whole-model.pt")
    _fails(tmp_path / "whole-model.pt", "whole-model.pt: not a plain state dict")


def test_files_that_are_not_state_dicts(tmp_path):
    _fails(tmp_path / "absent.pt", "absent.pt: no such file")
    (tmp_path / "w.onnx").write_bytes(b"x")
    _fails(tmp_path / "w.onnx", "unknown weights format '.onnx'")
    (tmp_path / "junk.pt").write_bytes(b"not a zip file at all")
    _fails(tmp_path / "junk.pt", "junk.pt: not a readable torch file")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _fails(tmp_path / "junk.safetensors", "junk.safetensors: not a readable safetensors file")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    _fails(tmp_path / "list.pt", "list.pt: holds a list, not a state dict")
    torch.save({"w": torch.zeros(2), "epoch": 3}, tmp_path / "mixed.pt")
    _fails(tmp_path / "mixed.pt", "mixed.pt: not a state dict: entry 'epoch' is a int")
