"""Five-point face alignment to the 112 x 112 ArcFace crop, with numpy and Pillow only.

The target is the template insightface aligns every face to (``arcface_dst`` in its
``face_align.py``; x, y in pixels of the 112 x 112 crop, in the detector's landmark order):

====================  ===================
eye on image left     (38.2946, 51.6963)
eye on image right    (73.5318, 51.5014)
nose tip              (56.0252, 71.7366)
mouth corner, left    (41.5493, 92.3655)
mouth corner, right   (70.7299, 92.2041)
====================  ===================

:func:`similarity_transform` is Umeyama's least-squares fit of rotation, uniform scale and
translation (no reflection, no shear): the transform insightface estimates with scikit-image's
``SimilarityTransform``. :func:`warp_face` applies it with Pillow's bilinear affine warp, black
outside the source.

Coordinates follow the pixel-index convention of OpenCV and of the landmark files: the centre of
the pixel in column i, row j is the point (i, j). Pillow puts that centre at (i + 0.5, j + 0.5);
:func:`warp_face` converts, so the crop equals what ``cv2.warpAffine(img, M, (112, 112))`` makes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from bctkit.errors import DataError

__all__ = ["ARCFACE_SIZE", "ARCFACE_TEMPLATE", "align_face", "arcface_matrix", "similarity_transform",
           "warp_face"]

ARCFACE_SIZE = 112
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def _points(x: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(x, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 2:
        raise DataError(f"{name} must be an (n, 2) array of n >= 2 points, got shape {list(p.shape)}")
    if not np.isfinite(p).all():
        raise DataError(f"{name} contains NaN or Inf; expected finite pixel coordinates")
    return p


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 matrix [s R | t] minimising sum_k |s R src_k + t - dst_k|^2 over s > 0 and proper
    rotations R (Umeyama 1991): the centred cross-covariance's SVD gives R, with the sign of the
    last singular direction flipped when that is needed to keep det R = +1.

    DataError when the source points all coincide (no scale can be fitted).
    """
    s = _points(src, "src")
    d = _points(dst, "dst")
    if s.shape != d.shape:
        raise DataError(f"src has {s.shape[0]} points but dst has {d.shape[0]}; expected equal")
    s_mean, d_mean = s.mean(0), d.mean(0)
    sc, dc = s - s_mean, d - d_mean
    var = float((sc**2).sum()) / s.shape[0]
    if var <= 1e-12 * max(1.0, float(np.abs(s).max())) ** 2:
        raise DataError("src points all coincide; a similarity transform needs distinct landmarks")
    cov = dc.T @ sc / s.shape[0]
    u, sing, vt = np.linalg.svd(cov)
    sign = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    rot = u @ np.diag(sign) @ vt
    scale = float(sing @ sign) / var
    shift = d_mean - scale * rot @ s_mean
    return np.hstack([scale * rot, shift[:, None]])


def arcface_matrix(landmarks: np.ndarray) -> np.ndarray:
    """2 x 3 similarity transform taking five landmarks ([5, 2], pixel-index coordinates of the
    source image) onto :data:`ARCFACE_TEMPLATE`."""
    lm = _points(landmarks, "landmarks")
    if lm.shape[0] != 5:
        raise DataError(f"landmarks must be 5 points, got {lm.shape[0]}")
    return similarity_transform(lm, ARCFACE_TEMPLATE)


def warp_face(img: Image.Image, matrix: np.ndarray, size: tuple[int, int] = (ARCFACE_SIZE, ARCFACE_SIZE)
              ) -> Image.Image:
    """``img`` warped by the forward 2 x 3 ``matrix`` (source -> crop, pixel-index coordinates) into a
    ``size`` = (width, height) crop: bilinear, black where the source has no pixels.

    Pillow's AFFINE transform takes the inverse map in its own half-pixel-shifted coordinates, so
    the inverse is taken here and shifted by half a pixel on both sides.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3) or not np.isfinite(m).all():
        raise DataError(f"matrix must be a finite 2 x 3 affine matrix, got shape {list(m.shape)}")
    a, t = m[:, :2], m[:, 2]
    if abs(np.linalg.det(a)) < 1e-12:
        raise DataError("matrix is singular; expected an invertible affine map")
    ai = np.linalg.inv(a)
    half = np.array([0.5, 0.5])
    c = ai @ (-half - t) + half
    coeffs = (ai[0, 0], ai[0, 1], c[0], ai[1, 0], ai[1, 1], c[1])
    return img.transform(size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


def align_face(img: Image.Image, landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> Image.Image:
    """The ``size`` x ``size`` ArcFace crop of ``img`` (``size`` = 112, or a multiple of it with the
    template scaled alike) from its five landmarks."""
    if size < 1 or size % ARCFACE_SIZE:
        raise DataError(f"alignment size must be a positive multiple of {ARCFACE_SIZE}, got {size}")
    lm = _points(landmarks, "landmarks")
    if lm.shape[0] != 5:
        raise DataError(f"landmarks must be 5 points, got {lm.shape[0]}")
    matrix = similarity_transform(lm, ARCFACE_TEMPLATE * (size / ARCFACE_SIZE))
    return warp_face(img, matrix, (size, size))
