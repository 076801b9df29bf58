"""Checkpoints: round trip, and a checksum of every tensor so that corrupt bytes under an intact
header are refused on load instead of training on garbage."""

import json
import struct

import pytest
import torch
from torch import nn

from bctkit.errors import FileFormatError
from bctkit.storage import load_tensors, save_tensors
from bctkit.training.checkpoint import checkpoint_run_id, load_checkpoint, save_checkpoint


def _model_and_opt(seed: int) -> tuple[dict[str, nn.Module], torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    half = nn.Linear(3, 2).to(torch.bfloat16)
    opt = torch.optim.Adam([*net.parameters(), *half.parameters()], lr=0.1)
    loss = net(torch.randn(5, 4)).sum() + half(torch.randn(5, 3, dtype=torch.bfloat16)).float().sum()
    loss.backward()
    opt.step()  # Adam's state: 0-dim 'step' tensors and moment buffers
    return {"net": net, "half": half}, opt


def _save(path) -> dict[str, nn.Module]:
    modules, opt = _model_and_opt(0)
    save_checkpoint(path, modules, opt, {"run_id": "r1", "epoch": 1})
    return modules


def _data_start(path) -> int:
    raw = path.read_bytes()
    return 8 + struct.unpack("<Q", raw[:8])[0]


def test_round_trip_restores_weights_and_optimizer(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    saved = _save(path)
    modules, opt = _model_and_opt(1)
    meta = load_checkpoint(path, modules, opt)
    assert meta["run_id"] == "r1" and meta["epoch"] == 1
    for key in saved:
        for a, b in zip(saved[key].state_dict().values(), modules[key].state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert checkpoint_run_id(path) == "r1"
    assert json.loads(path.with_suffix(".json").read_text()) == {"run_id": "r1", "epoch": 1}


@pytest.mark.parametrize("where", ["first", "last"])
def test_corrupt_tensor_bytes_are_refused(tmp_path, where):
    path = tmp_path / "ckpt.safetensors"
    _save(path)
    raw = bytearray(path.read_bytes())
    pos = _data_start(path) if where == "first" else len(raw) - 1
    raw[pos] ^= 0x5A
    path.write_bytes(bytes(raw))
    assert checkpoint_run_id(path) == "r1"  # the header is intact
    modules, opt = _model_and_opt(1)
    with pytest.raises(FileFormatError,
                       match=r"ckpt\.safetensors: checkpoint is corrupt \(checksum mismatch\)"):
        load_checkpoint(path, modules, opt)


def test_checkpoints_without_checksums_still_load(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    _save(path)
    tensors, meta = load_tensors(path)
    assert "checksums" in meta
    del meta["checksums"]
    save_tensors(path, tensors, meta)  # as bctkit wrote them before checksums
    modules, opt = _model_and_opt(1)
    assert load_checkpoint(path, modules, opt)["run_id"] == "r1"
