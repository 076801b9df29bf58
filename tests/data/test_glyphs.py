"""The glyphs dataset: open-set split, distinct faces, cache, determinism, augmentation, missing fonts.

These tests need the CJK fonts that scripts/setup.sh installs; without them they fail and say which
Debian packages to install (never skip). A small character range keeps them fast.
"""

import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bctkit.data import SCENARIOS, allocate
from bctkit.data import glyphs as g
from bctkit.data.datasets import DataConfig, load_datasets
from bctkit.data.glyphs import GlyphsConfig, load_glyphs, scan, source
from bctkit.data.sources import ArraySource
from bctkit.engine.loader import Batch, Feed
from bctkit.errors import ConfigError, DataError

EVAL_CLASSES, EVAL_IMAGES = 8, 3


def small(cache: Path, **kw) -> GlyphsConfig:
    opts = {"num_classes": 12, "images_per_class": 4, "size": 16, "char_ranges": ["4E00-4E7F"],
            "cache_dir": str(cache)}
    return GlyphsConfig(**{**opts, **kw})


def _load(cfg: GlyphsConfig):
    try:
        return load_glyphs(cfg, EVAL_CLASSES, EVAL_IMAGES, progress=False)
    except DataError as exc:
        pytest.fail(f"CJK fonts are missing (run scripts/setup.sh): {exc}")


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A cache holding the scan and both rendered splits of the small config."""
    cache = tmp_path_factory.mktemp("glyphs-cache")
    pool, held = _load(small(cache))
    return cache, pool, held


def _cached(cache: Path, split: str, images: ArraySource, suffix: str) -> Path:
    """The cache file of ``images`` (its name ends with the first 8 characters of the cache key)."""
    key = re.search(r"([0-9a-f]{8})\)$", images.name).group(1)
    (path,) = (cache / "glyphs").glob(f"{split}-{key}*.{suffix}")
    return path


def _manifest(cache: Path, split: str, images: ArraySource) -> dict:
    return json.loads(_cached(cache, split, images, "json").read_text())


def _forbid_rendering(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("rendered or scanned although the cache should have answered")

    for module, name in ((source, "render_image"), (scan, "render_clean"), (scan, "read_faces")):
        monkeypatch.setattr(module, name, boom)


def test_eval_identities_never_in_training(warm):
    cache, pool, held = warm
    train_chars = _manifest(cache, "train", pool)["characters"]
    eval_chars = _manifest(cache, "eval", held)["characters"]
    assert len(train_chars) == 12 and len(eval_chars) == EVAL_CLASSES
    assert not set(train_chars) & set(eval_chars)
    assert pool.images.shape == (12 * 4, 1, 16, 16)
    assert held.images.shape == (EVAL_CLASSES * EVAL_IMAGES, 1, 16, 16)
    assert np.array_equal(pool.labels, np.repeat(np.arange(12), 4))
    assert np.array_equal(held.labels, np.repeat(np.arange(EVAL_CLASSES), EVAL_IMAGES))
    for scenario in SCENARIOS:
        a = allocate(pool.labels, scenario, 0.3, seed=1)
        used = {train_chars[c] for c in pool.labels[np.r_[a.old_indices, a.new_indices]]}
        assert used <= set(train_chars) and not used & set(eval_chars)


def test_kept_characters_have_min_faces_distinct_clean_renderings(warm):
    cfg = small(warm[0])
    table = g.scan_fonts(cfg, progress=False)
    eligible = table.eligible(cfg.min_faces)
    assert len(eligible) >= 20
    for char in eligible:
        faces = table.faces_of(char)
        assert len(faces) >= cfg.min_faces
        images = [g.render_clean(f, char, g.SCAN_SIZE, g.SCAN_MARGIN) for f in faces]
        assert all(im is not None and im.max() > 0 for im in images)
        assert len({im.tobytes() for im in images}) == len(images)
        blurred = [scan._blurred(im) for im in images]
        for a, b in itertools.combinations(blurred, 2):
            assert np.abs(a - b).mean() > cfg.distinct_threshold
        for face, im in zip(faces, blurred, strict=True):
            tofu = g.render_clean(face, g.MISSING_CODEPOINT, g.SCAN_SIZE, g.SCAN_MARGIN)
            assert tofu is None or np.abs(scan._blurred(tofu) - im).mean() > cfg.distinct_threshold


def test_second_load_reads_the_cache(warm, monkeypatch):
    cache, pool, held = warm
    _forbid_rendering(monkeypatch)
    pool2, held2 = load_glyphs(small(cache), EVAL_CLASSES, EVAL_IMAGES, progress=False)
    assert np.array_equal(pool.images, pool2.images) and np.array_equal(held.images, held2.images)
    assert np.array_equal(pool.labels, pool2.labels) and pool.name == pool2.name


def test_cold_and_warm_loads_give_the_same_arrays_and_batches(warm, monkeypatch):
    """The first load renders (cold), later ones read the cache (warm): they must give the same
    pixels in the same memory layout. The cold load once returned the rendered stack with a
    zero-stride channel axis (``stack[:, None]``); a batch gathered from it had channels-last
    strides, so torch ran other convolution and BatchNorm kernels than on the warm array (standard
    strides from the file), and the first run of a config trained other weights than every later
    one. Now both loads read the file, and batches are copied into contiguous NCHW tensors."""
    cache, pool, held = warm  # the fixture's load was the cold one
    _forbid_rendering(monkeypatch)
    pool2, held2 = _load(small(cache))
    batches = [Batch(0, 0, np.array([5, 0, 17, 3, 9], dtype=np.int64))]
    for cold, again in ((pool, pool2), (held, held2)):
        assert np.array_equal(cold.images, again.images) and cold.images.strides == again.images.strides
        assert cold.images.flags.c_contiguous and min(cold.images.strides) > 0
        (x_cold, _, _), = Feed(cold).read(batches)
        (x_warm, _, _), = Feed(again).read(batches)
        assert torch.equal(x_cold, x_warm) and x_cold.stride() == x_warm.stride() and x_cold.is_contiguous()


def test_a_batch_from_a_zero_stride_channel_axis_is_plain_nchw():
    """Whatever strides a source array has, the batch a model sees is contiguous NCHW (the layout
    decides which kernels torch runs, hence the rounding of every training step)."""
    stack = np.random.default_rng(0).integers(0, 256, (20, 16, 16), dtype=np.uint8)
    odd = ArraySource(stack[:, None], np.arange(20) // 2)
    plain = ArraySource(np.ascontiguousarray(stack[:, None]).copy(), np.arange(20) // 2)
    assert odd.images.strides[1] == 0
    batches = [Batch(0, 0, np.array([7, 1, 12], dtype=np.int64))]
    (a, _, _), = Feed(odd).read(batches)
    (b, _, _), = Feed(plain).read(batches)
    assert torch.equal(a, b) and a.stride() == b.stride() == (256, 256, 16, 1)


def test_data_config_loads_glyphs_from_the_cache(warm, monkeypatch):
    cache, pool, held = warm
    _forbid_rendering(monkeypatch)
    cfg = DataConfig(dataset="glyphs", glyphs=small(cache), eval_classes=EVAL_CLASSES,
                     eval_images_per_class=EVAL_IMAGES)
    assert (cfg.channels, cfg.image_size) == (1, (16, 16))
    got_pool, got_held = load_datasets(cfg)
    assert got_pool.fingerprint() == pool.fingerprint() and got_held.fingerprint() == held.fingerprint()
    assert "synthetic" not in cfg.model_dump() and "glyphs" not in DataConfig().model_dump()


def test_changed_seed_or_size_renders_again(warm, monkeypatch):
    cache, pool, _ = warm
    calls = []
    original = g.render_image

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(source, "render_image", counting)
    other_seed, _ = _load(small(cache, seed=1))
    assert calls and not np.array_equal(other_seed.images, pool.images)
    calls.clear()
    bigger, _ = _load(small(cache, size=20))
    assert calls and bigger.images.shape == (48, 1, 20, 20)
    calls.clear()
    noisier, _ = _load(small(cache, noise=0.2))
    assert calls and not np.array_equal(noisier.images, pool.images)


def test_a_bigger_pool_keeps_the_images_and_the_evaluation_set(warm):
    cache, pool, held = warm
    bigger, same_held = _load(small(cache, num_classes=14))
    assert bigger.num_classes == 14 and np.array_equal(bigger.images[: len(pool)], pool.images)
    assert np.array_equal(same_held.images, held.images) and same_held.name == held.name


def test_corrupt_image_cache_is_rendered_again(warm, tmp_path):
    cache, pool, _ = warm
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    images = _cached(copy, "train", pool, "npy")
    images.write_bytes(images.read_bytes()[:100])
    with pytest.warns(UserWarning, match="corrupt image cache"):
        again, _ = _load(small(copy))
    assert np.array_equal(again.images, pool.images)


def test_fresh_caches_give_identical_data(warm, tmp_path):
    _, pool, held = warm
    pool2, held2 = _load(small(tmp_path / "fresh"))
    assert np.array_equal(pool.images, pool2.images) and np.array_equal(held.images, held2.images)


def test_augmentation_changes_images(warm):
    cfg = small(warm[0])
    table = g.scan_fonts(cfg, progress=False)
    char = table.eligible(cfg.min_faces)[0]
    face = table.faces_of(char)[0]
    clean = g.render_clean(face, char, 24, cfg.margin)
    still = {k: 0.0 for k in cfg.augmentation()} | {"margin": cfg.margin}
    assert np.array_equal(g.render_image(face, char, 24, still, 0, 0), clean)
    copies = [g.render_image(face, char, 24, cfg.augmentation(), 0, k) for k in range(4)]
    assert all(np.abs(c.astype(int) - clean).mean() > 3 for c in copies)
    assert len({c.tobytes() for c in copies}) == 4
    assert np.array_equal(copies[0], g.render_image(face, char, 24, cfg.augmentation(), 0, 0))
    strong = {"occlusion_prob": 1.0, "stroke_prob": 1.0, "occlusion_size": 0.5}
    for name in still:
        if name in ("margin", "occlusion_size"):
            continue
        alone = still | {name: strong.get(name, cfg.augmentation()[name])}
        if name == "occlusion_prob":
            alone["occlusion_size"] = 0.5
        changed = [g.render_image(face, char, 24, alone, 0, k) for k in range(4)]
        assert any(not np.array_equal(c, clean) for c in changed), name


def test_more_images_than_faces_reuse_faces_with_new_copies(warm):
    cfg = small(warm[0])
    table = g.scan_fonts(cfg, progress=False)
    char = table.eligible(cfg.min_faces)[0]
    n = len(table.faces_of(char))
    plan = g.image_plan(table, char, 2 * n + 1, cfg.seed)
    assert {f for f, _ in plan[:n]} == set(table.faces_of(char))
    assert [k for _, k in plan] == [0] * n + [1] * n + [2]
    assert [f for f, _ in plan[n: 2 * n]] == [f for f, _ in plan[:n]] and plan[2 * n][0] == plan[0][0]


def test_validation_characters_are_apart_and_leave_the_other_sets_alone(warm):
    cache, pool, held = warm
    cfg = small(cache)
    pool2, test2 = load_glyphs(cfg, EVAL_CLASSES, EVAL_IMAGES, progress=False, validation_classes=5)
    assert np.array_equal(pool2.images, pool.images) and np.array_equal(test2.images, held.images)
    assert test2.name == held.name
    pool3, val = load_glyphs(cfg, EVAL_CLASSES, EVAL_IMAGES, progress=False, validation_classes=5,
                             split="validation")
    assert np.array_equal(pool3.images, pool.images) and val.name.startswith("glyphs validation (5 ")
    assert val.images.shape == (5 * EVAL_IMAGES, 1, 16, 16)
    assert np.array_equal(val.labels, np.repeat(np.arange(5), EVAL_IMAGES))
    val_chars = _manifest(cache, "validation", val)["characters"]
    train_chars = _manifest(cache, "train", pool)["characters"]
    eval_chars = _manifest(cache, "eval", held)["characters"]
    assert len(set(val_chars)) == 5 and not set(val_chars) & (set(train_chars) | set(eval_chars))
    # the characters that come right after training's in the seeded order: a bigger pool takes them
    bigger, _ = _load(small(cache, num_classes=17))
    assert np.array_equal(_manifest(cache, "train", bigger)["characters"][12:], val_chars)
    with pytest.raises(ConfigError, match="split='validation' needs validation_classes >= 2"):
        load_glyphs(cfg, EVAL_CLASSES, EVAL_IMAGES, progress=False, split="validation")


def test_too_few_identities_says_how_many(warm):
    with pytest.raises(DataError, match=r"found \d+ characters .* need 1008;.*fonts-wqy-zenhei"):
        load_glyphs(small(warm[0], num_classes=1000), EVAL_CLASSES, EVAL_IMAGES, progress=False)


@pytest.mark.parametrize("dirs", [["empty"], ["does-not-exist"]])
def test_no_fonts_names_the_debian_packages(tmp_path, dirs):
    (tmp_path / "empty").mkdir()
    cfg = small(tmp_path / "cache", font_dirs=[str(tmp_path / d) for d in dirs])
    with pytest.raises(DataError) as err:
        load_glyphs(cfg, EVAL_CLASSES, EVAL_IMAGES, progress=False)
    message = str(err.value)
    assert "\n" not in message and "found 0 characters" in message and "need 20" in message
    assert all(p in message for p in g.FONT_PACKAGES)


def test_corrupt_font_is_skipped_with_a_warning(tmp_path):
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    (fonts / "broken.ttf").write_bytes(b"not a font" * 100)
    with pytest.warns(UserWarning, match="skipping unreadable font .*broken.ttf"), \
            pytest.raises(DataError, match="found 0 characters"):
        load_glyphs(small(tmp_path / "cache", font_dirs=[str(fonts)]), EVAL_CLASSES, EVAL_IMAGES,
                    progress=False)


@pytest.mark.parametrize("bad", [["9FFF-4E00"], ["4E00-ZZZZ"], ["110000-110001"], []])
def test_bad_character_ranges_are_rejected(bad):
    with pytest.raises(ValueError):
        GlyphsConfig(char_ranges=bad)


def test_a_new_font_file_invalidates_the_scan(warm, tmp_path):
    files = sorted({Path(f.path) for f in g.scan_fonts(small(warm[0]), progress=False).faces})
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    for f in files[:2]:
        (fonts / f.name).symlink_to(f)
    cfg = small(tmp_path / "cache", font_dirs=[str(fonts)], min_faces=1)
    before = g.scan_fonts(cfg, progress=False)
    (fonts / files[2].name).symlink_to(files[2])
    after = g.scan_fonts(cfg, progress=False)
    assert after.key != before.key and len(after.faces) > len(before.faces)
    assert {f.path for f in after.faces} <= {str(f) for f in files[:3]}
