"""The files of a known-good upgrade (``bctkit demo --upgrade``), made from the glyphs benchmark as a
production system would hold them: a RecordIO training set (insightface's layout), image folders
of held-out identities (the test set, a gallery and its queries), and an "old" production model in
arcface_torch's layout (``model.pt`` and two Partial FC shards ``softmax_fc_gpu_<r>.pt``) trained on
half of every training identity's images. Then ``upgrade.yaml``: the packaged ``upgrade-demo``
config (the README's walk-through) pointed at them.

Everything is written atomically and kept: run again, the files whose recorded inputs match are
reused (the old model is trained once)."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bctkit.data.allocation import allocate
from bctkit.data.datasets import DataConfig, load_data
from bctkit.data.sources.base import DataSource
from bctkit.data.sources.recordio import RecordIOSource
from bctkit.data.sources.recordio_writer import write_insightface
from bctkit.data.transforms import Preprocess, TransformConfig
from bctkit.engine.loader import Feed
from bctkit.errors import ConfigError, FileFormatError
from bctkit.oldside.arcface_torch import write_arcface_torch
from bctkit.run.config import packaged_config
from bctkit.run.keys import run_key
from bctkit.storage import atomic_path, read_json, write_json, write_text
from bctkit.training import train_model
from bctkit.training.config import ModelConfig

OLD_RANKS = 2  # Partial FC shards of the old model, as a 2-GPU arcface_torch run leaves them
GALLERY_PER_ID = 2  # held-out images per identity enrolled in the gallery; the rest are queries


@dataclass(frozen=True)
class ExampleSize:
    """How large the example is: identities and images of the training set and the held-out set,
    the old and new models' training epochs and the new model's batch, and the characters drawn from
    (None: all CJK ideographs, whose font scan the glyphs demo shares; a small range scans in
    seconds)."""

    train_ids: int
    images_per_id: int
    test_ids: int
    test_images_per_id: int
    old_epochs: int
    old_batch: int = 64
    new_epochs: int = 6
    new_batch: int = 128
    char_ranges: tuple[str, ...] | None = None
    glyph_options: tuple[tuple[str, float], ...] = ()  # GlyphsConfig overrides, e.g. milder distortion
    image_size: int = 32  # a multiple of 16 (the iresnets' stride)
    old_share: float = 0.5  # of each training identity's images the old model was trained on


FULL = ExampleSize(train_ids=200, images_per_id=15, test_ids=100, test_images_per_id=10, old_epochs=10)
# The reduced example the tests run (about a minute): few identities, so a small batch for enough
# steps, and milder distortions so that a model learns them in those steps.
QUICK = ExampleSize(train_ids=24, images_per_id=12, test_ids=16, test_images_per_id=6, old_epochs=10,
                    old_batch=16, new_epochs=8, new_batch=16, char_ranges=("4E00-4FFF",),
                    glyph_options=(("occlusion_prob", 0.0), ("noise", 0.0), ("blur", 0.3),
                                   ("rotation_deg", 4.0), ("shear_deg", 4.0), ("stroke_prob", 0.0)))


def old_model_config(epochs: int, batch: int = 64, image_size: int = 32) -> ModelConfig:
    """The production model: arcface_torch's iresnet18 with an ArcFace head, at 32x32 so it trains
    on a CPU; warm-up and clipping are the margin-head defaults, the rate the glyphs demo's."""
    return ModelConfig.model_validate({
        "backbone": {"arch": "iresnet18", "embedding_dim": 128, "image_size": image_size},
        "head": {"type": "arcface", "s": 32, "m": 0.3},
        "train": {"epochs": epochs, "batch_size": batch, "optimizer": {"lr": 0.1}, "seed": 1},
    })


def prepare(out: Path, size: ExampleSize = FULL, *, progress: bool = True,
            log: Callable[[str], None] = print) -> Path:
    """Write the example's data, old model and config under ``out``; returns the config's path."""
    out = Path(out)
    glyphs: dict[str, Any] = {"num_classes": size.train_ids, "images_per_class": size.images_per_id,
                              "size": size.image_size, "min_faces": 15, "seed": 0}
    if size.char_ranges:
        glyphs["char_ranges"] = list(size.char_ranges)
    glyphs.update(dict(size.glyph_options))
    data_cfg = DataConfig.model_validate({"dataset": "glyphs", "glyphs": glyphs,
                                          "eval_classes": size.test_ids,
                                          "eval_images_per_class": size.test_images_per_id})
    data_dir = out / "data"
    inputs = {"glyphs": glyphs, "test": [size.test_ids, size.test_images_per_id]}
    if _recorded(data_dir, inputs) is None:
        _start(data_dir)
        data = load_data(data_cfg, progress=progress)
        log(f"[example] writing {len(data.pool)} training images ({data.pool.num_classes} identities) as "
            f"RecordIO, {len(data.held_out)} held-out images ({data.held_out.num_classes} identities) "
            f"as image folders under {data_dir}")
        _write_recordio(data_dir / "train", data.pool)
        _write_folders(data_dir, data.held_out)
        _record(data_dir, inputs)
    old_dir = out / "old"
    model_cfg = old_model_config(size.old_epochs, size.old_batch, size.image_size)
    old_inputs = {"data": run_key(inputs), "model": model_cfg.model_dump(mode="json"),
                  "share": size.old_share, "ranks": OLD_RANKS}
    if _recorded(old_dir, old_inputs) is None:
        _start(old_dir)
        _train_old(data_dir / "train", old_dir, model_cfg, size.old_share, progress, log)
        _record(old_dir, old_inputs)
    return _write_config(out, size)


def _recorded(folder: Path, inputs: dict[str, Any]) -> str | None:
    """The key of ``inputs`` when ``folder`` was completely written from them, else None."""
    key = run_key(inputs)
    try:
        done = read_json(folder / "written.json")
    except (FileFormatError, OSError):  # absent or unreadable: write it again
        return None
    return key if isinstance(done, dict) and done.get("key") == key else None


def _clear(folder: Path) -> None:
    """Empty a folder of an earlier example (of other sizes) before it is written again, so no file
    of it is left among the new ones; a folder this module did not write is refused, not removed."""
    if not folder.exists():
        return
    if not (folder / "written.json").is_file() and any(folder.iterdir()):
        raise ConfigError(f"{folder} exists and was not written by `bctkit demo --upgrade`; "
                          "choose another --out")
    shutil.rmtree(folder)


def _start(folder: Path) -> None:
    """Claim ``folder`` before writing it: cleared, with a record that says it is incomplete (an
    interrupted write is then cleared and redone by the next run)."""
    _clear(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "written.json", {"key": None})


def _record(folder: Path, inputs: dict[str, Any]) -> None:
    write_json(folder / "written.json", {"key": run_key(inputs), "inputs": inputs})


def _png(image: np.ndarray) -> bytes:
    """One [C, H, W] uint8 image as PNG bytes (grayscale for one channel)."""
    arr = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _write_recordio(folder: Path, source: DataSource) -> None:
    order = np.argsort(source.labels, kind="stable")
    images = [(_png(np.asarray(source.read(int(i)))), int(source.labels[i])) for i in order]
    size = tuple(np.asarray(source.read(0)).shape[1:])
    write_insightface(folder, images, num_classes=source.num_classes, image_size=size)


def _write_folders(data_dir: Path, source: DataSource) -> None:
    """``test/<id>/<k>.png``: every held-out image (the run's evaluation set); ``gallery/`` the first
    :data:`GALLERY_PER_ID` images of each identity and ``queries/`` the others (the gallery steps)."""
    seen: dict[int, int] = {}
    for i, label in enumerate(source.labels.tolist()):
        k = seen[label] = seen.get(label, -1) + 1
        data = _png(np.asarray(source.read(i)))
        name = f"id{label:04d}/{k}.png"
        for part in ("test", "gallery" if k < GALLERY_PER_ID else "queries"):
            path = data_dir / part / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)


def _train_old(train_dir: Path, old_dir: Path, model_cfg: ModelConfig, share: float, progress: bool,
               log: Callable[[str], None]) -> None:
    """Train the production model on ``share`` of every identity's images, as read from the
    RecordIO set, and write it in arcface_torch's layout."""
    source = RecordIOSource(train_dir)
    part = allocate(source.labels, "extended-data", share, seed=666)
    transform = TransformConfig(color="rgb", resize=model_cfg.backbone.input_shape[1])
    feed = Feed(source.subset(part.old_indices, part.old_labels), Preprocess(transform))
    log(f"[example] training the old model (arcface_torch iresnet18, ArcFace) on "
        f"{len(part.old_indices)} images of {source.num_classes} identities")
    result = train_model(feed, model_cfg.backbone, model_cfg.head, model_cfg.train,
                         desc="old (arcface_torch)", progress=progress, log=log)
    model, shards = write_arcface_torch(old_dir, result.backbone.state_dict(), result.head.weight, OLD_RANKS)
    log(f"[example] wrote {model} and {', '.join(p.name for p in shards)}")


def _write_config(out: Path, size: ExampleSize) -> Path:
    """``upgrade.yaml``: the packaged ``upgrade-demo`` config, comments kept, with this example's
    paths in place of ``DEMO`` (and, for a reduced example, its sizes)."""
    text = packaged_config("upgrade-demo").read_text()
    swaps = [("num_classes: 200 ", f"num_classes: {size.train_ids} "),
             ("eval_images_per_class: 10\n", f"eval_images_per_class: {size.test_images_per_id}\n"),
             ("train: {epochs: 6, batch_size: 128,",
              f"train: {{epochs: {size.new_epochs}, batch_size: {size.new_batch},"),
             ("image_size: 32}", f"image_size: {size.image_size}}}"),  # old and new backbones
             ("resize: 32}", f"resize: {size.image_size}}}")]
    for old, new in swaps:
        if text.count(old) != (2 if old.startswith("image_size") else 1):
            raise RuntimeError(f"packaged upgrade-demo.yaml: unexpected count of {old.strip()!r}")
        text = text.replace(old, new)
    path = out / "upgrade.yaml"
    write_text(path, text.replace("DEMO/", f"{out.resolve()}/"))
    return path
