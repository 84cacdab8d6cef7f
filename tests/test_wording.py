"""The project's documents, code comments and tests speak of the project, not of the work periods
that produced it: no Markdown, Python or shell file names a work period by number or as "this /
next / previous" one (the wording `PATTERN` matches). An onnxruntime session is fine ("a UNet
session's RSS", "an earlier session freed"). This file is not scanned: it spells the pattern."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("aptp", "train", "export", "runtime", "benchmarks", "tests", "scripts", "cpp_ext", "docs")
# Built from pieces so this file's own source does not match it.
WORD = "sess" + "ion"
PATTERN = re.compile(rf"\b{WORD}s?[ -]+\d+\b|\b(this|next|previous) {WORD}\b|\b{WORD}s \d+ (to|and) \d+\b",
                     re.IGNORECASE)


def project_files(repo: Path = REPO) -> list[Path]:
    """The Markdown, Python and shell files of the project (top-level Markdown and the folders)."""
    files = sorted(repo.glob("*.md"))
    for folder in FOLDERS:
        files += sorted(p for p in (repo / folder).rglob("*") if p.suffix in (".md", ".py", ".sh")
                        and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(repo).parts))
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def work_period_mentions(files: list[Path]) -> list[str]:
    """`path:line: text` for every line naming a work period."""
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if PATTERN.search(line):
                found.append(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{number}: {line.strip()}")
    return found


def test_the_pattern_catches_work_periods_and_spares_onnxruntime_sessions(tmp_path):
    sample = tmp_path / "sample.md"
    lines = [f"### Issue 13, {WORD} 8: three seeds", f"measured in this {WORD}", f"done in {WORD}s 2 to 8",
             f"one onnxruntime {WORD} per expert", f"a UNet {WORD}'s RSS", f"the {WORD} loads and evictions"]
    sample.write_text("\n".join(lines) + "\n")
    assert [m.split(": ", 1)[1] for m in work_period_mentions([sample])] == lines[:3]


def test_no_project_file_names_a_work_period():
    files = project_files()
    assert any(p.name == "README.md" for p in files) and any(p.suffix == ".py" for p in files)
    found = work_period_mentions(files)
    assert not found, "name the subject, the date or the commit instead of a work period:\n" + "\n".join(found)
