"""Versioned gallery store: items embedded by several model versions, searched together through
compatibility certificates (:mod:`bctkit.gallery.store`, :mod:`bctkit.gallery.search`)."""

from bctkit.gallery.search import SearchResult
from bctkit.gallery.store import GalleryError, GalleryStore

__all__ = ["GalleryError", "GalleryStore", "SearchResult"]
