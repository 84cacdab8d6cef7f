"""Directories aptp writes: which paths it may claim, and how a whole directory is replaced.

The rule every command follows: write only to a path that is new (absent or an empty
directory) or that holds what the same kind of aptp command wrote before, recognised by its
own marker (an export's ``manifest.json``, a run's ``checkpoint.json``...); never to a path that
overlaps an input (equal to it, inside it or containing it, symlinks resolved). Replacing a
previous output is explicit (``--overwrite``, or ``--resume`` for a training run). Anything
else is refused with one line before any work starts: aptp never deletes what it did not write.

Whole-directory outputs (exports, pretrained pipelines) are built in a staging directory
beside the target (``.<name>.partial-<pid>-<token>``) and renamed into place once complete; a
previous output is moved aside first and deleted only after the new one is in place, so the
target never holds half of anything. Staging directories are created with ``os.mkdir``, so
what lands at the target has the ordinary permissions of the user's umask (``tempfile`` would
make it 0700, unreadable to a separate serving account).

Torch-free: the runtime and the benchmarks import it without the training stack.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from aptp.errors import OutputError, StorageError

__all__ = [
    "BENCH",
    "BENCH_MEMORY",
    "BENCH_QUALITY",
    "BENCH_SERVE",
    "GPU_CHECK",
    "SYNTHETIC_WORK",
    "CHECKPOINT",
    "EXPORT",
    "PIPELINE",
    "OutputKind",
    "check_output_dir",
    "claim_in_place",
    "clean_stale_siblings",
    "commit_dir",
    "describe_os_error",
    "make_staging",
    "ordinary_mode",
    "ordinary_tree",
    "staged_output",
]

logger = logging.getLogger(__name__)

#: The marker a directory written in place (a training run, benchmark results) gets when aptp
#: claims it; its ``kind`` names the command.
MARKER_FILE = ".aptp-output.json"


def _json_field(path: Path, key: str) -> Any:
    """``data[key]`` of the JSON object at `path`, None when the file is absent or not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return data.get(key) if isinstance(data, dict) else None


@dataclass(frozen=True)
class OutputKind:
    """One kind of directory aptp writes.

    Attributes:
        key: the marker's ``kind`` value (``aptp-export``, ``aptp-train-prune``...).
        name: how messages call it (``an aptp export``).
        option: the option that names it (``--output``), for messages.
        recognise: True for a directory this kind of command wrote (besides the marker file).
    """

    key: str
    name: str
    option: str
    recognise: Callable[[Path], bool]

    def owns(self, path: Path) -> bool:
        """Whether `path` holds this kind's output (its own files or the in-place marker)."""
        return _json_field(path / MARKER_FILE, "kind") == self.key or self.recognise(path)


EXPORT = OutputKind("aptp-export", "an aptp export", "--output",
                    lambda p: _json_field(p / "manifest.json", "format") == "aptp-export")
CHECKPOINT = OutputKind(
    "aptp-train-prune", "an aptp pruning run", "--output-dir",
    # checkpoint.json marks a finished run; config.yaml + gate_layout.json one still training.
    lambda p: _json_field(p / "checkpoint.json", "format") is not None
    or ((p / "config.yaml").is_file() and (p / "gate_layout.json").is_file()),
)
PIPELINE = OutputKind("aptp-train-pretrain", "a pipeline written by aptp-train pretrain", "--output-dir",
                      lambda p: (p / "model_index.json").is_file() and (p / "pretrain_config.yaml").is_file())
BENCH = OutputKind("aptp-bench-latency", "aptp-bench results", "--output-dir",
                   lambda p: _json_field(p / "results.json", "format") == "aptp-bench-latency")


def _results_of(file: str, fmt: str | None) -> Callable[[Path], bool]:
    """Recognises a folder holding `file`, with ``"format": fmt`` when `fmt` is given (results
    written before the marker file existed)."""
    if fmt is None:
        return lambda p: (p / file).is_file()
    return lambda p: _json_field(p / file, "format") == fmt


BENCH_QUALITY = OutputKind("aptp-bench-quality", "aptp-bench quality results", "--output-dir",
                           _results_of("quality.json", None))
BENCH_MEMORY = OutputKind("aptp-bench-memory", "aptp-bench memory results", "--output-dir",
                          _results_of("memory.json", "aptp-bench-memory"))
BENCH_SERVE = OutputKind("aptp-bench-serve", "aptp-bench serve results", "--output-dir",
                         _results_of("serve.json", "aptp-serve-bench"))
GPU_CHECK = OutputKind("aptp-gpu-check", "aptp-bench gpu-check results", "--output-dir",
                       _results_of("gpu_check.json", "aptp-gpu-check"))
SYNTHETIC_WORK = OutputKind("aptp-bench-synthetic", "a synthetic pipeline or checkpoint of aptp-bench make-synthetic",
                            "--work-dir", lambda p: (p / "aptp_synthetic_pipeline.json").is_file()
                            or (p / "synthetic.json").is_file())


def ordinary_mode(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain ``open``/``mkdir`` would have given it (0666 or 0777 less
    the umask): ``tempfile`` creates files 0600 and directories 0700."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def ordinary_tree(root: str | os.PathLike) -> None:
    """`ordinary_mode` for `root` and everything under it (symlinks untouched); executable
    files keep their execute bits. Some writers (safetensors, tempfile) make private files."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o111
            os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def describe_os_error(error: OSError) -> str:
    """``<reason> (<file>)`` for an OSError, without the errno prefix."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"{reason} ({error.filename})" if error.filename else reason


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _check_ancestors(path: Path, option: str) -> None:
    """The nearest existing ancestor of `path` must be a writable directory."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{option} {path}: {parent} is a file, not a directory; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{option} {path}: {parent} is not writable; choose a writable path")
            return


def _check_overlap(path: Path, inputs: Iterable[tuple[str, str | os.PathLike]], option: str) -> None:
    """Refuse an output equal to, inside or containing an input (symlinks resolved)."""
    out = _real(path)
    for label, given in inputs:
        src = _real(given)
        if out == src:
            relation = "is"
        elif src in out.parents:
            relation = "is inside"
        elif out in src.parents:
            relation = "contains"
        else:
            continue
        raise OutputError(f"{option} {path} {relation} the {label} {given}; write the output somewhere else")


def check_output_dir(path: str | os.PathLike, kind: OutputKind, *, allow_existing: bool = False,
                     existing_hint: str = "pass --overwrite to replace it",
                     inputs: Iterable[tuple[str, str | os.PathLike]] = ()) -> bool:
    """Check that `kind` may write the directory `path`; returns whether it holds a previous
    output of that kind (which the caller replaces or continues).

    Args:
        allow_existing: a previous output of this kind may be replaced (``--overwrite``) or
            continued (``--resume``); without it one is refused with `existing_hint`.
        inputs: ``(label, path)`` of what the command reads; the output may not overlap them.

    Raises:
        OutputError: the path is a file, under a file, unwritable, overlaps an input, holds
            files aptp did not write, or holds a previous output and `allow_existing` is False.
    """
    path = Path(path).expanduser().absolute()
    try:
        return _check_output_dir(path, kind, allow_existing, existing_hint, inputs)
    except OSError as error:  # name too long, symlink loop, I/O error...
        raise OutputError(f"{kind.option} {path}: {describe_os_error(error)}") from error


def _check_output_dir(path: Path, kind: OutputKind, allow_existing: bool, existing_hint: str,
                      inputs: Iterable[tuple[str, str | os.PathLike]]) -> bool:
    option = kind.option
    _check_overlap(path, inputs, option)
    _check_ancestors(path, option)
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{option} {path} is a dangling symbolic link; choose another path")
    if not path.exists():
        return False
    if not path.is_dir():
        raise OutputError(f"{option} {path} exists and is not a directory; choose another path")
    try:
        empty = next(path.iterdir(), None) is None
    except OSError as error:
        raise OutputError(f"{option} {path} cannot be listed: {describe_os_error(error)}") from error
    if empty:
        return False
    if not kind.owns(path):
        raise OutputError(
            f"{option} {path} already holds files that are not {kind.name}; aptp writes only to a new or empty "
            "directory or replaces its own output, so choose another path"
        )
    if not allow_existing:
        raise OutputError(f"{option} {path} already holds {kind.name}; {existing_hint}")
    return True


def claim_in_place(path: str | os.PathLike, kind: OutputKind, *, allow_existing: bool = False,
                   existing_hint: str = "pass --overwrite to replace it",
                   inputs: Iterable[tuple[str, str | os.PathLike]] = ()) -> bool:
    """`check_output_dir`, then create the directory and mark it as `kind`'s, for outputs
    written file by file in place (training runs, benchmark results). Returns whether it
    held a previous output."""
    path = Path(path).expanduser().absolute()
    existed = check_output_dir(path, kind, allow_existing=allow_existing, existing_hint=existing_hint, inputs=inputs)
    try:
        path.mkdir(parents=True, exist_ok=True)
        marker = path / MARKER_FILE
        if _json_field(marker, "kind") != kind.key:
            marker.write_text(json.dumps({"kind": kind.key}) + "\n")
    except OSError as error:
        raise OutputError(f"{kind.option} {path}: cannot write there: {describe_os_error(error)}") from error
    return existed


# -- staging beside the target, atomic commit --------------------------------------------------


def _sibling_prefix(output: Path, kind: str, pid: int | None = None) -> str:
    return f".{output.name}.{kind}-" + ("" if pid is None else f"{pid}-")


def _new_sibling(output: Path, kind: str) -> Path:
    """A fresh directory beside `output`, made with the umask's permissions (not 0700)."""
    while True:
        path = output.parent / f"{_sibling_prefix(output, kind, os.getpid())}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_siblings(output: str | os.PathLike) -> None:
    """Remove what killed runs writing `output` left beside it (staging and set-aside
    directories of processes that no longer exist). A previous output set aside by a run
    killed between its two renames is put back when nothing took its place."""
    output = Path(output)
    if not output.parent.is_dir():
        return
    for kind in ("partial", "old"):
        prefix = _sibling_prefix(output, kind)
        for path in sorted(output.parent.glob(f"{prefix}*")):
            pid_text = path.name[len(prefix):].split("-", 1)[0]
            if not pid_text.isdigit() or _alive(int(pid_text)):
                continue
            aside = path / output.name
            if kind == "old" and aside.is_dir() and not output.exists():
                logger.warning("restoring %s, set aside by an interrupted run", output)
                os.replace(aside, output)
            logger.info("removing %s, left by an interrupted run", path)
            shutil.rmtree(path, ignore_errors=True)


def make_staging(output: str | os.PathLike, option: str = "--output") -> Path:
    """A staging directory beside `output` (its parent created), after cleaning stale ones."""
    output = Path(output).expanduser().absolute()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_siblings(output)
        return _new_sibling(output, "partial")
    except OSError as error:
        raise OutputError(f"{option} {output}: cannot write there: {describe_os_error(error)}") from error


def commit_dir(staging: str | os.PathLike, output: str | os.PathLike, kind: OutputKind) -> None:
    """Rename the finished `staging` directory to `output` (same filesystem). A previous
    output is moved aside first and deleted only once the new one is in place; it must be
    `kind`'s own (checked again here, as the tree may have changed since the first check) or
    an empty directory."""
    staging, output = Path(staging), Path(output)
    if output.is_symlink() or output.exists():
        if not output.is_dir() or output.is_symlink():
            raise OutputError(f"{kind.option} {output} changed while aptp was writing (now not a directory); "
                              f"the new output is discarded")
        if next(output.iterdir(), None) is None:
            output.rmdir()
        elif not kind.owns(output):
            raise OutputError(f"{kind.option} {output} changed while aptp was writing (it now holds files that are "
                              f"not {kind.name}); the new output is discarded and those files are kept")
        else:
            old = _new_sibling(output, "old")
            os.replace(output, old / output.name)
            try:
                os.replace(staging, output)
            except BaseException:
                os.replace(old / output.name, output)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(staging, output)


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, kind: OutputKind, what: str = "the output") -> Iterator[Path]:
    """Yield a staging directory beside `output`; commit it when the block ends normally.

    On any exception the staging directory is removed and `output` is left as it was; an
    OSError (disk full, permission denied, unreadable input...) becomes a `StorageError`
    naming the reason and the file.
    """
    output = Path(output).expanduser().absolute()
    staging = make_staging(output, kind.option)
    try:
        yield staging
        ordinary_tree(staging)  # readable by a separate serving account, as any build output
        commit_dir(staging, output, kind)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise StorageError(f"{what} failed and {output} was left as it was: {describe_os_error(error)}") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
