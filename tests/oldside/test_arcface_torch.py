"""Writing arcface_torch's layout (model.pt + softmax_fc_gpu_<r>.pt): what the importer reads back."""

import pytest
import torch

from bctkit.models import BackboneConfig, build_backbone
from bctkit.oldside.arcface_torch import write_arcface_torch
from bctkit.oldside.classifier import load_classifier
from bctkit.oldside.config import ClassifierConfig, OldConfig
from bctkit.oldside.external import checkpoint_backbone
from tests.oldside.test_classifier import arcface_ranges


def test_files_are_arcface_torch_state_dicts_split_as_partial_fc(tmp_path):
    net = build_backbone(BackboneConfig(arch="iresnet18", embedding_dim=16, image_size=32))
    classifier = torch.randn(7, 16)
    model, shards = write_arcface_torch(tmp_path, net.state_dict(), classifier, ranks=3)
    assert [p.name for p in shards] == ["softmax_fc_gpu_0.pt", "softmax_fc_gpu_1.pt", "softmax_fc_gpu_2.pt"]
    sd = torch.load(model, weights_only=True)
    ref = net.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], v) for k, v in ref.items())
    for path, (start, count) in zip(shards, arcface_ranges(7, 3), strict=True):
        part = torch.load(path, weights_only=True)
        assert list(part) == ["weight"] and torch.equal(part["weight"], classifier[start:start + count])
    assert not list(tmp_path.glob("*.tmp*"))


def test_the_importer_reads_back_the_same_model(tmp_path):
    cfg = BackboneConfig(arch="iresnet18", embedding_dim=16, image_size=32)
    net = build_backbone(cfg).eval()
    classifier = torch.randn(5, 16)
    model, shards = write_arcface_torch(tmp_path, net.state_dict(), classifier, ranks=2)
    head = {"weights": [str(p) for p in shards], "num_classes": 5, "label_map": "identity"}
    old = OldConfig.model_validate({"source": "checkpoint", "backbone": cfg.model_dump(),
                                    "weights": str(model), "classifier": head})
    back = checkpoint_backbone(old, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))
    assert torch.equal(load_classifier(ClassifierConfig(weights=[str(p) for p in shards],
                                                        label_map="identity"), 16), classifier)


def test_more_ranks_than_classes_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"at least 4 classes for 4 ranks"):
        write_arcface_torch(tmp_path, {}, torch.zeros(3, 2), ranks=4)
