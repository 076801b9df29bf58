"""imagenet_val: a flat validation folder labelled by the devkit's ground truth + map_clsloc.txt or by
Kaggle's LOC_val_solution.csv + LOC_synset_mapping.txt; class ids are sorted-synset positions."""

import io

import numpy as np
import pytest
from PIL import Image

from bctkit.data.sources.imagenet import ImageNetValSource
from bctkit.errors import DataError

from .conftest import decoded

# map_clsloc.txt order (ILSVRC2012_ID 1..4), deliberately not sorted: id 1 is n02119789 as in the devkit
CLSLOC = [("n02119789", "kit_fox"), ("n01440764", "tench"), ("n03000134", "chainlink_fence"),
          ("n01751748", "sea_snake")]
SORTED = sorted(s for s, _ in CLSLOC)  # class ids: n01440764 0, n01751748 1, n02119789 2, n03000134 3
GT_IDS = [3, 1, 1, 4, 2, 3]  # image k's ILSVRC2012_ID, k = 1..6
EXPECTED = [SORTED.index(CLSLOC[i - 1][0]) for i in GT_IDS]  # [3, 2, 2, 1, 0, 3]


def _jpeg(seed):
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def val(tmp_path):
    """The flat val folder, the devkit files and Kaggle's files for the same six images."""
    root = tmp_path / "val"
    root.mkdir()
    for k in range(1, 7):
        (root / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(_jpeg(k))
    (root / "readme.txt").write_text("not an image")
    files = {"root": root}
    files["gt"] = _lines(tmp_path / "ILSVRC2012_validation_ground_truth.txt", [str(i) for i in GT_IDS])
    clsloc = [f"{s} {i} {n}" for i, (s, n) in enumerate(CLSLOC, 1)]
    files["clsloc"] = _lines(tmp_path / "map_clsloc.txt", clsloc)
    files["mapping"] = _lines(tmp_path / "LOC_synset_mapping.txt", [f"{s} name of {s}" for s in SORTED])
    rows = [f"ILSVRC2012_val_{k:08d},{CLSLOC[i - 1][0]} 1 2 30 40 {CLSLOC[i - 1][0]} 5 6 7 8"
            for k, i in reversed(list(enumerate(GT_IDS, 1)))]
    files["csv"] = _lines(tmp_path / "LOC_val_solution.csv", ["ImageId,PredictionString", *rows])
    train = tmp_path / "train"
    for s in SORTED:
        (train / s).mkdir(parents=True)
    files["train"] = train
    return files


def test_devkit_ground_truth(val):
    src = ImageNetValSource(val["root"], val["gt"], val["clsloc"], train=val["train"])
    assert src.labels.tolist() == EXPECTED
    assert [src.label_name(k) for k in range(4)] == SORTED
    assert src.key(0) == "ILSVRC2012_val_00000001.JPEG" and len(src) == 6
    assert np.array_equal(src.decode(4), decoded(_jpeg(5)))


@pytest.mark.parametrize("mapping", ["mapping", "clsloc"])
def test_kaggle_csv(val, mapping):
    src = ImageNetValSource(val["root"], val["csv"], val[mapping], train=val["train"])
    assert src.labels.tolist() == EXPECTED
    devkit = ImageNetValSource(val["root"], val["gt"], val["clsloc"])
    assert src.fingerprint() == devkit.fingerprint()  # the same images and labels either way


def _error(cls, *args, match):
    with pytest.raises(DataError, match=match) as err:
        cls(*args)
    assert "\n" not in str(err.value)


def test_train_folders_must_agree(val):
    (val["train"] / "n09999999").mkdir()
    _error(ImageNetValSource, val["root"], val["gt"], val["clsloc"], val["train"],
           match=r"train: class folder n09999999 is not a synset of .*map_clsloc\.txt")
    (val["train"] / "n09999999").rmdir()
    (val["train"] / "n01751748").rmdir()
    _error(ImageNetValSource, val["root"], val["gt"], val["clsloc"], val["train"],
           match=r"train: has no class folder n01751748, a synset of")


@pytest.mark.parametrize(("line", "message"), [
    ("x7", r"ground_truth\.txt:3: expected an ILSVRC2012_ID \(an integer 1\.\.4\), got 'x7'"),
    ("", r"ground_truth\.txt:3: expected an ILSVRC2012_ID"),
    ("0", r"ground_truth\.txt:3: ILSVRC2012_ID 0 is not in .*map_clsloc\.txt \(1\.\.4\)"),
    ("1001", r"ground_truth\.txt:3: ILSVRC2012_ID 1001 is not in"),
])
def test_ground_truth_lines(val, line, message):
    ids = [str(i) for i in GT_IDS]
    ids[2] = line
    _lines(val["gt"], ids)
    _error(ImageNetValSource, val["root"], val["gt"], val["clsloc"], match=message)


def test_ground_truth_coverage(val):
    _lines(val["gt"], [str(i) for i in GT_IDS[:5]])
    _error(ImageNetValSource, val["root"], val["gt"], val["clsloc"],
           match=r"val/ILSVRC2012_val_00000006\.JPEG: no label: .*ground_truth\.txt has 5 lines")
    _lines(val["gt"], [str(i) for i in GT_IDS])
    (val["root"] / "ILSVRC2012_val_00000004.JPEG").unlink()
    _error(ImageNetValSource, val["root"], val["gt"], val["clsloc"],
           match=r"ground_truth\.txt:4: labels image ILSVRC2012_val_00000004, which is not in .*val "
                 r"\(5 of the 6")
    (val["root"] / "holiday.jpg").write_bytes(_jpeg(9))
    _error(ImageNetValSource, val["root"], val["gt"], val["clsloc"],
           match=r"val/holiday\.jpg: not named ILSVRC2012_val_<number>, so no line of")


def test_ground_truth_needs_the_ids(val):
    _error(ImageNetValSource, val["root"], val["gt"], val["mapping"],
           match=r"LOC_synset_mapping\.txt:1: expected 'n02119789 1 kit_fox' \(synset, ILSVRC2012_ID, name")
    _lines(val["clsloc"], ["n02119789 1 kit_fox", "n01440764 1 tench"])
    _error(ImageNetValSource, val["root"], val["gt"], val["clsloc"],
           match=r"map_clsloc\.txt:2: ILSVRC2012_ID 1 is listed again \(first on line 1\)")
    _lines(val["clsloc"], ["n02119789 1 kit_fox", "n02119789 2 kit_fox"])
    _error(ImageNetValSource, val["root"], val["gt"], val["clsloc"],
           match=r"map_clsloc\.txt:2: synset n02119789 is listed again")
    _lines(val["clsloc"], ["kit_fox 1 n02119789"])
    _error(ImageNetValSource, val["root"], val["gt"], val["clsloc"],
           match=r"map_clsloc\.txt:1: expected a synset such as n01440764 first")


@pytest.mark.parametrize(("row", "message"), [
    ("ILSVRC2012_val_00000009,n01440764 1 2 3 4", r"LOC_val_solution\.csv:8: image ILSVRC2012_val_00000009 "
                                                  r"is not in .*val"),
    ("ILSVRC2012_val_00000001,n04444444 1 2 3 4", r"LOC_val_solution\.csv:8: synset 'n04444444' is not in "
                                                  r".*LOC_synset_mapping\.txt"),
    ("ILSVRC2012_val_00000001,n01440764 1 2 3 4", r"LOC_val_solution\.csv:8: image ILSVRC2012_val_00000001 "
                                                  r"is listed again \(first on line 7\)"),
    ("ILSVRC2012_val_00000001,", r"LOC_val_solution\.csv:8: expected 'ImageId,<synset> <box> \.\.\.'"),
])
def test_csv_rows(val, row, message):
    text = val["csv"].read_text().splitlines()
    _lines(val["csv"], [*text, row])
    _error(ImageNetValSource, val["root"], val["csv"], val["mapping"], match=message)


def test_csv_coverage_and_header(val):
    text = val["csv"].read_text().splitlines()
    _lines(val["csv"], [t for t in text if not t.startswith("ILSVRC2012_val_00000003,")])
    _error(ImageNetValSource, val["root"], val["csv"], val["mapping"],
           match=r"val/ILSVRC2012_val_00000003\.JPEG: no label: .*LOC_val_solution\.csv has no row for")
    _lines(val["csv"], text[1:])
    _error(ImageNetValSource, val["root"], val["csv"], val["mapping"],
           match=r"LOC_val_solution\.csv:1: expected the header 'ImageId,PredictionString'")


def test_missing_things(val, tmp_path):
    _error(ImageNetValSource, tmp_path / "nope", val["gt"], val["clsloc"],
           match=r"nope: validation folder not found")
    _error(ImageNetValSource, val["root"], tmp_path / "gt.txt", val["clsloc"], match=r"gt\.txt: not found")
    _error(ImageNetValSource, val["root"], val["gt"], tmp_path / "map.txt", match=r"map\.txt: not found")
    _error(ImageNetValSource, val["train"], val["gt"], val["clsloc"],
           match=r"train: no images directly in the folder; a validation set sorted into synset folders is "
                 "an imagefolder source")
