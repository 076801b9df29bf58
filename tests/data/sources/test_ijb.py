"""IJBSource over a tiny IJB directory written byte by byte in insightface's layout: parsing, labels,
keys, the aligned crop, and a one-line error naming file and line for each kind of bad input."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bctkit.data.align import ARCFACE_TEMPLATE
from bctkit.data.sources.ijb import IJBSource, read_pairs
from bctkit.errors import DataError, FileFormatError

# IJB-C's 1:N csv header (34 columns) and IJB-B's (16 columns), as the official protocol files have them
IJBC_HEADER = ("TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT,FRAME_NUM,"
               "FACIAL_HAIR,AGE,INDOOR_OUTDOOR,SKINTONE,GENDER,YAW,ROLL,"
               + ",".join(f"OCC{k}" for k in range(1, 19)))
IJBB_HEADER = ("TEMPLATE_ID,SUBJECT_ID,FILE,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT,RIGHT_EYE_X,"
               "RIGHT_EYE_Y,LEFT_EYE_X,LEFT_EYE_Y,NOSE_BASE_X,NOSE_BASE_Y,FRAME,CS2_BOOL")
ONE_N_NAMES = {"ijbc": ("ijbc_1N_gallery_G1.csv", "ijbc_1N_gallery_G2.csv", "ijbc_1N_probe_mixed.csv"),
               "ijbb": ("ijbb_1N_gallery_S1.csv", "ijbb_1N_gallery_S2.csv", "ijbb_1N_probe_mixed.csv")}


@dataclass
class Tiny:
    """What was written: per image (name, template, media, landmarks, score), per template its
    subject, the pair list and the 1:N template lists."""

    root: Path
    name: str
    names: list[str] = field(default_factory=list)
    templates: list[int] = field(default_factory=list)
    medias: list[int] = field(default_factory=list)
    landmarks: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    subject: dict[int, int] = field(default_factory=dict)
    pairs: list[tuple[int, int, int]] = field(default_factory=list)
    g1: list[int] = field(default_factory=list)
    g2: list[int] = field(default_factory=list)
    probe: list[int] = field(default_factory=list)

    def meta(self, suffix: str) -> Path:
        return self.root / "meta" / f"{self.name}_{suffix}"

    def one_n(self, k: int) -> Path:
        return self.root / "meta" / ONE_N_NAMES[self.name][k]


def _jpeg(rng: np.random.Generator, side: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_ijb(root: Path, name: str = "ijbc", seed: int = 0, one_n: bool = True, n_pairs: int = 220) -> Tiny:
    """A tiny IJB set: 6 subjects, 26 templates with non-contiguous ids, 1-4 images each from media
    ids shared across templates; G1 enrols subjects 1-3 (subject 1 twice), G2 subjects 4-6 (4 twice),
    every other template is a probe."""
    rng = np.random.default_rng(seed)
    t = Tiny(root, name)
    tids = sorted(rng.choice(np.arange(1, 400), size=26, replace=False).tolist())
    subjects = [1, 1, 2, 3, 4, 4, 5, 6] + [int(s) for s in rng.integers(1, 7, size=18)]
    for tid, sid in zip(tids, subjects, strict=True):
        t.subject[tid] = sid
    t.g1, t.g2, t.probe = tids[0:4], tids[4:8], tids[8:]
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    for tid in tids:
        for _ in range(int(rng.integers(1, 5))):
            t.names.append(f"{len(t.names) + 1}.jpg")
            t.templates.append(tid)
            t.medias.append(int(rng.integers(9000, 9005)))
            lm = ARCFACE_TEMPLATE * rng.uniform(0.15, 0.25) + rng.uniform(0, 3, size=(5, 2))
            t.landmarks.append(np.array([[float(f"{v:.3f}") for v in p] for p in lm]))
            t.scores.append(float(f"{rng.uniform(0.1, 1.0):.3f}"))
            (root / "loose_crop" / t.names[-1]).write_bytes(_jpeg(rng))
    rows = zip(t.names, t.templates, t.medias, strict=True)
    t.meta("face_tid_mid.txt").write_bytes("".join(f"{n} {tid} {m}\n" for n, tid, m in rows).encode())
    t.meta("name_5pts_score.txt").write_bytes("".join(
        f"{n} " + " ".join(f"{v:.3f}" for v in lm.ravel()) + f" {s:.3f}\n"
        for n, lm, s in zip(t.names, t.landmarks, t.scores, strict=True)).encode())
    seen: set[tuple[int, int]] = set()
    while len(t.pairs) < n_pairs:
        a, b = (int(x) for x in rng.choice(tids, size=2, replace=False))
        if (a, b) not in seen:
            seen.add((a, b))
            t.pairs.append((a, b, int(t.subject[a] == t.subject[b])))
    pair_text = "".join(f"{a} {b} {lab}\n" for a, b, lab in t.pairs)
    t.meta("template_pair_label.txt").write_bytes(pair_text.encode())
    if one_n:
        header = IJBC_HEADER if name == "ijbc" else IJBB_HEADER
        width = header.count(",") + 1
        for k, group in enumerate((t.g1, t.g2, t.probe)):
            rows = [header]
            for i, (n, tid) in enumerate(zip(t.names, t.templates, strict=True)):
                if tid in group:
                    fields = [str(tid), str(t.subject[tid]), f"img/{n}", str(i + 7), "3", "4", "20", "21"]
                    rows.append(",".join(fields + [""] * (width - len(fields))))
            t.one_n(k).write_bytes(("\n".join(rows) + "\n").encode())
    return t


def test_parses_the_layout(tmp_path: Path) -> None:
    t = make_ijb(tmp_path)
    src = IJBSource(tmp_path, "ijbc")
    assert len(src) == len(t.names) and src.name == "IJB-C" and src.dataset == "ijbc"
    assert [src.key(i) for i in range(len(src))] == t.names
    np.testing.assert_array_equal(src.templates, t.templates)
    np.testing.assert_array_equal(src.medias, t.medias)
    np.testing.assert_allclose(src.landmarks, np.stack(t.landmarks), rtol=1e-6)
    np.testing.assert_allclose(src.scores, t.scores, rtol=1e-6)
    assert src.template_ids.tolist() == sorted(t.subject)
    assert src.labels.tolist() == [t.subject[tid] for tid in t.templates]
    assert src.one_n is not None
    assert src.one_n["G1"].templates.tolist() == t.g1 and src.one_n["G2"].templates.tolist() == t.g2
    assert src.one_n["probe"].templates.tolist() == t.probe
    assert src.one_n["probe"].subjects.tolist() == [t.subject[x] for x in t.probe]
    assert src.stored_shape() == (3, 112, 112)
    assert "1.jpg" in src.describe(0) and "line 1" in src.describe(0)
    pairs = read_pairs(src)
    ids = src.template_ids
    assert [(int(ids[a]), int(ids[b]), int(g)) for a, b, g in zip(pairs.first, pairs.second, pairs.genuine,
                                                                   strict=True)] == t.pairs


def test_without_one_n_labels_are_zero(tmp_path: Path) -> None:
    make_ijb(tmp_path, one_n=False)
    src = IJBSource(tmp_path, "ijbc")
    assert src.one_n is None and (src.labels == 0).all()
    assert src.label_name(0) == "no known subject"


def test_ijbb_uses_s1_s2_names(tmp_path: Path) -> None:
    t = make_ijb(tmp_path, name="ijbb")
    src = IJBSource(tmp_path, "ijbb")
    assert src.name == "IJB-B" and src.one_n is not None
    assert src.one_n["G1"].file.name == "ijbb_1N_gallery_S1.csv"
    assert src.one_n["G2"].templates.tolist() == t.g2


def test_identity_follows_the_metadata(tmp_path: Path) -> None:
    t = make_ijb(tmp_path)
    before = IJBSource(tmp_path, "ijbc").fingerprint()
    assert IJBSource(tmp_path, "ijbc").fingerprint() == before
    path = t.meta("name_5pts_score.txt")
    path.write_bytes(path.read_bytes().replace(f"{t.scores[0]:.3f}\n".encode(), b"0.123\n", 1))
    assert IJBSource(tmp_path, "ijbc").fingerprint() != before


def test_read_aligns_the_crop(tmp_path: Path) -> None:
    # landmarks = the template sent to the source by a map that keeps integer pixels on integer
    # pixels (90-degree turn, scale 2): the fitted alignment is its exact inverse, so a bright source
    # pixel at the image of crop pixel (40, 60) must land exactly on crop pixel (40, 60)
    t = make_ijb(tmp_path)
    fwd = np.array([[0.0, 2.0, 10.0], [-2.0, 0.0, 250.0]])
    lm = ARCFACE_TEMPLATE @ fwd[:, :2].T + fwd[:, 2]
    arr = np.zeros((260, 240, 3), dtype=np.uint8)
    x, y = (fwd[:, :2] @ np.array([40.0, 60.0]) + fwd[:, 2]).astype(int)
    arr[y, x] = (250, 120, 30)
    Image.fromarray(arr).save(tmp_path / "loose_crop" / "big.png")
    t.names[0] = "big.png"
    t.landmarks[0] = lm
    tid_mid = t.meta("face_tid_mid.txt")
    tid_mid.write_bytes(tid_mid.read_bytes().replace(b"1.jpg", b"big.png", 1))
    pts = t.meta("name_5pts_score.txt").read_text().split("\n")
    pts[0] = "big.png " + " ".join(repr(float(v)) for v in lm.ravel()) + " 0.9"
    t.meta("name_5pts_score.txt").write_text("\n".join(pts))
    src = IJBSource(tmp_path, "ijbc")
    img = src.read(0)
    assert img.size == (112, 112) and img.mode == "RGB"
    crop = src.decode(0)
    assert crop.shape == (3, 112, 112)
    # the fit is exact up to rounding in the last bits, which Pillow's 8-bit bilinear may turn into 1
    assert np.abs(crop[:, 60, 40].astype(int) - [250, 120, 30]).max() <= 1
    assert int((crop.max(0) > 2).sum()) == 1
    grey = src.decode(1)  # a JPEG crop of a 24 x 24 image: mostly black border, some content
    assert grey.shape == (3, 112, 112) and grey.max() > 0


def _rewrite(path: Path, line: int, text: str | None) -> None:
    lines = path.read_text().split("\n")
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text
    path.write_text("\n".join(lines))


def _line(path: Path, k: int) -> str:
    return path.read_text().split("\n")[k - 1]


def test_bad_tid_mid(tmp_path: Path) -> None:
    t = make_ijb(tmp_path)
    f = t.meta("face_tid_mid.txt")
    good = _line(f, 3)
    _rewrite(f, 3, good + " 5")
    with pytest.raises(FileFormatError, match=r"ijbc_face_tid_mid.txt:3: 4 fields, expected 3"):
        IJBSource(tmp_path, "ijbc")
    _rewrite(f, 3, good.replace(" ", "  ", 1))
    with pytest.raises(FileFormatError, match=r"tid_mid.txt:3: 4 fields"):
        IJBSource(tmp_path, "ijbc")
    _rewrite(f, 3, good.split(" ")[0] + " x12 " + good.split(" ")[2])
    with pytest.raises(FileFormatError, match=r"tid_mid.txt:3: template id 'x12' is not an integer"):
        IJBSource(tmp_path, "ijbc")


def test_bad_landmarks(tmp_path: Path) -> None:
    t = make_ijb(tmp_path)
    f = t.meta("name_5pts_score.txt")
    good = _line(f, 2)
    _rewrite(f, 2, good.rsplit(" ", 1)[0])
    with pytest.raises(FileFormatError, match=r"5pts_score.txt:2: 11 fields, expected 12"):
        IJBSource(tmp_path, "ijbc")
    parts = good.split(" ")
    _rewrite(f, 2, " ".join([parts[0], "4x.5"] + parts[2:]))
    with pytest.raises(FileFormatError, match=r"5pts_score.txt:2: coordinate 1 '4x.5' is not a finite"):
        IJBSource(tmp_path, "ijbc")
    _rewrite(f, 2, " ".join(parts[:-1] + ["nan"]))
    with pytest.raises(FileFormatError, match=r"5pts_score.txt:2: detector score 'nan'"):
        IJBSource(tmp_path, "ijbc")
    _rewrite(f, 2, " ".join(["3.jpg"] + parts[1:]))
    with pytest.raises(FileFormatError, match=r"5pts_score.txt:2: image '3.jpg', but line 2 of "
                                              r"ijbc_face_tid_mid.txt \(the same row\) lists '2.jpg'"):
        IJBSource(tmp_path, "ijbc")
    _rewrite(f, 2, None)
    with pytest.raises(FileFormatError, match=rf"{len(t.names) - 1} landmark rows but ijbc_face_tid_mid.txt "
                                              rf"lists {len(t.names)} images"):
        IJBSource(tmp_path, "ijbc")


def test_missing_files(tmp_path: Path) -> None:
    t = make_ijb(tmp_path)
    (tmp_path / "loose_crop" / "4.jpg").unlink()
    with pytest.raises(DataError, match=r"ijbc_face_tid_mid.txt:4: .*loose_crop/4.jpg: image not found"):
        IJBSource(tmp_path, "ijbc")
    t.meta("name_5pts_score.txt").unlink()
    with pytest.raises(FileFormatError, match=r"ijbc_name_5pts_score.txt: file not found"):
        IJBSource(tmp_path, "ijbc")
    with pytest.raises(FileFormatError, match=r"meta: folder not found"):
        IJBSource(tmp_path / "nowhere", "ijbc")
    with pytest.raises(DataError, match=r"IJB name 'ijba' is unknown"):
        IJBSource(tmp_path, "ijba")


def test_bad_one_n(tmp_path: Path) -> None:
    t = make_ijb(tmp_path)
    g1 = t.one_n(0)
    original = g1.read_text()
    row = _line(g1, 2)
    _rewrite(g1, 2, row + ",extra")
    with pytest.raises(FileFormatError, match=r"ijbc_1N_gallery_G1.csv:2: 35 columns, expected 34"):
        IJBSource(tmp_path, "ijbc")
    _rewrite(g1, 2, row.replace(f",{t.subject[t.g1[0]]},", ",seven,", 1))
    with pytest.raises(FileFormatError, match=r"G1.csv:2: SUBJECT_ID 'seven' is not an integer"):
        IJBSource(tmp_path, "ijbc")
    _rewrite(g1, 2, "999," + row.split(",", 1)[1])
    with pytest.raises(DataError, match=r"G1.csv:2: template 999 has no images in ijbc_face_tid_mid.txt"):
        IJBSource(tmp_path, "ijbc")
    other = 2 if t.subject[t.g1[0]] != 2 else 3
    _rewrite(g1, 2, row.replace(f",{t.subject[t.g1[0]]},", f",{other},", 1))
    with pytest.raises(DataError, match=rf"template {t.g1[0]} has subject"):
        IJBSource(tmp_path, "ijbc")
    _rewrite(g1, 1, "SUBJECT_ID,TEMPLATE_ID" + _line(g1, 1)[len("TEMPLATE_ID,SUBJECT_ID"):])
    with pytest.raises(FileFormatError, match=r"G1.csv:1: header 'SUBJECT_ID,TEMPLATE_ID'"):
        IJBSource(tmp_path, "ijbc")
    g1.write_text(original)
    t.one_n(2).unlink()
    with pytest.raises(FileFormatError, match=r"1:N file ijbc_1N_probe_mixed.csv not found"):
        IJBSource(tmp_path, "ijbc")


def test_bad_pairs(tmp_path: Path) -> None:
    t = make_ijb(tmp_path)
    f = t.meta("template_pair_label.txt")
    a, b, lab = t.pairs[4]
    cases = [(f"{a} {b}", r"template_pair_label.txt:5: 2 fields, expected 3"),
             (f"{a} {b} 2", r"template_pair_label.txt:5: label '2', expected 1 \(genuine\) or 0"),
             (f"{a} b{b} {lab}", r"template_pair_label.txt:5: template2 'b\d+' is not an integer"),
             (f"{a} 4000 {lab}", r"template_pair_label.txt:5: template 4000 has no images")]
    for text, message in cases:
        _rewrite(f, 5, text)
        src = IJBSource(tmp_path, "ijbc")
        with pytest.raises((DataError, FileFormatError), match=message):
            read_pairs(src)
    f.write_text("".join(f"{x} {y} 0\n" for x, y, _ in t.pairs))
    with pytest.raises(DataError, match=r"0 genuine and 220 impostor pairs"):
        read_pairs(IJBSource(tmp_path, "ijbc"))


def test_pairs_slow_path_equals_fast(tmp_path: Path) -> None:
    # CRLF line ends and a blank line: the C parser still reads it; a trailing space sends it to the
    # line-by-line reader; both must give the same pairs
    t = make_ijb(tmp_path)
    f = t.meta("template_pair_label.txt")
    src = IJBSource(tmp_path, "ijbc")
    fast = read_pairs(src)
    f.write_bytes(b"\r\n".join(f"{a} {b} {lab}".encode() for a, b, lab in t.pairs[:10]) + b"\r\n\r\n"
                  + "".join(f"{a} {b} {lab}\n" for a, b, lab in t.pairs[10:]).encode())
    crlf = read_pairs(src)
    f.write_bytes(b"".join(f"{a} {b} {lab} \n".encode() for a, b, lab in t.pairs))
    slow = read_pairs(src)
    for other in (crlf, slow):
        np.testing.assert_array_equal(other.first, fast.first)
        np.testing.assert_array_equal(other.second, fast.second)
        np.testing.assert_array_equal(other.genuine, fast.genuine)


def test_line_by_line_reader_equals_the_fast_one(tmp_path: Path) -> None:
    # trailing spaces and CRLF send the metadata through the line-by-line reader; same result
    t = make_ijb(tmp_path)
    fast = IJBSource(tmp_path, "ijbc")
    for suffix in ("face_tid_mid.txt", "name_5pts_score.txt"):
        f = t.meta(suffix)
        f.write_bytes(f.read_bytes().replace(b"\n", b" \r\n"))
    slow = IJBSource(tmp_path, "ijbc")
    for attr in ("templates", "medias", "landmarks", "scores", "tid_lines", "labels"):
        np.testing.assert_array_equal(getattr(slow, attr), getattr(fast, attr))
    assert [slow.key(i) for i in range(len(slow))] == [fast.key(i) for i in range(len(fast))]


def test_template_ids_spanning_more_than_a_table(tmp_path: Path) -> None:
    # a template id of 10^12 makes the pair lookup binary-search instead of a table
    t = make_ijb(tmp_path)
    big, old = 10**12, t.templates[0]
    tid_mid = t.meta("face_tid_mid.txt")
    tid_mid.write_text("".join(f"{n} {big if tid == old else tid} {m}\n"
                               for n, tid, m in zip(t.names, t.templates, t.medias, strict=True)))
    t.meta("template_pair_label.txt").write_text("".join(
        f"{big if a == old else a} {big if b == old else b} {lab}\n" for a, b, lab in t.pairs))
    for k in range(3):
        f = t.one_n(k)
        f.write_text(f.read_text().replace(f"\n{old},", f"\n{big},"))
    src = IJBSource(tmp_path, "ijbc")
    pairs = read_pairs(src)
    ids = src.template_ids
    renamed = [(big if a == old else a, big if b == old else b, lab) for a, b, lab in t.pairs]
    assert [(int(ids[a]), int(ids[b]), int(g)) for a, b, g in zip(pairs.first, pairs.second, pairs.genuine,
                                                                   strict=True)] == renamed
    f = t.meta("template_pair_label.txt")
    f.write_text(f.read_text().replace(f"{big} ", f"{big + 1} ", 1))
    with pytest.raises(DataError, match=rf"template {big + 1} has no images"):
        read_pairs(IJBSource(tmp_path, "ijbc"))
