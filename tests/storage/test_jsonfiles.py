"""Strict JSON: null for NaN / Inf on writing; NaN, Infinity and deep nesting refused on reading."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bctkit.errors import FileFormatError
from bctkit.storage import read_json, write_json


def test_json_is_strict_with_null_for_nan_and_inf(tmp_path):
    obj = {"a": math.nan, "b": [math.inf, 1.5, (-math.inf, 2)], "c": np.float32("nan"),
           "d": torch.tensor(float("-inf")), "e": np.float64(0.25), "f": {"g": np.int64(3)},
           "h": Path("x/y")}
    write_json(tmp_path / "r.json", obj)

    def refuse(name: str) -> None:
        raise ValueError(f"non-strict JSON constant {name}")

    back = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert back == {"a": None, "b": [None, 1.5, [None, 2]], "c": None, "d": None, "e": 0.25,
                    "f": {"g": 3}, "h": "x/y"}


def test_read_json_refuses_nan_infinity_and_deep_nesting_on_one_line(tmp_path):
    """What Python's json accepts but no bctkit file holds: NaN / Infinity (named by field; read as
    they are with allow_nan, as older reports hold NaN) and nesting that would exhaust recursion."""
    cases = {"nan.json": ('{"a": {"b": [1, NaN]}}', "field 'a.b[1]' is NaN"),
             "inf.json": ('[-Infinity]', "field '[0]' is -Infinity"),
             "deep.json": ("[" * 100_000 + "]" * 100_000, "JSON nested deeper than 100 levels"),
             "deep101.json": ("[" * 101 + "]" * 101, "JSON nested deeper than 100 levels")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(FileFormatError) as exc:
            read_json(tmp_path / name)
        assert str(exc.value).startswith(f"{tmp_path / name}: {message}") and "\n" not in str(exc.value)
    back = read_json(tmp_path / "nan.json", allow_nan=True)
    assert back["a"]["b"][0] == 1 and math.isnan(back["a"]["b"][1])
    (tmp_path / "deep100.json").write_text("[" * 100 + "]" * 100)
    assert read_json(tmp_path / "deep100.json") == json.loads("[" * 100 + "]" * 100)


def test_readers_of_user_json_refuse_deep_nesting(tmp_path):
    """The JSON files users hand bctkit outside read_json's direct callers: a run's reports
    (aggregate), a classifier's label map, a run's config.json (None: unreadable)."""
    from bctkit.errors import ConfigError
    from bctkit.oldside.classifier import _read_map
    from bctkit.run.aggregate import load_run
    from bctkit.run.keys import read_config

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "open-data").mkdir()
    (tmp_path / "open-data" / "report.json").write_text(deep)
    with pytest.raises(FileFormatError, match="report.json: JSON nested deeper than 100 levels"):
        load_run(tmp_path)
    (tmp_path / "map.json").write_text(deep)
    with pytest.raises(ConfigError, match="old.classifier.label_map: .*map.json: JSON nested deeper"):
        _read_map(tmp_path / "map.json")
    assert read_config(tmp_path / "map.json") is None
