"""Strict JSON files: written atomically with null for NaN / Inf, read with one-line errors that name
the file (and the field of a NaN or of too deep a nesting)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from bctkit.errors import FileFormatError
from bctkit.storage.atomic import write_text


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented strict JSON, atomically: NaN and Inf (not measurable) become null,
    since strict JSON parsers reject the NaN literal."""
    write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy / torch scalars as Python numbers, paths as strings, tuples as lists and every
    NaN or Inf as None, ready for strict JSON."""
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return json_safe(obj.item())
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


MAX_JSON_DEPTH = 100
"""Deepest nesting of objects and lists bctkit reads from a JSON file (its own files nest a few
levels); deeper input is refused on one line rather than exhausting the recursion of later code."""


def read_json(path: str | os.PathLike[str], *, allow_nan: bool = False) -> Any:
    """Read a JSON file, with a one-line :class:`FileFormatError` naming the file when it is missing,
    unreadable, corrupt, nested deeper than :data:`MAX_JSON_DEPTH`, or (unless ``allow_nan``: reports
    of older bctkit versions hold NaN for values not measurable) has a NaN or Infinity, which strict
    JSON has not; the message names the field."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found") from None
    except RecursionError:
        raise FileFormatError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise FileFormatError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    problem = json_problem(obj, allow_nan)
    if problem:
        raise FileFormatError(f"{path}: {problem}")
    return obj


def json_problem(obj: Any, allow_nan: bool = False) -> str | None:
    """What makes parsed JSON ``obj`` unusable, or None: nesting deeper than :data:`MAX_JSON_DEPTH`,
    or (unless ``allow_nan``) a NaN or infinite number, named by its field (``a.b[2]``). Walks
    iteratively, so any depth is checked without recursion."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, float) and not allow_nan and not math.isfinite(value):
            literal = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
            return (f"field '{where or '(the whole document)'}' is {literal}; expected a finite number or "
                    "null (strict JSON has no NaN or Infinity)")
        if isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                return f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            children = [(v, _field(where, k, isinstance(value, list)), depth + 1) for k, v in items]
            stack.extend(reversed(children))
    return None


def _field(parent: str, key: Any, index: bool) -> str:
    """The path of a child in :func:`json_problem`'s messages: ``a.b`` for a key, ``a[2]`` for an index."""
    if index:
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)
