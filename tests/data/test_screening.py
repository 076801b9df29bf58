"""Screening: identities the allocation or the evaluation cannot use are refused by name."""

import numpy as np
import pytest

from bctkit.data.screening import check_identities, describe_notes, drop_small_identities
from bctkit.data.sources import ArraySource
from bctkit.errors import DataError


def _src(labels, name="pool"):
    labels = np.asarray(labels)
    return ArraySource(np.zeros((len(labels), 1, 2, 2), np.uint8), labels, name)


def test_one_image_identity_refused_for_data_splits_only():
    pool, held = _src([0, 0, 1, 2, 2]), _src([5, 5, 6, 6], "held")
    for scenario in ("extended-data", "open-data", "identical-data"):
        with pytest.raises(DataError, match=r"pool: identity '1' has 1 image; the .*-data allocation .* "
                                            r"\(1 identities have 1\): set data\.min_images: 2"):
            check_identities(pool, scenario, held, 1)
    for scenario in ("extended-class", "open-class"):
        check_identities(pool, scenario, held, 1)


def test_held_out_identity_needs_a_probe():
    pool = _src([0, 0, 1, 1])
    with pytest.raises(DataError, match=r"held: identity '6' has 2 image\(s\); .*gallery_per_class=2"):
        check_identities(pool, "open-class", _src([5, 5, 5, 6, 6], "held"), 2)
    check_identities(pool, "open-class", _src([5, 5, 5, 6, 6], "held"), 1)


def test_drop_small_identities_and_notes():
    notes: dict = {}
    out = drop_small_identities(_src([0, 1, 1, 2, 2, 2, 3]), 2, notes)
    assert out.labels.tolist() == [1, 1, 2, 2, 2] and out.indices.tolist() == [1, 2, 3, 4, 5]
    assert notes == {"dropped_identities": 2, "dropped_images": 2}
    text = describe_notes({**notes, "skipped_corrupt": 3, "test_skipped_corrupt": 1})
    assert text == ("; 3 undecodable images skipped (training source), 1 undecodable images skipped "
                    "(test source), 2 identities with too few images dropped (2 images)")
    assert describe_notes({}) == ""
