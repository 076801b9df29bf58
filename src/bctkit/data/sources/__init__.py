"""Dataset sources: one module per format, one interface (:class:`DataSource`).

``imagefolder`` (root/<identity>/<image>), ``list`` (a ``path label`` file), ``recordio``
(insightface's train.rec / train.idx), ``cifar`` (CIFAR-10 / CIFAR-100, binary or python form),
``imagenet_val`` (a flat ILSVRC2012 validation folder and its label files), ``gldv2`` (GLDv2's
train_clean.csv), and the embedded ``synthetic`` and ``glyphs`` sets as in-memory
:class:`ArraySource` s. Test sets: ``ijb`` (IJB-B/C crops aligned from their landmarks),
``pairbin`` (insightface's verification .bin files), ``market`` (Market-1501 / DukeMTMC-reID folders
and :class:`ConcatSource`).
"""

from bctkit.data.sources.array import ArraySource
from bctkit.data.sources.base import CorruptImageError, DataSource, SubsetSource, decode_image
from bctkit.data.sources.cifar import CifarConfig, CifarSource
from bctkit.data.sources.gldv2 import GLDv2Config, GLDv2Source
from bctkit.data.sources.ijb import IJBSource
from bctkit.data.sources.imagefolder import ImageFolderConfig, ImageFolderSource
from bctkit.data.sources.imagenet import ImageNetValConfig, ImageNetValSource
from bctkit.data.sources.listfile import ListConfig, ListSource
from bctkit.data.sources.market import ConcatSource, ReIDFolderSource
from bctkit.data.sources.pairbin import PairBinSource
from bctkit.data.sources.recordio import RecordIOConfig, RecordIOSource

__all__ = [
    "ArraySource", "CifarConfig", "CifarSource", "ConcatSource", "CorruptImageError", "DataSource",
    "GLDv2Config", "GLDv2Source", "IJBSource", "ImageFolderConfig", "ImageFolderSource", "ImageNetValConfig",
    "ImageNetValSource", "ListConfig", "ListSource", "PairBinSource", "RecordIOConfig", "RecordIOSource",
    "ReIDFolderSource", "SubsetSource", "decode_image",
]
