"""Storage: how bctkit writes and reads files, and reads rows of large feature matrices.

- :mod:`~bctkit.storage.atomic`: atomic writing (:func:`atomic_path`), the base of every write.
- :mod:`~bctkit.storage.jsonfiles`: strict JSON files.
- :mod:`~bctkit.storage.tensors`: safetensors files with bctkit's metadata (never pickle).
- :mod:`~bctkit.storage.folders`: the cache root and the check that an output folder is writable.
- :mod:`~bctkit.storage.rows`: chunked row reading of feature matrices, memmaps included (imported
  from there; not re-exported here).
"""

from bctkit.storage.atomic import STALE_FOREIGN_S, TMP_SUFFIX, _fsync_dir, atomic_path, write_text
from bctkit.storage.folders import cache_home, check_writable_dir
from bctkit.storage.jsonfiles import MAX_JSON_DEPTH, json_problem, json_safe, read_json, write_json
from bctkit.storage.tensors import META_KEY, load_tensors, read_header, save_tensors

__all__ = [
    "MAX_JSON_DEPTH",
    "META_KEY",
    "STALE_FOREIGN_S",
    "TMP_SUFFIX",
    "_fsync_dir",
    "atomic_path",
    "cache_home",
    "check_writable_dir",
    "json_problem",
    "json_safe",
    "load_tensors",
    "read_header",
    "read_json",
    "save_tensors",
    "write_json",
    "write_text",
]
