"""``bctkit extract``: a saved model's features of every image of a dataset, in a feature file with
each row's key, resumable and split over torchrun's processes (:mod:`bctkit.extract.run`); the
models it reads (:mod:`bctkit.extract.model`)."""

from bctkit.extract.model import ExtractModel, open_model
from bctkit.extract.run import extract_to_file, partial_dir, row_keys

__all__ = ["ExtractModel", "extract_to_file", "open_model", "partial_dir", "row_keys"]
