"""Reading aptp's own JSON artifacts: every failure is one `ArtifactError` naming the file.

Checkpoints and exports are inputs from outside (copied, edited, truncated, half-synced), so
a missing file, a permission problem, invalid or absurdly nested JSON and a value of the
wrong type are all reported the same way: which file, what is wrong, no traceback. Torch-free.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from aptp.errors import ArtifactError

__all__ = ["read_json", "read_user_file", "require"]

_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false"}


def _describe(expected: type | tuple[type, ...]) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def read_json(path: str | os.PathLike, expect: type | tuple[type, ...] = dict, what: str = "") -> Any:
    """The JSON value in `path`, which must be of type `expect` (default: an object).

    Raises:
        ArtifactError: the file is missing or unreadable, not valid UTF-8 JSON, nested too
            deeply, or its top-level value is not `expect`.
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise ArtifactError(f"{label} is missing") from error
    except IsADirectoryError as error:
        raise ArtifactError(f"{label} is a directory, not a JSON file") from error
    except OSError as error:
        raise ArtifactError(f"cannot read {label}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ArtifactError(f"{label} is not a UTF-8 text file: {error.reason}") from error

    def refuse_constant(name: str) -> Any:
        raise ArtifactError(f"{label} holds {name}; aptp's files hold finite numbers only")

    try:
        value = json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{label} is not valid JSON: {error}") from error
    except RecursionError as error:
        raise ArtifactError(f"{label} is nested too deeply to be one of aptp's files") from error
    return require(value, expect, label)


def require(value: Any, expect: type | tuple[type, ...], label: str) -> Any:
    """`value` if it is of type `expect` (an int is a float; a bool is neither), else
    `ArtifactError` naming `label`."""
    kinds = expect if isinstance(expect, tuple) else (expect,)
    if float in kinds and int not in kinds:
        kinds = (*kinds, int)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise ArtifactError(f"{label} must be {_describe(expect)}, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_user_file(path: str | os.PathLike, what: str, limit: int, error: type[Exception] = ArtifactError) -> bytes:
    """The bytes of a file a user names (a key, a prompt list, a PNG), read with a bound.

    Opened without blocking and checked to be a regular file before anything is read, so a
    FIFO (which would wait for a writer forever), a device such as ``/dev/zero`` (endless) or
    a directory is refused, and so is a file over `limit` bytes. Every refusal is one `error`
    naming `what` (may be empty) and the path.
    """
    label = f"{what} {path}" if what else str(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise error(f"cannot read {label}: {err.strerror or err}") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(status.st_mode) else "a directory" if stat.S_ISDIR(status.st_mode) \
                else "a device or socket"
            raise error(f"{label} is {kind}, not a regular file; pass a file")
        if status.st_size > limit:
            raise error(f"{label} is larger than {limit} bytes ({status.st_size}); pass a smaller file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)  # bounded even if the file grows while it is read
    except OSError as err:
        raise error(f"cannot read {label}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{label} is larger than {limit} bytes; pass a smaller file")
    return data
