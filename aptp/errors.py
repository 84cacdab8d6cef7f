"""Errors every aptp layer raises for bad input.

Torch-free on purpose: the runtime imports it too. The CLIs catch `AptpError` and print its
message without a traceback; anything else is a bug and keeps its traceback.
"""


class AptpError(Exception):
    """Base class: the message must name what is wrong and, where possible, the fix."""


class ConfigError(AptpError, ValueError):
    """A missing, malformed or inconsistent configuration."""


class DatasetError(AptpError, ValueError):
    """A dataset that cannot be read or holds no usable sample."""


class ArtifactError(AptpError):
    """A checkpoint, export or model file that is missing, of another format, or tampered with."""


class RuntimeInputError(AptpError, ValueError):
    """A bad request to the runtime (prompt, steps, guidance scale...)."""


class OutputError(ConfigError):
    """An output path aptp refuses to write: not new, not its own, overlapping an input, unwritable."""


class StorageError(AptpError):
    """Reading or writing files failed (disk full, permission denied, read-only filesystem...)."""


class DependencyError(AptpError, ImportError):
    """An optional package the call needs is not installed; the message names the extra to install."""
