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


def shown(value: object, limit: int = 60) -> str:
    """`value`'s repr for an error message, cut to about `limit` characters.

    A request may carry a 5,000-digit number or a megabyte string: its repr must neither flood
    the one-line message nor fail (Python refuses to print an int of more than 4,300 digits).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
