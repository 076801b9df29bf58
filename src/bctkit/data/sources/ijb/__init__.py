"""``ijb``: IJB-B / IJB-C as insightface distributes them (``<root>/meta``, ``<root>/loose_crop``).

Files, with ``<name>`` = ``ijbb`` or ``ijbc``, all UTF-8 text, one record per line (blank lines are
skipped, line ends stripped; line numbers in errors count every line):

- ``meta/<name>_face_tid_mid.txt``: ``image template media``, three fields separated by single
  spaces, no header; one line per face image (``1.jpg 1 69544``).
- ``meta/<name>_name_5pts_score.txt``: ``image x1 y1 ... x5 y5 score``, twelve fields separated by
  single spaces, no header: the five landmarks (pixel-index coordinates of the loose crop) and the
  face detector's score. Line k describes the same image as line k of the tid_mid file.
- ``meta/<name>_template_pair_label.txt``: ``template1 template2 label`` (label 1 genuine, 0 impostor),
  single spaces, no header; read by :func:`read_pairs` for the 1:1 protocol.
- ``loose_crop/<image>``: the image files.
- 1:N (optional, all three or none): comma-separated files with one header line whose first two
  columns are ``TEMPLATE_ID,SUBJECT_ID`` and one row per image, each row with as many columns as
  the header. IJB-C: ``ijbc_1N_gallery_G1.csv``, ``ijbc_1N_gallery_G2.csv``,
  ``ijbc_1N_probe_mixed.csv``; IJB-B: ``ijbb_1N_gallery_S1.csv``, ``ijbb_1N_gallery_S2.csv``,
  ``ijbb_1N_probe_mixed.csv`` (either gallery spelling is accepted for both sets).

Image i of the source is record i of the tid_mid file: decoded on demand, aligned from its landmarks
to the 112 x 112 ArcFace crop (:mod:`bctkit.data.align`), RGB. Its label is the subject id of its
template where the 1:N files name one (subject ids must then be >= 1), else 0 (no known subject); the
1:1 protocol never uses the labels. ``key(i)`` is the image name.

Construction reads and checks the metadata and that every image file exists, and decodes nothing.
Its identity is the dataset name and a hash of each metadata file's bytes.
"""

from bctkit.data.sources.ijb.pairs import Pairs, read_pairs
from bctkit.data.sources.ijb.source import DATASETS, IJBSource, TemplateList

__all__ = ["DATASETS", "IJBSource", "Pairs", "TemplateList", "read_pairs"]
