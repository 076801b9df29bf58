#!/usr/bin/env bash
# CUDA checks for the engine, for a machine with a GPU (run from the repository root with the venv's
# python first on PATH, e.g. `PATH=.venv/bin:$PATH bash benchmarks/gpu_check.sh`). Prints what it
# measures; exits non-zero when a check fails. About two minutes on one GPU.
#  1. the CUDA tests (bf16 training on the GPU against the CPU's first step)
#  2. the equivalence check: every seed method trained 8 steps on the GPU (fp32) against the CPU run,
#     per-step loss and final-weight differences
#  3. training images/s of iresnet50 at 112x112 (arcface_torch's standard face backbone), fp32 and bf16
set -euo pipefail
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu:', torch.cuda.get_device_name(0))"
python -m pytest -q tests/engine/test_precision.py -k cuda
tmp=$(mktemp -d)
methods=independent,l2,bct,bct-synth,contrastive,lwf,unibct,mixbct,bt2
(cd "$tmp" && mkdir cpu cuda && OMP_NUM_THREADS=2 python "$OLDPWD/tests/engine/dist_worker.py" cpu $methods \
  && python "$OLDPWD/tests/engine/dist_worker.py" cuda $methods --device cuda)
python - "$tmp" "$methods" <<'PY'
import json, sys
from safetensors.torch import load_file
root, methods = sys.argv[1], sys.argv[2].split(",")
for m in methods:
    a = json.load(open(f"{root}/cpu/{m}.json"))["steps"]; b = json.load(open(f"{root}/cuda/{m}.json"))["steps"]
    first = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-6) for x, y in zip(a[:1], b[:1]) for k in x)
    every = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-6) for x, y in zip(a, b) for k in x)
    wa, wb = load_file(f"{root}/cpu/{m}.safetensors"), load_file(f"{root}/cuda/{m}.safetensors")
    w = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    print(json.dumps({"check": "cuda_vs_cpu", "method": m, "first_step_rel": first, "all_steps_rel": every,
                      "weights_abs": w}))
    assert first < 1e-3, m
PY
python - <<'PY'
import json, time, torch
from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.data.transforms import TransformConfig
from bctkit.models import BackboneConfig, HeadConfig
from bctkit.training import TrainConfig, train_model
data = make_synthetic(SyntheticSpec(num_classes=400, images_per_class=32, size=112, channels=3, seed=0))
bb = BackboneConfig(arch="iresnet50", embedding_dim=512)
for precision in ("fp32", "bf16"):
    cfg = TrainConfig(epochs=2, batch_size=128, device="cuda", precision=precision, optimizer={"lr": 0.05})
    res = train_model(data, bb, HeadConfig(type="arcface"), cfg, progress=False)
    print(json.dumps({"check": "images_per_s", "backbone": "iresnet50 112x112",
                      "precision": precision, "img_s": res.history[-1]["images_per_s"]}))
PY
rm -rf "$tmp"
