"""``imagenet_val``: the ImageNet-1k (ILSVRC2012) validation images in one flat folder
(``val/ILSVRC2012_val_00000001.JPEG`` ...) with their labels in a separate file.

The training set, ``train/<synset>/...``, is an ``imagefolder`` source (class ids = the sorted synset
folders), and so is a validation set already sorted into synset folders. A flat folder is labelled
by one of:

- the devkit's ``ILSVRC2012_validation_ground_truth.txt``: line k holds the ILSVRC2012_ID (1..1000)
  of image ``ILSVRC2012_val_<k>``. These ids are not the sorted synsets' positions (id 1 is
  n02119789, kit fox), so the synsets come from the devkit's ``data/map_clsloc.txt`` (lines
  ``n02119789 1 kit_fox``: synset, ILSVRC2012_ID, name). The devkit's ``meta.mat`` holds the same
  table, but it is a MATLAB file and reading it would need scipy; map_clsloc.txt is its text form.
- Kaggle's ``LOC_val_solution.csv`` (header ``ImageId,PredictionString``; the prediction string
  starts with the synset: ``n01751748 73 1 441 363 ...``) with ``LOC_synset_mapping.txt`` (lines
  ``n01440764 tench, Tinca tinca``) or map_clsloc.txt.

Class ids are the positions of the synsets in the sorted list of the mapping file's synsets, which is
the training folders' order; with ``train`` given, its class folders are checked to be exactly those
synsets. Every image in the folder must be labelled and every label must name an image there: a
missing or extra one is a one-line DataError naming the file (and line). Images are in file-name
order; :meth:`ImageNetValSource.label_name` gives the synset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from bctkit.data.sources.base import PathSource, PathTable
from bctkit.data.sources.imagefolder import image_extensions
from bctkit.errors import DataError

__all__ = ["ImageNetValConfig", "ImageNetValSource", "read_synsets"]

_SYNSET = re.compile(r"n\d{8}")
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d+)")
_CLSLOC = "'n02119789 1 kit_fox' (synset, ILSVRC2012_ID, name: the devkit's data/map_clsloc.txt)"


class ImageNetValConfig(BaseModel):
    """``data.imagenet_val`` / ``data.eval.imagenet_val``."""

    model_config = ConfigDict(extra="forbid")

    root: str
    labels: str
    synsets: str
    train: str | None = None


def _read_text(path: Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: not found ({what})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_synsets(path: Path, need_ids: bool) -> tuple[list[str], dict[int, str]]:
    """(synsets in file order, ILSVRC2012_ID -> synset) of a mapping file: map_clsloc.txt lines
    ``synset id name`` or LOC_synset_mapping.txt lines ``synset name`` (no ids). ``need_ids``: every
    line must give an id."""
    synsets: list[str] = []
    ids: dict[int, str] = {}
    seen: dict[str, int] = {}
    id_line: dict[int, int] = {}
    for lineno, raw in enumerate(_read_text(path, "imagenet_val.synsets"), 1):
        parts = raw.split()
        if not parts:
            continue
        if not _SYNSET.fullmatch(parts[0]):
            raise DataError(f"{path}:{lineno}: expected a synset such as n01440764 first, got "
                            f"{raw.strip()!r}")
        synset = parts[0]
        if synset in seen:
            raise DataError(f"{path}:{lineno}: synset {synset} is listed again (first on line "
                            f"{seen[synset]})")
        seen[synset] = lineno
        synsets.append(synset)
        if len(parts) >= 2 and parts[1].isascii() and parts[1].isdigit():
            ilsvrc = int(parts[1])
            if ilsvrc in id_line:
                raise DataError(f"{path}:{lineno}: ILSVRC2012_ID {ilsvrc} is listed again (first on line "
                                f"{id_line[ilsvrc]})")
            id_line[ilsvrc] = lineno
            ids[ilsvrc] = synset
        elif need_ids:
            raise DataError(f"{path}:{lineno}: expected {_CLSLOC}, got {raw.strip()!r}; the devkit's ground "
                            "truth gives ILSVRC2012_IDs, which only that table turns into synsets")
    if not synsets:
        raise DataError(f"{path}: no synsets")
    return synsets, ids


def _check_train(train: Path, synsets: list[str], mapping: Path) -> None:
    """The class folders of ``train`` are exactly the mapping's synsets; else name one that differs."""
    if not train.is_dir():
        raise DataError(f"{train}: training folder not found (imagenet_val.train)")
    folders = {e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith(".")}
    extra, missing = sorted(folders - set(synsets)), sorted(set(synsets) - folders)
    if extra:
        raise DataError(f"{train}: class folder {extra[0]} is not a synset of {mapping} ({len(extra)} such); "
                        "class ids would not match the training folders'")
    if missing:
        raise DataError(f"{train}: has no class folder {missing[0]}, a synset of {mapping} ({len(missing)} "
                        "missing); class ids would not match the training folders'")


def _val_images(root: Path) -> dict[str, str]:
    """Image file name stem -> file name, of the images directly in ``root``."""
    if not root.is_dir():
        raise DataError(f"{root}: validation folder not found (imagenet_val.root)")
    exts = image_extensions()
    stems: dict[str, str] = {}
    for e in os.scandir(root):
        stem, ext = os.path.splitext(e.name)
        if e.name.startswith(".") or ext.lower() not in exts or not e.is_file():
            continue
        if stem in stems:
            raise DataError(f"{root / e.name}: a second image named {stem} (with {stems[stem]})")
        stems[stem] = e.name
    if not stems:
        raise DataError(f"{root}: no images directly in the folder; a validation set sorted into synset "
                        "folders is an imagefolder source")
    return stems


def _ground_truth(path: Path, ids: dict[int, str], mapping: Path, images: dict[str, str], root: Path
                  ) -> dict[str, str]:
    """Image stem -> synset from the devkit's ground truth (line k labels ILSVRC2012_val_<k>)."""
    lines = _read_text(path, "imagenet_val.labels")
    while lines and not lines[-1].strip():
        lines.pop()
    by_number: list[str] = []
    for lineno, raw in enumerate(lines, 1):
        text = raw.strip()
        if not (text.isascii() and text.isdigit()):
            raise DataError(f"{path}:{lineno}: expected an ILSVRC2012_ID (an integer "
                            f"{min(ids)}..{max(ids)}), got {text!r}")
        if int(text) not in ids:
            raise DataError(f"{path}:{lineno}: ILSVRC2012_ID {int(text)} is not in {mapping} "
                            f"({min(ids)}..{max(ids)})")
        by_number.append(ids[int(text)])
    numbered: dict[int, str] = {}
    number_of: dict[str, int] = {}
    for stem in sorted(images):
        m = _VAL_NAME.fullmatch(stem)
        if m is None:
            raise DataError(f"{root / images[stem]}: not named ILSVRC2012_val_<number>, so no line of {path} "
                            "labels it")
        number = int(m.group(1))
        if not 1 <= number <= len(by_number):
            raise DataError(f"{root / images[stem]}: no label: {path} has {len(by_number)} lines")
        if number in numbered:
            raise DataError(f"{root / images[stem]}: image {number} again (with {numbered[number]})")
        numbered[number] = images[stem]
        number_of[stem] = number
    if len(numbered) < len(by_number):
        k = next(k for k in range(1, len(by_number) + 1) if k not in numbered)
        raise DataError(f"{path}:{k}: labels image ILSVRC2012_val_{k:08d}, which is not in {root} "
                        f"({len(numbered)} of the {len(by_number)} labelled images are there)")
    return {stem: by_number[number - 1] for stem, number in number_of.items()}


def _solution_csv(path: Path, synsets: set[str], mapping: Path, images: dict[str, str], root: Path
                  ) -> dict[str, str]:
    """Image stem -> synset from Kaggle's LOC_val_solution.csv."""
    lines = _read_text(path, "imagenet_val.labels")
    if not lines or [p.strip() for p in lines[0].split(",")] != ["ImageId", "PredictionString"]:
        raise DataError(f"{path}:1: expected the header 'ImageId,PredictionString' (Kaggle's "
                        "LOC_val_solution.csv)")
    labels: dict[str, str] = {}
    row: dict[str, int] = {}
    for lineno, raw in enumerate(lines[1:], 2):
        if not raw.strip():
            continue
        image, _, prediction = raw.partition(",")
        image, words = image.strip(), prediction.split()
        if not image or not words:
            raise DataError(f"{path}:{lineno}: expected 'ImageId,<synset> <box> ...', got {raw.strip()!r}")
        if words[0] not in synsets:
            raise DataError(f"{path}:{lineno}: synset {words[0]!r} is not in {mapping}")
        if image in row:
            raise DataError(f"{path}:{lineno}: image {image} is listed again (first on line {row[image]})")
        if image not in images:
            raise DataError(f"{path}:{lineno}: image {image} is not in {root}")
        row[image] = lineno
        labels[image] = words[0]
    for stem in sorted(images):
        if stem not in labels:
            raise DataError(f"{root / images[stem]}: no label: {path} has no row for {stem}")
    return labels


class ImageNetValSource(PathSource):
    """See the module docstring. ``synsets``: the sorted synsets (label k is ``synsets[k]``)."""

    format = "imagenet_val"

    def __init__(self, root: str | os.PathLike[str], labels: str | os.PathLike[str],
                 synsets: str | os.PathLike[str], train: str | os.PathLike[str] | None = None,
                 name: str | None = None) -> None:
        self.root = Path(root).expanduser()
        label_file, mapping = Path(labels).expanduser(), Path(synsets).expanduser()
        csv = label_file.suffix.lower() == ".csv"
        listed, ids = read_synsets(mapping, need_ids=not csv)
        self.synsets = sorted(listed)
        if train is not None:
            _check_train(Path(train).expanduser(), self.synsets, mapping)
        images = _val_images(self.root)
        if csv:
            by_stem = _solution_csv(label_file, set(listed), mapping, images, self.root)
        else:
            by_stem = _ground_truth(label_file, ids, mapping, images, self.root)
        index = {s: k for k, s in enumerate(self.synsets)}
        names = sorted(images.values())
        stem_of = {v: k for k, v in images.items()}
        sizes = [os.stat(self.root / n).st_size for n in names]
        label_array = np.asarray([index[by_stem[stem_of[n]]] for n in names], dtype=np.int64)
        super().__init__(self.root, PathTable.from_paths(names), np.asarray(sizes), label_array,
                         name or f"imagenet val {self.root.name}")

    def label_name(self, label: int) -> str:
        return self.synsets[label] if 0 <= label < len(self.synsets) else str(label)
