"""The IJB image source: images, templates, landmarks and (from the 1:N files) subjects, read and
checked at construction; images decoded and aligned on demand."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bctkit.data.align import ARCFACE_SIZE, align_face
from bctkit.data.sources.base import DataSource, PathTable, decode_image
from bctkit.data.sources.ijb.meta import csv_rows, fast_table, parse_float, parse_int, read_text, records
from bctkit.errors import DataError, FileFormatError

DATASETS = {"ijbb": "IJB-B", "ijbc": "IJB-C"}
_ONE_N = {"G1": ("_1N_gallery_G1.csv", "_1N_gallery_S1.csv"),
          "G2": ("_1N_gallery_G2.csv", "_1N_gallery_S2.csv"),
          "probe": ("_1N_probe_mixed.csv",)}


@dataclass(frozen=True)
class TemplateList:
    """One 1:N file: its templates (each once, in order of first appearance) and their subjects."""

    file: Path
    templates: np.ndarray
    subjects: np.ndarray


class IJBSource(DataSource):
    """See :mod:`bctkit.data.sources.ijb` for the layout. ``name``: ``ijbb`` or ``ijbc``; ``size``: crop
    side (112)."""

    format = "ijb"

    def __init__(self, root: str | os.PathLike[str], name: str = "ijbc", size: int = ARCFACE_SIZE) -> None:
        if name not in DATASETS:
            raise DataError(f"IJB name {name!r} is unknown; expected one of {sorted(DATASETS)}")
        self.root = Path(root).expanduser()
        self.meta = self.root / "meta"
        self.crops = self.root / "loose_crop"
        if not self.meta.is_dir():
            raise FileFormatError(f"{self.meta}: folder not found; expected insightface's IJB layout "
                                  "<root>/meta and <root>/loose_crop")
        self.dataset = name
        self.name = DATASETS[name]
        self.size = int(size)
        self._digests: dict[str, str] = {}
        self.tid_file = self.meta / f"{name}_face_tid_mid.txt"
        self.pts_file = self.meta / f"{name}_name_5pts_score.txt"
        self.pair_file = self.meta / f"{name}_template_pair_label.txt"
        names, self.tid_lines = self._read_tid_mid()
        self._read_landmarks(names)
        self.paths = PathTable.from_paths(names)
        self._check_files(names)
        self.template_ids, self.template_images = np.unique(self.templates, return_counts=True)
        self.one_n = self._read_one_n()
        self._labels = self._subject_labels()

    def _read_tid_mid(self) -> tuple[list[str], np.ndarray]:
        text = read_text(self.tid_file, self._digests)
        fast = fast_table(text, 3, np.int64)
        if fast is not None:
            names, table, lines = fast
            self.templates, self.medias = table[:, 0].copy(), table[:, 1].copy()
            return names, lines
        rows = records(self.tid_file, text, 3, "image template media")
        names, templates, medias, lines = [], [], [], []
        for lineno, (img, tid, mid) in rows:
            names.append(img)
            templates.append(parse_int(self.tid_file, lineno, "template id", tid))
            medias.append(parse_int(self.tid_file, lineno, "media id", mid))
            lines.append(lineno)
        self.templates = np.asarray(templates, dtype=np.int64)
        self.medias = np.asarray(medias, dtype=np.int64)
        return names, np.asarray(lines, dtype=np.int64)

    def _read_landmarks(self, names: list[str]) -> None:
        text = read_text(self.pts_file, self._digests)
        fast = fast_table(text, 12, np.float64)
        if fast is not None and fast[0] == names:
            self.landmarks = np.ascontiguousarray(fast[1][:, :10]).reshape(-1, 5, 2)
            self.scores = fast[1][:, 10].astype(np.float32)
            return
        rows = records(self.pts_file, text, 12, "image x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 score")
        if len(rows) != len(names):
            raise FileFormatError(f"{self.pts_file}: {len(rows)} landmark rows but {self.tid_file.name} "
                                  f"lists {len(names)} images; expected one row per image, in the same order")
        landmarks = np.empty((len(rows), 10), dtype=np.float64)
        scores = np.empty(len(rows), dtype=np.float32)
        for i, (lineno, parts) in enumerate(rows):
            if parts[0] != names[i]:
                raise FileFormatError(
                    f"{self.pts_file}:{lineno}: image {parts[0]!r}, but line {self.tid_lines[i]} of "
                    f"{self.tid_file.name} (the same row) lists {names[i]!r}; expected the same images in "
                    "the same order")
            landmarks[i] = [parse_float(self.pts_file, lineno, f"coordinate {k}", v)
                            for k, v in enumerate(parts[1:11], 1)]
            scores[i] = parse_float(self.pts_file, lineno, "detector score", parts[11])
        self.landmarks = landmarks.reshape(-1, 5, 2)
        self.scores = scores

    def _check_files(self, names: list[str]) -> None:
        if not self.crops.is_dir():
            raise FileFormatError(f"{self.crops}: folder not found; expected the images in <root>/loose_crop")
        flat = {e.name for e in os.scandir(self.crops)}
        for i, img in enumerate(names):
            if img not in flat and not (self.crops / img).is_file():
                raise DataError(f"{self.tid_file}:{self.tid_lines[i]}: {self.crops / img}: image not found")

    def _one_n_files(self) -> dict[str, Path] | None:
        found: dict[str, Path] = {}
        for role, suffixes in _ONE_N.items():
            for suffix in suffixes:
                if (self.meta / f"{self.dataset}{suffix}").is_file():
                    found[role] = self.meta / f"{self.dataset}{suffix}"
                    break
        if not found:
            return None
        for role, suffixes in _ONE_N.items():
            if role not in found:
                official = suffixes[-1] if self.dataset == "ijbb" else suffixes[0]
                present = next(iter(found.values())).name
                raise FileFormatError(f"{self.meta}: 1:N file {self.dataset}{official} not found, but "
                                      f"{present} is there; expected all three or none")
        return found

    def _read_one_n(self) -> dict[str, TemplateList] | None:
        files = self._one_n_files()
        if files is None:
            return None
        owner: dict[int, tuple[int, Path, int]] = {}
        out = {}
        for role, path in files.items():
            text = read_text(path, self._digests)
            reader = csv.reader(text.splitlines())
            header: list[str] | None = None
            order: dict[int, int] = {}
            for lineno, row in csv_rows(path, reader):
                if not any(f.strip() for f in row):
                    continue
                if header is None:
                    header = [f.strip().upper() for f in row]
                    if header[:2] != ["TEMPLATE_ID", "SUBJECT_ID"]:
                        raise FileFormatError(f"{path}:{lineno}: header {','.join(row[:2])!r}..., expected "
                                              "TEMPLATE_ID,SUBJECT_ID first")
                    continue
                if len(row) != len(header):
                    raise FileFormatError(f"{path}:{lineno}: {len(row)} columns, expected {len(header)} as "
                                          "the header")
                tid = parse_int(path, lineno, "TEMPLATE_ID", row[0].strip())
                sid = parse_int(path, lineno, "SUBJECT_ID", row[1].strip())
                if sid < 1:
                    raise FileFormatError(f"{path}:{lineno}: SUBJECT_ID {sid}, expected >= 1 (label 0 marks "
                                          "images of no known subject)")
                if tid in owner and owner[tid][0] != sid:
                    prev = owner[tid]
                    raise DataError(f"{path}:{lineno}: template {tid} has subject {sid}, but {prev[1].name}:"
                                    f"{prev[2]} gives it subject {prev[0]}")
                owner.setdefault(tid, (sid, path, lineno))
                if tid not in order:
                    self._check_template(tid, path, lineno)
                    order[tid] = sid
            if header is None or not order:
                raise FileFormatError(f"{path}: no rows after a TEMPLATE_ID,SUBJECT_ID header")
            out[role] = TemplateList(path, np.fromiter(order.keys(), np.int64, len(order)),
                                     np.fromiter(order.values(), np.int64, len(order)))
        return out

    def _check_template(self, tid: int, path: Path, lineno: int) -> None:
        pos = np.searchsorted(self.template_ids, tid)
        if pos >= len(self.template_ids) or self.template_ids[pos] != tid:
            raise DataError(f"{path}:{lineno}: template {tid} has no images in {self.tid_file.name}")

    def _subject_labels(self) -> np.ndarray:
        labels = np.zeros(len(self.templates), dtype=np.int64)
        if self.one_n is None:
            return labels
        tids = np.concatenate([t.templates for t in self.one_n.values()])
        sids = np.concatenate([t.subjects for t in self.one_n.values()])
        tids, first = np.unique(tids, return_index=True)
        pos = np.searchsorted(tids, self.templates)
        pos_c = np.minimum(pos, len(tids) - 1)
        known = tids[pos_c] == self.templates
        labels[known] = sids[first][pos_c[known]]
        return labels

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def read(self, i: int) -> Image.Image:
        path = os.path.join(self.crops, self.paths[i])
        img = decode_image(path, path)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return align_face(img, self.landmarks[i], self.size)

    def identity(self) -> dict[str, Any]:
        return {"format": self.format, "dataset": self.dataset, "images": len(self), "size": self.size,
                "meta": dict(sorted(self._digests.items()))}

    def describe(self, i: int) -> str:
        return f"{self.crops / self.paths[i]} ({self.tid_file.name} line {self.tid_lines[i]})"

    def key(self, i: int) -> str:
        return self.paths[i]

    def stored_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def label_name(self, label: int) -> str:
        return f"subject {label}" if label > 0 else "no known subject"
