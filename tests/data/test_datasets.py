"""Data configs for file datasets, the seeded identity split, separate evaluation sources, skipping
corrupt images and small identities."""

import numpy as np
import pytest
from pydantic import ValidationError

from bctkit.data.datasets import DataConfig, SourceConfig, identity_split, load_data
from bctkit.data.sources import ImageFolderSource
from bctkit.errors import DataError
from bctkit.run.config import RunConfig
from tests.data.sources.conftest import encoded_images, write_folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BCTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))


def test_config_sections():
    with pytest.raises(ValidationError, match=r"is imagefolder: set data\.imagefolder: \{root: DIR\}"):
        DataConfig(dataset="imagefolder")
    with pytest.raises(ValidationError, match=r"data\.list is set but data\.dataset is imagefolder"):
        DataConfig(dataset="imagefolder", imagefolder={"root": "x"}, list={"file": "y"})
    with pytest.raises(ValidationError, match=r"data\.eval .* needs a file dataset"):
        DataConfig(eval={"dataset": "list", "list": {"file": "y"}})
    with pytest.raises(ValidationError, match="unknown_key|extra"):
        DataConfig(dataset="recordio", recordio={"path": "x", "unknown_key": 1})
    cfg = DataConfig(dataset="recordio", recordio={"path": "/d"}, eval={"dataset": "imagefolder",
                                                                      "imagefolder": {"root": "/e"}})
    dump = cfg.model_dump(mode="json")
    assert dump["recordio"] == {"path": "/d", "prefix": "train"}
    assert dump["eval"] == {"dataset": "imagefolder", "imagefolder": {"root": "/e"}}
    assert not {"synthetic", "glyphs", "imagefolder", "list", "validation"} & set(dump)
    assert cfg.channels is None and cfg.image_size is None
    sized = DataConfig(dataset="list", list={"file": "f"}, transform={"resize": 112, "color": "rgb"})
    assert (sized.channels, sized.image_size) == (3, (112, 112))
    crop = DataConfig(dataset="list", list={"file": "f"}, transform={"resize": [256, 128], "color": "rgb"})
    assert crop.image_size == (256, 128)


def test_identity_split():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 9, 40)
    labels = rng.permutation(np.repeat(np.arange(40), counts))
    pool, test, val = identity_split(labels, 6, 4, 5, seed=3, name="x")
    assert len(np.unique(labels[test])) == 6 and len(np.unique(labels[val])) == 4
    assert not set(labels[pool]) & (set(labels[test]) | set(labels[val]))
    assert not set(labels[test]) & set(labels[val])
    assert set(labels[pool]) | set(labels[test]) | set(labels[val]) == set(range(40))
    for part in (test, val):
        assert (np.bincount(labels[part])[np.unique(labels[part])] == 5).all()  # the first 5 each
        assert (np.diff(part) > 0).all()
        for c in np.unique(labels[part]):
            assert part[labels[part] == c].tolist() == np.flatnonzero(labels == c)[:5].tolist()
    assert (counts[np.unique(labels[test])] >= 5).all()
    same_test = identity_split(labels, 6, 0, 5, seed=3, name="x")[1]
    assert np.array_equal(same_test, test)  # adding validation identities leaves the test set alone
    with pytest.raises(DataError, match="identities have >= 5 images .* needs 30 test"):
        identity_split(labels, 30, 0, 5, seed=3, name="x")


def _folder(tmp_path, name="ds", ids=8, per=5, seed=0):
    return write_folder(tmp_path / name, encoded_images(ids, per, size=(8, 8), seed=seed))


def test_load_split_and_separate_eval(tmp_path):
    root = _folder(tmp_path)
    cfg = DataConfig(dataset="imagefolder", imagefolder={"root": str(root)}, eval_classes=3,
                     eval_images_per_class=4, validation_classes=2)
    data = load_data(cfg, progress=False)
    src = ImageFolderSource(root)
    held = set(data.held_out.labels)
    assert len(held) == 3 and len(data.held_out) == 12 and not held & set(data.pool.labels)
    assert len(data.pool) == 3 * 5  # 8 identities - 3 test - 2 validation
    assert data.pool.parent.fingerprint() == src.fingerprint()
    val = load_data(cfg, progress=False, split="validation")
    assert np.array_equal(val.pool.labels, data.pool.labels)
    assert len(set(val.held_out.labels)) == 2 and not set(val.held_out.labels) & held
    other = _folder(tmp_path, "eval", ids=3, per=3, seed=9)
    sep = DataConfig(dataset="imagefolder", imagefolder={"root": str(root)},
                     eval={"dataset": "imagefolder", "imagefolder": {"root": str(other)}})
    data = load_data(sep, progress=False)
    assert len(data.pool) == 40 and len(data.held_out) == 9  # the whole source; the pool keeps all
    val_src = {"dataset": "imagefolder", "imagefolder": {"root": str(_folder(tmp_path, "val", 2, 3, 5))}}
    both = load_data(sep.model_copy(update={"validation": SourceConfig(**val_src)}), False, "validation")
    assert len(both.pool) == 40 and len(both.held_out) == 6
    run = RunConfig(data=sep.model_copy(update={"validation": SourceConfig(**val_src)}),
                    evaluation={"split": "validation"})
    assert run.data.validation_classes == 0  # a separate validation source needs no split


def test_skip_corrupt_and_min_images(tmp_path):
    root = _folder(tmp_path, ids=6, per=4)
    (root / "id02" / "img1.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    for f in list((root / "id05").iterdir())[1:]:
        f.unlink()
    base = {"dataset": "imagefolder", "imagefolder": {"root": str(root)}, "eval_classes": 2,
            "eval_images_per_class": 3, "num_workers": 0}
    data = load_data(DataConfig(**base, skip_corrupt=True, min_images=2), progress=False)
    assert data.notes["skipped_corrupt"] == 1 and data.notes["skipped_examples"][0].endswith("id02/img1.jpg")
    assert data.notes["dropped_identities"] == 1 and data.notes["dropped_images"] == 1
    assert 5 not in set(data.pool.labels) | set(data.held_out.labels)
    keys = {data.pool.key(i) for i in range(len(data.pool))}
    assert "id02/img1.jpg" not in keys
    again = load_data(DataConfig(**base, skip_corrupt=True, min_images=2), progress=False)
    assert np.array_equal(again.pool.labels, data.pool.labels)  # from the check's cache


def test_the_papers_formats_as_config_sections(tmp_path):
    """cifar, imagenet_val and gldv2 are data.dataset / data.eval formats like the others."""
    from tests.data.sources.cifar_files import make_splits, write_binary

    splits = make_splits("cifar10", train=10, test=4)
    write_binary(tmp_path / "cifar", "cifar10", splits)
    cifar = {"root": str(tmp_path / "cifar")}
    test = {"dataset": "cifar", "cifar": {**cifar, "split": "test"}}
    cfg = DataConfig(dataset="cifar", cifar=cifar, eval=test)
    data = load_data(cfg, progress=False)
    assert data.pool.labels.tolist() == splits["train"].fine.tolist()
    assert data.held_out.labels.tolist() == splits["test"].fine.tolist()
    assert data.held_out.name == "CIFAR-10 test"
    dump = cfg.model_dump(mode="json")
    assert dump["cifar"] == {**cifar, "variant": "auto", "form": "auto", "labels": "fine", "split": "train"}
    assert dump["eval"]["cifar"]["split"] == "test" and not {"list", "gldv2", "imagenet_val"} & set(dump)
    assert RunConfig(data=cfg).data.eval.cifar.split == "test"
    with pytest.raises(ValidationError, match=r"data\.dataset is cifar: set data\.cifar: \{root: DIR"):
        DataConfig(dataset="cifar")
    with pytest.raises(ValidationError, match=r"imagenet_val is set but dataset is gldv2"):
        SourceConfig(dataset="gldv2", gldv2={"root": "r"}, imagenet_val={"root": "v", "labels": "l",
                                                                        "synsets": "s"})
    with pytest.raises(ValidationError, match="coarse needs variant cifar100"):
        SourceConfig(dataset="cifar", cifar={"root": "r", "variant": "cifar10", "labels": "coarse"})
    gld = tmp_path / "gld"
    image = gld / "train" / "a" / "b" / "c" / "abcdef.jpg"
    image.parent.mkdir(parents=True)
    image.write_bytes(encoded_images(1, 2)[1][2])
    (gld / "train_clean.csv").write_text("landmark_id,images\n42,abcdef\n")
    src = SourceConfig(dataset="gldv2", gldv2={"root": str(gld)}).open()
    assert src.labels.tolist() == [0] and src.label_name(0) == "42"
    val = tmp_path / "val"
    val.mkdir()
    (val / "ILSVRC2012_val_00000001.JPEG").write_bytes(image.read_bytes())
    (tmp_path / "gt.txt").write_text("2\n")
    (tmp_path / "map_clsloc.txt").write_text("n02119789 1 kit_fox\nn01440764 2 tench\n")
    section = {"root": str(val), "labels": str(tmp_path / "gt.txt"),
               "synsets": str(tmp_path / "map_clsloc.txt")}
    src = SourceConfig(dataset="imagenet_val", imagenet_val=section).open()
    assert src.labels.tolist() == [0] and src.label_name(0) == "n01440764"
    listed = SourceConfig(dataset="list", list={"file": str(tmp_path / "l.txt"), "root": str(gld)})
    (tmp_path / "l.txt").write_text("/train/a/b/c/abcdef.jpg 3\n")
    assert listed.open().labels.tolist() == [3]
