#!/usr/bin/env bash
# The one script to run on a machine with a GPU (from the repository root, the venv's python first on
# PATH: `PATH=.venv/bin:$PATH bash benchmarks/gpu_check.sh`). Every check prints one JSON line; the
# script exits non-zero when a check fails. Planned to take under ten minutes on one GPU:
#  1. the CUDA tests (bf16 training on the GPU against the CPU's first step)
#  2. every seed method trained 8 steps on the GPU (fp32) against the same run on the CPU: per-step loss
#     and final-weight differences (first step within 1e-3 relative)
#  3. training images/s of iresnet50 at 112x112 (arcface_torch's face backbone), fp32 and bf16, to hold
#     against insightface's published per-GPU rate
#  4. bctkit's trainer against a plain PyTorch loop on the GPU (benchmarks/bench_vs_plain_loop.py)
#  5. the loader's images/s at 8 workers (decode + preprocess of 112x112 JPEGs; no GPU needed)
# --dry-run runs the same steps on the CPU at toy sizes (two methods, r8 at 32x32, 2 loader workers),
# so that CI keeps the script working without a GPU; its numbers mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; elif [[ $# -gt 0 ]]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
if (( DRY )); then
  DEVICE=cpu METHODS=independent,bct ARCH=r8 SIZE=32 CLASSES=8 PER=16 BATCH=16 WORKERS=2 IMAGES=64
  PLAIN=(--small --images 32 --only r8@32 --device cpu --threads 1)
else
  DEVICE=cuda METHODS=independent,l2,bct,bct-synth,contrastive,lwf,unibct,mixbct,bt2 ARCH=iresnet50 SIZE=112
  CLASSES=400 PER=32 BATCH=128 WORKERS=8 IMAGES=8000
  PLAIN=(--rounds 3 --images 1024 --device cuda --threads 8)
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
fi
export DEVICE METHODS ARCH SIZE CLASSES PER BATCH WORKERS IMAGES DRY
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. CUDA tests (skipped, not failed, on a machine without CUDA: the dry run checks the invocation)
python -m pytest -q -p no:cacheprovider tests/engine/test_precision.py -k cuda > "$tmp/pytest.txt" || {
  cat "$tmp/pytest.txt"; exit 1; }
python - "$tmp/pytest.txt" <<'PY'
import json, sys
last = open(sys.argv[1]).read().strip().splitlines()[-1]
print(json.dumps({"check": "cuda_tests", "summary": last}))
PY

# 2. every method: the GPU run against the CPU run (dry run: the CPU against itself)
mkdir "$tmp/cpu" "$tmp/dev"
OMP_NUM_THREADS=2 python tests/engine/dist_worker.py "$tmp/cpu" "$METHODS" > /dev/null
python tests/engine/dist_worker.py "$tmp/dev" "$METHODS" --device "$DEVICE" > /dev/null
python - "$tmp" <<'PY'
import json, os, sys
from safetensors.torch import load_file
root = sys.argv[1]
for m in os.environ["METHODS"].split(","):
    a = json.load(open(f"{root}/cpu/{m}.json"))["steps"]
    b = json.load(open(f"{root}/dev/{m}.json"))["steps"]
    first = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-6) for x, y in zip(a[:1], b[:1]) for k in x)
    every = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-6) for x, y in zip(a, b) for k in x)
    wa, wb = load_file(f"{root}/cpu/{m}.safetensors"), load_file(f"{root}/dev/{m}.safetensors")
    w = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    print(json.dumps({"check": "device_vs_cpu", "device": os.environ["DEVICE"], "method": m,
                      "first_step_rel": first, "all_steps_rel": every, "weights_abs": w}))
    assert first < 1e-3, m
PY

# 3. training images/s of the face backbone, fp32 and bf16
python - <<'PY'
import json, os
from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.models import BackboneConfig, HeadConfig
from bctkit.training import TrainConfig, train_model
e = os.environ
data = make_synthetic(SyntheticSpec(num_classes=int(e["CLASSES"]), images_per_class=int(e["PER"]),
                                    size=int(e["SIZE"]), channels=3, seed=0))
extra = {"width": 8} if e["ARCH"].startswith("r") and not e["ARCH"].startswith("resnet") else {}
bb = BackboneConfig(arch=e["ARCH"], in_channels=3, image_size=int(e["SIZE"]), embedding_dim=512, **extra)
for precision in ("fp32", "bf16"):
    cfg = TrainConfig(epochs=2, batch_size=int(e["BATCH"]), device=e["DEVICE"], precision=precision,
                      optimizer={"lr": 0.05})
    res = train_model(data, bb, HeadConfig(type="arcface"), cfg, progress=False)
    print(json.dumps({"check": "images_per_s", "device": e["DEVICE"], "backbone": f"{e['ARCH']} {e['SIZE']}px",
                      "precision": precision, "batch": int(e["BATCH"]), "img_s": res.history[-1]["images_per_s"],
                      "reference": "insightface arcface_torch: compare with its published per-GPU rate"}))
PY

# 4. the trainer against a plain PyTorch loop
python benchmarks/bench_vs_plain_loop.py "${PLAIN[@]}"

# 5. the loader at WORKERS workers on JPEG files
python - "$tmp/jpg" <<'PY'
import json, os, sys
sys.path.insert(0, "benchmarks")
from pathlib import Path
from bench_loader import loader, make_folder
from bctkit.data.sources import ImageFolderSource
from bctkit.data.transforms import TransformConfig
e = os.environ
root = Path(sys.argv[1])
make_folder(root, int(e["IMAGES"]), identities=50)
rate = loader(ImageFolderSource(root), int(e["WORKERS"]), TransformConfig(color="rgb"), 64)[0]
print(json.dumps({"check": "loader_images_per_s", "workers": int(e["WORKERS"]), "images": int(e["IMAGES"]),
                  "img_s": round(rate, 1)}))
PY
echo '{"check": "done", "dry_run": '"$DRY"'}'
