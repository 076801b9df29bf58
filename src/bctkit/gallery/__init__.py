"""Versioned gallery: items embedded by several model versions, searched together through
compatibility certificates, on a backend the store string picks (:mod:`bctkit.gallery.interface`)."""

from bctkit.gallery.backends.sqlite.store import GalleryStore
from bctkit.gallery.checks import GalleryError
from bctkit.gallery.interface import Gallery, create_gallery, open_gallery, parse_store
from bctkit.gallery.search import SearchResult

__all__ = ["Gallery", "GalleryError", "GalleryStore", "SearchResult", "create_gallery", "open_gallery",
           "parse_store"]
