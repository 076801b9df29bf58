"""Versioned gallery store: items embedded by several model versions, searched together through
compatibility certificates (:mod:`bctkit.gallery.backends.sqlite.store`, :mod:`bctkit.gallery.search`)."""

from bctkit.gallery.backends.sqlite.store import GalleryError, GalleryStore
from bctkit.gallery.search import SearchResult

__all__ = ["GalleryError", "GalleryStore", "SearchResult"]
