"""Trains every seed method for a few steps on a tiny synthetic set and writes what happened, so tests
can compare a torchrun run with N processes against one process (``python dist_worker.py`` or
``torchrun --nproc_per_node=N dist_worker.py``).

    dist_worker.py OUT METHODS [--stop-after-step K] [--resume] [--precision P] [--shard-head]

Writes (rank 0) ``OUT/<method>.json`` (per-step loss values, history) and
``OUT/<method>.safetensors`` (final backbone, head and term weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.engine.compute import Engine
from bctkit.engine.distributed import close_process_group, is_main
from bctkit.features import iter_features
from bctkit.losses import CompatContext, build_term
from bctkit.models import BackboneConfig, HeadConfig
from bctkit.models.factory import build_backbone
from bctkit.models.heads import build_head
from bctkit.models.store import freeze
from bctkit.storage import save_tensors
from bctkit.training import TrainConfig, train_model

BB = BackboneConfig(arch="r8", width=4, embedding_dim=16, image_size=16)
HEAD = HeadConfig(type="arcface", s=16, m=0.2)
OLD_BB = BackboneConfig(arch="r8", width=4, embedding_dim=12, image_size=16)
PARAMS: dict[str, dict] = {
    "independent": {},
    "l2": {},
    "bct": {"new_classes": "ignore"},
    "bct-synth": {"new_classes": "synthesize"},
    "contrastive": {"tau": 0.1},
    "lwf": {},
    "unibct": {"prototypes": "refined", "warmup_epochs": 1, "rebuild_every": 1},
    "mixbct": {"mix_ratio": 0.5, "dim_rule": "pad"},
    "bt2": {"k": 8},
}


def features(model: torch.nn.Module, data) -> torch.Tensor:
    """Every row in this process (no sharding), so all ranks hold identical cached features."""
    return torch.cat([f for _, f in iter_features(model, data, 64, progress=False)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("methods")
    ap.add_argument("--stop-after-step", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--shard-head", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--local-bn", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine = Engine.create(args.device)
    out = Path(args.out)
    data = make_synthetic(SyntheticSpec(num_classes=8, images_per_class=8, size=16, seed=3))
    labels = torch.from_numpy(data.labels)
    torch.manual_seed(11)
    old = freeze(build_backbone(OLD_BB))
    old_head = freeze(build_head(HEAD, OLD_BB.embedding_dim, 6))
    new_to_old = torch.tensor([0, 1, 2, 3, 4, 5, -1, -1])
    old_feats = features(old, data)
    paragon = freeze(build_backbone(BB))
    paragon_feats = features(paragon, data)
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer={"name": "sgd", "lr": 0.05},
                      schedule={"name": "cosine", "warmup_epochs": 0.5}, grad_clip=5.0, seed=7,
                      augment={"hflip": True, "crop_pad": 2}, precision=args.precision,
                      checkpoint_every=2, partial_fc={"shard": args.shard_head}, device=args.device,
                      batchnorm="local" if args.local_bn else "global")
    for method in args.methods.split(","):
        term = None if method == "independent" else build_term(method.split("-")[0], PARAMS[method])
        ctx = CompatContext(
            old_embedding_dim=OLD_BB.embedding_dim, new_embedding_dim=BB.embedding_dim, num_new_classes=8,
            new_to_old=new_to_old, train_labels=labels, old_train_feats=old_feats, old_model=old,
            old_head=old_head, train_images=data, paragon_train_feats=paragon_feats,
        )
        backbone = BB if term is None else term.backbone_config(BB, OLD_BB.embedding_dim)
        steps: list[dict[str, float]] = []
        result = train_model(data, backbone, HEAD, cfg, term=term, ctx=None if term is None else ctx,
                             checkpoint=out / f"{method}.ckpt.safetensors", resume=args.resume,
                             run_id=method, progress=False, stop_after_step=args.stop_after_step,
                             init_seed=5, engine=engine,
                             on_step=lambda step, values, steps=steps: steps.append({"step": step, **values}))
        if is_main():
            tensors = {f"backbone.{k}": v for k, v in result.backbone.state_dict().items()}
            tensors.update({f"head.{k}": v for k, v in result.head.state_dict().items()})
            save_tensors(out / f"{method}.safetensors", tensors, {})
            (out / f"{method}.json").write_text(json.dumps({"steps": steps, "history": result.history}))
    np.save(out / f"done-{engine.rank}.npy", np.zeros(1))
    close_process_group()  # as the CLI does: a gloo group left to the interpreter's exit can abort it


if __name__ == "__main__":
    main()
