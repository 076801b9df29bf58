"""Device choice and mixed precision: bad devices are one-line errors, bf16/fp16 train, the fp16
scaler state is checkpointed and a resumed fp16 run equals the uninterrupted one; CUDA checks skip
where there is no GPU."""

import pytest
import torch

from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.engine.device import resolve_device
from bctkit.engine.precision import Precision
from bctkit.errors import ConfigError
from bctkit.models import BackboneConfig, HeadConfig
from bctkit.training import TrainConfig, train_model
from bctkit.training.checkpoint import load_checkpoint

BB = BackboneConfig(arch="r8", width=4, embedding_dim=8, image_size=16)
HEAD = HeadConfig(type="arcface", s=16, m=0.2)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def tiny():
    return make_synthetic(SyntheticSpec(num_classes=6, images_per_class=8, size=16, seed=5))


def _cfg(precision: str, **kw) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=16, optimizer={"name": "sgd", "lr": 0.05}, grad_clip=5.0,
                       precision=precision, device="cpu", **kw)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    for bad in ["gpu", "cpu:1", "cuda:x", "tpu"]:
        with pytest.raises(ConfigError, match="train.device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA"):
            resolve_device("cuda:0")


def test_config_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


def test_autocast_only_in_the_backbone():
    p = Precision("bf16", torch.device("cpu"))
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with p.autocast():
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32
    with Precision("fp32", torch.device("cpu")).autocast():
        assert (a @ b).dtype == torch.float32


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_close_to_fp32(tiny, precision):
    seen: dict[str, list[float]] = {"fp32": [], precision: []}
    for name in seen:
        train_model(tiny, BB, HEAD, _cfg(name), progress=False,
                    on_step=lambda _s, v, name=name: seen[name].append(v["loss"]))
    assert len(seen[precision]) == len(seen["fp32"]) == 6
    first32, first_low = seen["fp32"][0], seen[precision][0]
    assert abs(first32 - first_low) / first32 < 0.05  # same weights, same batch: rounding only
    assert seen[precision] != seen["fp32"]  # autocast was in effect


def test_fp16_scaler_state_checkpointed_and_resume_exact(tmp_path, tiny):
    cfg = _cfg("fp16", checkpoint_every=1)
    full = train_model(tiny, BB, HEAD, cfg, progress=False, checkpoint=tmp_path / "a.safetensors")
    ckpt = tmp_path / "b.safetensors"
    train_model(tiny, BB, HEAD, cfg, progress=False, checkpoint=ckpt, stop_after_step=2, run_id="r")
    modules = {"backbone": full.backbone, "head": full.head}
    meta = load_checkpoint(ckpt, modules, torch.optim.SGD([p for m in modules.values() for p in m.parameters()
                                                            if p.requires_grad], lr=0.1))
    assert meta["scaler"]["scale"] > 0 and "_growth_tracker" in meta["scaler"]
    resumed = train_model(tiny, BB, HEAD, cfg, progress=False, checkpoint=ckpt, resume=True, run_id="r")
    full = train_model(tiny, BB, HEAD, cfg, progress=False)
    for k, v in full.backbone.state_dict().items():
        assert torch.equal(v, resumed.backbone.state_dict()[k]), k


@cuda
def test_cuda_bf16_training_matches_cpu_start(tiny):
    losses: dict[str, list[float]] = {"cpu": [], "cuda": []}
    for dev in losses:
        cfg = TrainConfig(epochs=1, batch_size=16, optimizer={"name": "sgd", "lr": 0.05}, device=dev,
                          precision="bf16" if dev == "cuda" else "fp32")
        res = train_model(tiny, BB, HEAD, cfg, progress=False,
                          on_step=lambda _s, v, dev=dev: losses[dev].append(v["loss"]))
        assert next(res.backbone.parameters()).device.type == dev
    assert abs(losses["cpu"][0] - losses["cuda"][0]) / losses["cpu"][0] < 0.05


def test_run_checks_every_models_device_before_work():
    from bctkit.run.config import load_config, packaged_config
    from bctkit.run.prechecks import check_devices

    with pytest.raises(ConfigError, match="new.train.device: 'gpu'"):
        load_config(packaged_config("synthetic-quick"), ["new.train.device=gpu"])
    if not torch.cuda.is_available():
        cfg = load_config(packaged_config("synthetic-quick"), ["old.train.device=cuda:1"])
        with pytest.raises(ConfigError, match=r"old.train.device='cuda:1' but this machine has no"):
            check_devices(cfg)


def test_partial_fc_needs_a_margin_head_at_load_time():
    from bctkit.run.config import load_config, packaged_config

    with pytest.raises(ConfigError, match="old.train.partial_fc needs a cosine-margin head"):
        load_config(packaged_config("synthetic-quick"),
                    ["old.head.type=softmax", "old.train.partial_fc.shard=true"])
    with pytest.raises(ConfigError, match="sample_rate"):
        load_config(packaged_config("synthetic-quick"), ["new.train.partial_fc.sample_rate=0"])
