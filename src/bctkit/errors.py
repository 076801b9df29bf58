"""Typed exceptions. Every user-facing failure is a BctkitError; the CLI prints it on one line, exit 2."""


class BctkitError(Exception):
    """Base class of every error bctkit raises on bad input or bad configuration."""


class ConfigError(BctkitError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, conflicting options)."""


class DataError(BctkitError, ValueError):
    """Input data is unusable: NaN/Inf features, mismatched shapes, empty classes, unknown labels."""


class FileFormatError(BctkitError, OSError):
    """A file is missing, truncated, corrupt or not what bctkit expected."""


class TrainingError(BctkitError, RuntimeError):
    """Training cannot go on (the loss became NaN or Inf, a checkpoint belongs to another run)."""
