"""``ijb``: IJB-B / IJB-C as insightface distributes them (``<root>/meta``, ``<root>/loose_crop``).

Files, with ``<name>`` = ``ijbb`` or ``ijbc``, all UTF-8 text, one record per line (blank lines are
skipped, line ends stripped; line numbers in errors count every line):

- ``meta/<name>_face_tid_mid.txt``: ``image template media``, three fields separated by single
  spaces, no header; one line per face image (``1.jpg 1 69544``).
- ``meta/<name>_name_5pts_score.txt``: ``image x1 y1 ... x5 y5 score``, twelve fields separated by
  single spaces, no header: the five landmarks (pixel-index coordinates of the loose crop) and the
  face detector's score. Line k describes the same image as line k of the tid_mid file.
- ``meta/<name>_template_pair_label.txt``: ``template1 template2 label`` (label 1 genuine, 0 impostor),
  single spaces, no header; read by :func:`read_pairs` for the 1:1 protocol.
- ``loose_crop/<image>``: the image files.
- 1:N (optional, all three or none): comma-separated files with one header line whose first two
  columns are ``TEMPLATE_ID,SUBJECT_ID`` and one row per image, each row with as many columns as
  the header. IJB-C: ``ijbc_1N_gallery_G1.csv``, ``ijbc_1N_gallery_G2.csv``,
  ``ijbc_1N_probe_mixed.csv``; IJB-B: ``ijbb_1N_gallery_S1.csv``, ``ijbb_1N_gallery_S2.csv``,
  ``ijbb_1N_probe_mixed.csv`` (either gallery spelling is accepted for both sets).

Image i of the source is record i of the tid_mid file: decoded on demand, aligned from its landmarks
to the 112 x 112 ArcFace crop (:mod:`bctkit.data.align`), RGB. Its label is the subject id of its
template where the 1:N files name one (subject ids must then be >= 1), else 0 (no known subject); the
1:1 protocol never uses the labels. ``key(i)`` is the image name.

Construction reads and checks the metadata and that every image file exists, and decodes nothing.
Its identity is the dataset name and a hash of each metadata file's bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bctkit.data.align import ARCFACE_SIZE, align_face
from bctkit.data.sources.base import DataSource, PathTable, decode_image
from bctkit.errors import DataError, FileFormatError

__all__ = ["DATASETS", "IJBSource", "Pairs", "TemplateList", "read_pairs"]

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


@dataclass(frozen=True)
class Pairs:
    """The 1:1 pair list: for pair p, ``first[p]`` and ``second[p]`` index the source's sorted
    ``template_ids``; ``genuine[p]`` is its label."""

    file: Path
    first: np.ndarray
    second: np.ndarray
    genuine: np.ndarray


def _read_text(path: Path, digests: dict[str, str] | None = None) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found (IJB layout: <root>/meta/<name>_...)") from None
    if digests is not None:
        digests[path.name] = hashlib.sha256(data).hexdigest()[:32]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _records(path: Path, text: str, fields: int, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line, split at single spaces; FileFormatError naming
    the line when a line has another number of fields."""
    out = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != fields:
            raise FileFormatError(f"{path}:{lineno}: {len(parts)} fields, expected {fields} ({what}) "
                                  "separated by single spaces")
        out.append((lineno, parts))
    if not out:
        raise FileFormatError(f"{path}: no records; expected lines '{what}'")
    return out


def _fast_table(text: str, fields: int, dtype: type) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(first field of each record, the other fields as an array, line numbers) through numpy's C
    parser; None when anything is off (the line-by-line reader then names the line)."""
    names, lines = [], []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if line:
            names.append(line.split(" ", 1)[0])
            lines.append(lineno)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = np.loadtxt(io.StringIO(text), dtype=dtype, delimiter=" ", comments=None, ndmin=2,
                               converters={0: lambda _: 0})
    except ValueError:
        return None
    if table.shape != (len(names), fields) or not np.isfinite(table).all():
        return None
    return names, table[:, 1:], np.asarray(lines, dtype=np.int64)


def _csv_rows(path: Path, reader: Any) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each CSV row; FileFormatError naming the line on broken quoting."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise FileFormatError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
        yield reader.line_num, row


def _int(path: Path, lineno: int, field: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise FileFormatError(f"{path}:{lineno}: {field} {text!r} is not an integer") from None


def _float(path: Path, lineno: int, field: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise FileFormatError(f"{path}:{lineno}: {field} {text!r} is not a finite number")
    return value


class IJBSource(DataSource):
    """See the module docstring. ``name``: ``ijbb`` or ``ijbc``; ``size``: crop side (112)."""

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
        text = _read_text(self.tid_file, self._digests)
        fast = _fast_table(text, 3, np.int64)
        if fast is not None:
            names, table, lines = fast
            self.templates, self.medias = table[:, 0].copy(), table[:, 1].copy()
            return names, lines
        rows = _records(self.tid_file, text, 3, "image template media")
        names, templates, medias, lines = [], [], [], []
        for lineno, (img, tid, mid) in rows:
            names.append(img)
            templates.append(_int(self.tid_file, lineno, "template id", tid))
            medias.append(_int(self.tid_file, lineno, "media id", mid))
            lines.append(lineno)
        self.templates = np.asarray(templates, dtype=np.int64)
        self.medias = np.asarray(medias, dtype=np.int64)
        return names, np.asarray(lines, dtype=np.int64)

    def _read_landmarks(self, names: list[str]) -> None:
        text = _read_text(self.pts_file, self._digests)
        fast = _fast_table(text, 12, np.float64)
        if fast is not None and fast[0] == names:
            self.landmarks = np.ascontiguousarray(fast[1][:, :10]).reshape(-1, 5, 2)
            self.scores = fast[1][:, 10].astype(np.float32)
            return
        rows = _records(self.pts_file, text, 12, "image x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 score")
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
            landmarks[i] = [_float(self.pts_file, lineno, f"coordinate {k}", v)
                            for k, v in enumerate(parts[1:11], 1)]
            scores[i] = _float(self.pts_file, lineno, "detector score", parts[11])
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
            text = _read_text(path, self._digests)
            reader = csv.reader(text.splitlines())
            header: list[str] | None = None
            order: dict[int, int] = {}
            for lineno, row in _csv_rows(path, reader):
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
                tid = _int(path, lineno, "TEMPLATE_ID", row[0].strip())
                sid = _int(path, lineno, "SUBJECT_ID", row[1].strip())
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


def _pairs_slow(path: Path, text: str, known: np.ndarray) -> np.ndarray:
    """Line-by-line parse with exact errors: the reference the fast path falls back to."""
    rows = _records(path, text, 3, "template1 template2 label")
    out = np.empty((len(rows), 3), dtype=np.int64)
    for i, (lineno, (a, b, lab)) in enumerate(rows):
        out[i] = (_int(path, lineno, "template1", a), _int(path, lineno, "template2", b),
                  _int(path, lineno, "label", lab))
        if out[i, 2] not in (0, 1):
            raise FileFormatError(f"{path}:{lineno}: label {lab!r}, expected 1 (genuine) or 0 (impostor)")
        for t in out[i, :2]:
            pos = np.searchsorted(known, t)
            if pos >= len(known) or known[pos] != t:
                raise DataError(f"{path}:{lineno}: template {t} has no images in the tid_mid file")
    return out


def _rows_of(known: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Position of each value in the sorted distinct ``known`` ids, -1 where absent: one table
    lookup per value when the ids span under 2^26, else a binary search."""
    out = np.full(values.shape, -1, dtype=np.int32)
    lo, hi = int(known[0]), int(known[-1])
    inside = (values >= lo) & (values <= hi)
    if hi - lo < 1 << 26:
        table = np.full(hi - lo + 1, -1, dtype=np.int32)
        table[known - lo] = np.arange(len(known), dtype=np.int32)
        out[inside] = table[values[inside] - lo]
    else:
        pos = np.searchsorted(known, values[inside])
        out[inside] = np.where(known[np.minimum(pos, len(known) - 1)] == values[inside], pos, -1)
    return out


def read_pairs(source: IJBSource) -> Pairs:
    """The 1:1 pair list of ``source``'s dataset, checked against its templates.

    numpy's C parser reads the file (15.7M lines of IJB-C in about a second); on any problem the
    file is read again line by line to name the line (a wrong field count, a non-integer, a label
    other than 0/1, a template with no images)."""
    path = source.pair_file
    known = source.template_ids
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty file warns; the line-by-line read names it
            data = np.loadtxt(path, dtype=np.int64, delimiter=" ", comments=None, ndmin=2, encoding="utf-8")
        ok = data.shape[1] == 3 and data.shape[0] > 0
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found (the 1:1 template pair list)") from None
    except (ValueError, UnicodeDecodeError):
        ok = False
    if ok:
        first, second = _rows_of(known, data[:, 0]), _rows_of(known, data[:, 1])
        genuine = data[:, 2] == 1
        ok = bool((first >= 0).all() and (second >= 0).all() and (genuine | (data[:, 2] == 0)).all())
    if not ok:
        data = _pairs_slow(path, _read_text(path), known)
        first, second = _rows_of(known, data[:, 0]), _rows_of(known, data[:, 1])
        genuine = data[:, 2] == 1
    del data
    if genuine.all() or not genuine.any():
        raise DataError(f"{path}: {int(genuine.sum())} genuine and {int((~genuine).sum())} impostor pairs; "
                        "1:1 verification needs both")
    return Pairs(path, first, second, genuine)
