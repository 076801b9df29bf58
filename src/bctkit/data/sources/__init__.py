"""Dataset sources: one module per format, one interface (:class:`DataSource`).

``imagefolder`` (root/<identity>/<image>), ``list`` (a ``path label`` file), ``recordio``
(insightface's train.rec / train.idx), and the embedded ``synthetic`` and ``glyphs`` sets as
in-memory :class:`ArraySource` s.
"""

from bctkit.data.sources.array import ArraySource
from bctkit.data.sources.base import CorruptImageError, DataSource, SubsetSource, decode_image
from bctkit.data.sources.imagefolder import ImageFolderConfig, ImageFolderSource
from bctkit.data.sources.listfile import ListConfig, ListSource
from bctkit.data.sources.recordio import RecordIOConfig, RecordIOSource

__all__ = [
    "ArraySource", "CorruptImageError", "DataSource", "ImageFolderConfig", "ImageFolderSource", "ListConfig",
    "ListSource", "RecordIOConfig", "RecordIOSource", "SubsetSource", "decode_image",
]
