"""bctkit: backward-compatible training of embedding models."""

__version__ = "0.1.0"
