"""Prompt sets for routing analysis and benchmarks: plain text, JSON lines, or PartiPrompts TSV.

Bad lines follow the dataset rule: skipped, counted (`.skipped` on the returned list) and
reported once with `logging`; a file that yields no prompt at all is a `DatasetError`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from aptp.errors import DatasetError

from .reading import SkipLog, iter_text_lines, require_path

__all__ = ["PromptList", "load_parti_prompts", "load_prompts"]

logger = logging.getLogger(__name__)

PROMPT_FORMATS = (".txt", ".jsonl", ".tsv")


class PromptList(list):
    """A plain list of prompts (or records) that also says where it came from and what was dropped.

    Attributes:
        source: the file read.
        skipped: lines dropped because they could not be decoded or parsed.
    """

    def __init__(self, items=(), *, source: str = "", skipped: int = 0) -> None:
        super().__init__(items)
        self.source = source
        self.skipped = skipped


def load_prompts(path: str | Path) -> PromptList:
    """Read prompts from a file, chosen by its extension.

    * `.txt`: one prompt per line (blank lines ignored).
    * `.jsonl`: one JSON object per line with a `text` or `prompt` string.
    * `.tsv`: a header line with a `Prompt` column (the PartiPrompts layout); other columns ignored.

    Returns:
        The prompts in file order, as a `PromptList` (a `list[str]` with `.skipped` and `.source`).

    Raises:
        DatasetError: missing file, unsupported extension, or no usable prompt.
    """
    file = require_path(path, "prompt file", kind="file")
    suffix = file.suffix.lower()
    skips = SkipLog(str(file), "malformed lines")
    if suffix == ".txt":
        prompts = [text.strip() for _, text in iter_text_lines(file, skips)]
    elif suffix == ".jsonl":
        prompts = _read_jsonl(file, skips)
    elif suffix == ".tsv":
        prompts = [row["prompt"] for row in _read_tsv(file, skips, required=("Prompt",))]
    else:
        raise DatasetError(
            f"prompt file {str(file)!r} has an unsupported extension {file.suffix!r}; use one of {', '.join(PROMPT_FORMATS)}"
        )
    return _finish(prompts, file, skips)


def load_parti_prompts(path: str | Path) -> PromptList:
    """Read the PartiPrompts TSV (columns Prompt, Category, Challenge, Note).

    Returns:
        One `{"prompt", "category", "challenge"}` dict per row, in file order, as a `PromptList`.

    Raises:
        DatasetError: missing file, a header without those columns, or no usable row.
    """
    file = require_path(path, "PartiPrompts file", kind="file")
    skips = SkipLog(str(file), "malformed lines")
    rows = _read_tsv(file, skips, required=("Prompt", "Category", "Challenge"))
    return _finish(rows, file, skips)


def _read_jsonl(file: Path, skips: SkipLog) -> list[str]:
    prompts = []
    for lineno, text in iter_text_lines(file, skips):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            skips.add(f"line {lineno}", f"not valid JSON ({err.msg})")
            continue
        prompt = record.get("text", record.get("prompt")) if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            skips.add(f"line {lineno}", 'no non-empty "text" or "prompt" string')
            continue
        prompts.append(prompt.strip())
    return prompts


def _read_tsv(file: Path, skips: SkipLog, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a headed TSV as dicts keyed by the lower-cased `required` column names.

    Fields are split on tabs without any quote processing: PartiPrompts has quotes inside
    prompts ('the word "PEACE"') that a CSV quoting dialect would misread.
    """
    lines = iter_text_lines(file, skips)
    header_line = next(lines, None)
    if header_line is None:
        raise DatasetError(f"TSV file {str(file)!r} is empty (no header line with columns {list(required)})")
    columns = [name.strip().lower() for name in header_line[1].split("\t")]
    absent = [name for name in required if name.lower() not in columns]
    if absent:
        raise DatasetError(
            f"TSV file {str(file)!r} has no column(s) {absent} in its header {header_line[1].split(chr(9))}; "
            "the first line must name the columns"
        )
    positions = {name.lower(): columns.index(name.lower()) for name in required}
    needed = max(positions.values()) + 1
    rows = []
    for lineno, text in lines:
        fields = text.split("\t")
        if len(fields) < needed:
            skips.add(f"line {lineno}", f"{len(fields)} tab-separated field(s), expected at least {needed}")
            continue
        row = {key: fields[i].strip() for key, i in positions.items()}
        if not row[required[0].lower()]:
            skips.add(f"line {lineno}", f"empty {required[0]}")
            continue
        rows.append(row)
    return rows


def _finish(items: list, file: Path, skips: SkipLog) -> PromptList:
    skips.warn(logger)
    if not items:
        raise DatasetError(f"prompt file {str(file)!r} has no usable samples ({skips.count} {skips.what}); check its format")
    return PromptList(items, source=str(file), skipped=skips.count)
