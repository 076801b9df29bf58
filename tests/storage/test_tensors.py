"""Tensor files: a failed save is a one-line error and leaves nothing; a round trip keeps tensors and
metadata."""

import errno
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from bctkit.errors import FileFormatError
from bctkit.storage import load_tensors, save_tensors
from bctkit.storage import tensors as tensor_files


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError("Error while serializing: IoError")])
def test_failed_tensor_save_is_one_line_error_and_leaves_nothing(tmp_path, monkeypatch, error):
    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(tensor_files, "save_file", full_disk)
    target = tmp_path / "models" / "old.safetensors"
    with pytest.raises(FileFormatError, match=r"models/old\.safetensors: could not write") as exc:
        save_tensors(target, {"w": torch.ones(2)}, {"a": 1})
    assert "\n" not in str(exc.value)
    assert list(target.parent.iterdir()) == []


def test_tensor_files_round_trip(tmp_path):
    save_tensors(tmp_path / "t.safetensors", {"w": torch.arange(4.0)}, {"k": [1, 2]})
    tensors, meta = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(tensors["w"], torch.arange(4.0)) and meta == {"k": [1, 2]}
