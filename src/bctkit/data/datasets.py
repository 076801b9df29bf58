"""Dataset configuration and loading: a training pool plus a held-out set of evaluation identities.

``data.dataset`` names the format; a section of the same name says where the data is::

    data: {dataset: imagefolder, imagefolder: {root: /data/faces}}
    data: {dataset: list, list: {file: /data/train.txt}}   # optional root: where its paths are
    data: {dataset: recordio, recordio: {path: /data/ms1mv3}}
    data: {dataset: cifar, cifar: {root: /data/cifar, variant: cifar100, split: train}}
    data: {dataset: imagenet_val, imagenet_val: {root: /data/val, labels: LOC_val_solution.csv,
                                                 synsets: LOC_synset_mapping.txt}}
    data: {dataset: gldv2, gldv2: {root: /data/gldv2}}     # root/train/a/b/c/<id>.jpg + train_clean.csv

Evaluation (test) and validation identities never appear in training. They come from a separate
source (``data.eval`` / ``data.validation``, same pattern), or from a seeded identity split of the
training source: the embedded ``synthetic`` and ``glyphs`` sets generate them apart, and a file
source holds out ``eval_classes`` (and ``validation_classes``) identities drawn by ``split_seed``
among those with at least ``eval_images_per_class`` images, each contributing its first
``eval_images_per_class`` images. A separate source is used whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from bctkit.data.glyphs import GlyphsConfig, load_glyphs
from bctkit.data.noise import flip_labels
from bctkit.data.screening import drop_corrupt, drop_small_identities
from bctkit.data.sources.base import DataSource
from bctkit.data.sources.cifar import CifarConfig, CifarSource
from bctkit.data.sources.gldv2 import GLDv2Config, GLDv2Source
from bctkit.data.sources.imagefolder import ImageFolderConfig, ImageFolderSource, image_extensions
from bctkit.data.sources.imagenet import ImageNetValConfig, ImageNetValSource
from bctkit.data.sources.listfile import ListConfig, ListSource
from bctkit.data.sources.recordio import RecordIOConfig, RecordIOSource
from bctkit.data.synthetic import SyntheticSpec, make_synthetic
from bctkit.data.transforms import TransformConfig
from bctkit.data.workers import auto_workers
from bctkit.errors import ConfigError, DataError

Split = Literal["test", "validation"]
FileFormat = Literal["imagefolder", "list", "recordio", "cifar", "imagenet_val", "gldv2"]
_OPENERS: dict[str, tuple[str, Callable[[Any], DataSource]]] = {  # format: (config example, opener)
    "imagefolder": ("{root: DIR}", lambda s: ImageFolderSource(s.root)),
    "list": ("{file: FILE}", lambda s: ListSource(s.file, root=s.root)),
    "recordio": ("{path: DIR}", lambda s: RecordIOSource(s.path, s.prefix)),
    "cifar": ("{root: DIR, split: train}",
              lambda s: CifarSource(s.root, s.variant, s.form, s.labels, s.split)),
    "imagenet_val": ("{root: DIR, labels: FILE, synsets: FILE}",
                     lambda s: ImageNetValSource(s.root, s.labels, s.synsets, s.train)),
    "gldv2": ("{root: DIR}", lambda s: GLDv2Source(s.root, s.csv)),
}
FILE_FORMATS: tuple[str, ...] = tuple(_OPENERS)


class SyntheticConfig(BaseModel):
    """Options of the embedded synthetic dataset (see :class:`SyntheticSpec` for their meaning)."""

    model_config = ConfigDict(extra="forbid")

    num_classes: int = Field(400, ge=2, description="identities in the training pool")
    images_per_class: int = Field(20, ge=1)
    size: int = Field(32, ge=8, le=256)
    channels: Literal[1, 3] = 1
    seed: int = 0
    noise: float = Field(0.18, ge=0)
    rotation_deg: float = Field(18.0, ge=0)
    occlusion_prob: float = Field(0.5, ge=0, le=1)
    class_detail: float = Field(0.45, ge=0)


def _check_section(obj: BaseModel, dataset: str, where: str) -> None:
    """The section named by ``dataset`` is given (file formats) and no other file section is."""
    for fmt in FILE_FORMATS:
        given = getattr(obj, fmt) is not None
        if fmt == dataset and not given:
            raise ValueError(f"{where}dataset is {fmt}: set {where}{fmt}: {_OPENERS[fmt][0]}")
        if fmt != dataset and given:
            raise ValueError(f"{where}{fmt} is set but {where}dataset is {dataset}")


class SourceConfig(BaseModel):
    """A dataset on disk: ``{dataset: FORMAT, FORMAT: {...}}`` (the separate evaluation or
    validation set)."""

    model_config = ConfigDict(extra="forbid")

    dataset: FileFormat
    imagefolder: ImageFolderConfig | None = None
    list: ListConfig | None = None
    recordio: RecordIOConfig | None = None
    cifar: CifarConfig | None = None
    imagenet_val: ImageNetValConfig | None = None
    gldv2: GLDv2Config | None = None

    @model_validator(mode="after")
    def _one_section(self) -> SourceConfig:
        _check_section(self, self.dataset, "")
        return self

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}

    def open(self) -> DataSource:
        return open_file_source(self.dataset, getattr(self, self.dataset))


def open_file_source(fmt: str, section: Any) -> DataSource:
    """Open the file dataset of format ``fmt`` described by its config ``section``."""
    return _OPENERS[fmt][1](section)


def open_dataset(path: str | os.PathLike[str]) -> DataSource:
    """The dataset at ``path``: a RecordIO folder (``train.rec`` + ``train.idx``, or the one
    ``<prefix>.rec`` / ``.idx`` pair it holds; or the .rec / .idx file itself), an image folder
    (``root/<identity>/<image>``) or a ``path label`` list file."""
    p = Path(path).expanduser()
    if p.is_dir():
        pairs = sorted(r.stem for r in p.glob("*.rec") if r.with_suffix(".idx").is_file())
        if pairs:
            prefix = "train" if "train" in pairs else pairs[0]
            if len(pairs) > 1 and prefix != "train":
                raise DataError(f"{p}: holds several RecordIO sets {pairs}; name one (DATA/<prefix>.rec)")
            return open_file_source("recordio", RecordIOConfig(path=str(p), prefix=prefix))
        if any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(p)):
            return open_file_source("imagefolder", ImageFolderConfig(root=str(p)))
        raise DataError(f"{p}: not a dataset folder: no identity subfolders (root/<identity>/<image>) and "
                        "no RecordIO pair (train.rec + train.idx)")
    if not p.is_file():
        raise DataError(f"{p}: data not found (an image folder, a 'path label' list file or a RecordIO "
                        "folder)")
    if p.suffix in (".rec", ".idx"):
        return open_file_source("recordio", RecordIOConfig(path=str(p.parent), prefix=p.stem))
    if p.suffix.lower() in image_extensions():
        raise DataError(f"{p}: one image; DATA is an image folder, a 'path label' list file or a RecordIO "
                        "folder")
    return open_file_source("list", ListConfig(file=str(p)))


class DataConfig(BaseModel):
    """The training pool, the evaluation identities (never used in training: open-set), and how
    images are read (preprocessing, loader workers)."""

    model_config = ConfigDict(extra="forbid")

    dataset: Literal["synthetic", "glyphs", "imagefolder", "list", "recordio", "cifar", "imagenet_val",
                     "gldv2"] = "synthetic"
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    glyphs: GlyphsConfig = Field(default_factory=GlyphsConfig)
    imagefolder: ImageFolderConfig | None = None
    list: ListConfig | None = None
    recordio: RecordIOConfig | None = None
    cifar: CifarConfig | None = None
    imagenet_val: ImageNetValConfig | None = None
    gldv2: GLDv2Config | None = None
    eval: SourceConfig | None = Field(None, description="separate test identities (default: a split)")
    validation: SourceConfig | None = Field(None, description="separate validation identities")
    eval_classes: int = Field(100, ge=2)
    eval_images_per_class: int = Field(10, ge=2)
    label_noise: float = Field(0.0, ge=0, lt=1, description=(
        "share of training-pool images relabelled to a uniformly drawn other class (symmetric label "
        "noise, a robustness study); evaluation identities are never touched"))
    label_noise_seed: int = Field(0, ge=0)
    validation_classes: int = Field(0, ge=0, description=(
        "identities kept apart from training and from the test identities, with "
        "eval_images_per_class images each, for choosing settings (evaluation.split: validation) "
        "without looking at the test set"))
    split_seed: int = Field(0, description="file datasets: seed of the test / validation identity split")
    min_images: int = Field(1, ge=1, description=(
        "file datasets: drop identities with fewer images from the training source"))
    skip_corrupt: bool = Field(False, description=(
        "file datasets: find undecodable images once (cached) and leave them out, instead of "
        "stopping at the first; the report counts them"))
    transform: TransformConfig = Field(default_factory=TransformConfig)
    num_workers: int | Literal["auto"] = Field("auto", description=(
        "DataLoader worker processes; auto: none for the in-memory synthetic and glyphs sets, "
        "else the usable CPUs (at most 8)"))
    pin_memory: bool | None = Field(None, description="page-locked batches; None: when CUDA is used")

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        _check_section(self, self.dataset, "data.")
        if isinstance(self.num_workers, int) and self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 or 'auto', got {self.num_workers}")
        if not self.is_file and (self.eval or self.validation):
            which = "eval" if self.eval else "validation"
            raise ValueError(f"data.{which} (a separate source) needs a file dataset; {self.dataset} "
                             "generates its own held-out identities")
        return self

    @model_serializer(mode="wrap")
    def _drop_unused(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Dumps leave out the sections of datasets not in use, and options at values that did not
        exist before (label noise, validation identities) when unused."""
        data = handler(self)
        for name in ("synthetic", "glyphs", *FILE_FORMATS):
            if name != self.dataset:
                data.pop(name, None)
        for name in ("eval", "validation"):
            if data.get(name) is None:
                data.pop(name, None)
        if self.label_noise == 0:
            data.pop("label_noise", None)
            data.pop("label_noise_seed", None)
        if self.validation_classes == 0:
            data.pop("validation_classes", None)
        return data

    @property
    def is_file(self) -> bool:
        return self.dataset in FILE_FORMATS

    @property
    def channels(self) -> int | None:
        """Channels of the images models see, when the config decides them."""
        if self.transform.channels is not None:
            return self.transform.channels
        if self.is_file:
            return None
        return self.synthetic.channels if self.dataset == "synthetic" else 1

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) of the images models see, when the config decides it."""
        size = self.transform.output_size
        if size is not None:
            return (int(size[0]), int(size[1]))
        if self.is_file:
            return None
        side = self.synthetic.size if self.dataset == "synthetic" else self.glyphs.size
        return (side, side)

    def workers(self) -> int:
        """DataLoader workers for this dataset (``num_workers`` resolved)."""
        if self.num_workers == "auto":
            return auto_workers() if self.is_file else 0
        return int(self.num_workers)


@dataclass
class LoadedData:
    """The training pool, the held-out evaluation set, and what loading left out (for reports)."""

    pool: DataSource
    held_out: DataSource
    notes: dict[str, Any] = field(default_factory=dict)


def load_datasets(cfg: DataConfig, progress: bool = True, split: Split = "test"
                  ) -> tuple[DataSource, DataSource]:
    """(training pool, evaluation set); see :func:`load_data`."""
    data = load_data(cfg, progress, split)
    return data.pool, data.held_out


def load_data(cfg: DataConfig, progress: bool = True, split: Split = "test") -> LoadedData:
    """The training pool and the evaluation set (no evaluation identity is in the pool): the test
    identities, or with ``split="validation"`` the ``validation_classes`` identities kept apart
    from both (for choosing settings); see the module docstring for where they come from.
    ``label_noise`` relabels a share of the pool's images (:func:`bctkit.data.noise.flip_labels`);
    held-out identities are never touched."""
    if split == "validation" and cfg.validation is None and cfg.validation_classes < 2:
        raise ConfigError(f"data.validation_classes={cfg.validation_classes}: the validation split needs "
                          "at least 2 identities")
    data = _load_files(cfg, progress, split) if cfg.is_file else _load_embedded(cfg, progress, split)
    if cfg.label_noise == 0:
        return data
    pool = data.pool
    noisy, flipped = flip_labels(pool.labels, cfg.label_noise, cfg.label_noise_seed,
                                 int(pool.labels.max()) + 1)
    name = f"{pool.name}, {len(flipped)} of {len(pool)} labels flipped (seed {cfg.label_noise_seed})"
    data.pool = pool.subset(None, noisy)
    data.pool.name = name
    return data


def _load_embedded(cfg: DataConfig, progress: bool, split: Split) -> LoadedData:
    if cfg.dataset == "glyphs":
        pool, held = load_glyphs(cfg.glyphs, cfg.eval_classes, cfg.eval_images_per_class, progress=progress,
                                 validation_classes=cfg.validation_classes, split=split)
        return LoadedData(pool, held)
    syn = cfg.synthetic
    known = {f.name for f in fields(SyntheticSpec)}
    common = {k: v for k, v in syn.model_dump().items() if k in known}
    pool = make_synthetic(SyntheticSpec(**common))
    test = split == "test"
    held_out = make_synthetic(
        SyntheticSpec(
            **{**common, "num_classes": cfg.eval_classes if test else cfg.validation_classes,
               "images_per_class": cfg.eval_images_per_class},
            first_class=syn.num_classes if test else syn.num_classes + cfg.eval_classes,
        )
    )
    pool.name = f"synthetic train pool (seed {syn.seed})"
    held_out.name = f"synthetic {'eval' if test else split} (seed {syn.seed})"
    return LoadedData(pool, held_out)


def _load_files(cfg: DataConfig, progress: bool, split: Split) -> LoadedData:
    notes: dict[str, Any] = {}
    source = open_file_source(cfg.dataset, getattr(cfg, cfg.dataset))
    if cfg.skip_corrupt:
        source = drop_corrupt(source, cfg.workers(), progress, notes)
    if cfg.min_images > 1:
        source = drop_small_identities(source, cfg.min_images, notes)
    n_test = 0 if cfg.eval is not None else cfg.eval_classes
    n_val = 0 if cfg.validation is not None else cfg.validation_classes
    pool_idx, test_idx, val_idx = identity_split(source.labels, n_test, n_val, cfg.eval_images_per_class,
                                                 cfg.split_seed, source.name)
    pool = source.subset(pool_idx)
    pool.name = f"{source.name} training pool"
    separate = cfg.eval if split == "test" else cfg.validation
    if separate is not None:
        held_out = separate.open()
        if cfg.skip_corrupt:
            held_out = drop_corrupt(held_out, cfg.workers(), progress, notes, key=f"{split}_")
    else:
        held_out = source.subset(test_idx if split == "test" else val_idx)
        held_out.name = f"{source.name} {split} identities (split seed {cfg.split_seed})"
    return LoadedData(pool, held_out, notes)


def identity_split(labels: np.ndarray, n_test: int, n_val: int, per_class: int, seed: int, name: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training pool, test, validation) image indices of one labelled source, in source order.

    Candidates for held-out identities are those with at least ``per_class`` images; a seeded
    permutation of them gives test its tail and validation its head, so changing one count leaves
    the other set as it was. A held-out identity contributes its first ``per_class`` images; every
    image of the other identities is in the pool."""
    classes, counts = np.unique(labels, return_counts=True)
    eligible = classes[counts >= per_class]
    if n_test + n_val > len(eligible):
        raise DataError(
            f"{name}: {len(eligible)} identities have >= {per_class} images (eval_images_per_class), "
            f"but the split needs {n_test} test + {n_val} validation identities; lower eval_classes / "
            "validation_classes or eval_images_per_class, or give a separate data.eval source")
    order = np.random.default_rng(seed).permutation(len(eligible))
    test_ids = eligible[order[len(eligible) - n_test:]] if n_test else eligible[:0]
    val_ids = eligible[order[:n_val]]
    if n_test + n_val >= len(classes):
        raise DataError(f"{name}: holding out {n_test + n_val} of its {len(classes)} identities leaves "
                        "none to train on")

    def first_images(ids: np.ndarray) -> np.ndarray:
        idx = np.flatnonzero(np.isin(labels, ids))
        if not len(idx):
            return idx
        lab = labels[idx]
        order_in = np.argsort(lab, kind="stable")
        sorted_lab = lab[order_in]
        starts = np.flatnonzero(np.r_[True, sorted_lab[1:] != sorted_lab[:-1]])
        rank = np.arange(len(idx)) - np.repeat(starts, np.diff(np.r_[starts, len(idx)]))
        keep = np.zeros(len(idx), dtype=bool)
        keep[order_in] = rank < per_class
        return idx[keep]

    pool = np.flatnonzero(~np.isin(labels, np.concatenate([test_ids, val_ids])))
    return pool, first_images(test_ids), first_images(val_ids)

