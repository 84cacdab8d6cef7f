"""Reading caption and prompt sources record by record, skipping and counting the bad records.

Every loader in this subpackage follows the same rule: a record that cannot be decoded or parsed
is dropped, counted, and reported once with `logging` (how many, where the first one was and
why). A source with no usable record at all is an error, raised by the loader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aptp.errors import DatasetError

__all__ = ["SkipLog", "iter_text_lines", "read_text_file", "require_path"]


@dataclass
class SkipLog:
    """Counts the records of one source dropped for one kind of reason; remembers the first.

    Args:
        source: the file or folder the records come from (for the warning).
        what: the kind of drop, as a plural noun phrase ("malformed lines", "missing images").
    """

    source: str
    what: str
    count: int = 0
    first_location: str | None = None
    first_reason: str | None = None

    def add(self, location: str, reason: str) -> None:
        """Record one dropped record, e.g. `add("line 12", "not valid JSON")`."""
        self.count += 1
        if self.first_location is None:
            self.first_location, self.first_reason = location, reason

    def warn(self, logger: logging.Logger) -> None:
        """Log one warning summarising the drops, if there were any."""
        if self.count:
            logger.warning(
                "%s: skipped %d %s (first at %s: %s)",
                self.source,
                self.count,
                self.what,
                self.first_location,
                self.first_reason,
            )


def require_path(path: str | Path, what: str, *, kind: str = "any") -> Path:
    """Return `path` as a `Path`, or raise `DatasetError` naming it when it does not exist.

    Args:
        path: the path given by the user.
        what: what the path should hold, for the message ("caption file", "COCO image folder").
        kind: "file", "dir" or "any": what the path must be.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{what} {str(p)!r} does not exist; check the path (relative paths are taken from {Path.cwd()})")
    if kind == "file" and not p.is_file():
        raise DatasetError(f"{what} {str(p)!r} is not a file; pass the file itself, not a folder")
    if kind == "dir" and not p.is_dir():
        raise DatasetError(f"{what} {str(p)!r} is not a folder")
    return p


def iter_text_lines(path: Path, skips: SkipLog) -> Iterator[tuple[int, str]]:
    """Yield `(line_number, text)` for every non-blank UTF-8 line of `path` (numbers from 1).

    Lines are decoded one at a time so that one undecodable line costs only that line: it is
    added to `skips` and not yielded. Line endings (LF or CRLF) and a leading BOM are removed;
    blank lines are ignored without being counted (trailing newlines are not errors).
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                skips.add(f"line {lineno}", f"not valid UTF-8 (byte {err.start})")
                continue
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            text = text.rstrip("\r\n")
            if text.strip():
                yield lineno, text


def read_text_file(path: Path) -> str:
    """Read a small UTF-8 text file (a caption sidecar); raises `UnicodeDecodeError` on bad bytes."""
    return path.read_bytes().decode("utf-8").removeprefix("\ufeff")
