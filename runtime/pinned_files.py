"""Verified external weights that onnxruntime reads itself, from files pinned while it loads.

Handing onnxruntime the verified bytes of an expert's weights from memory keeps what runs equal
to what was hashed, but RSS peaks at about three times the weights while the session is created
(measured on a 119 MiB expert: 363 MiB, against 153 MiB when onnxruntime reads the file
itself). Under a memory budget that peak decides which experts can be swapped in. This keeps
the guarantee without the in-memory copy:

1. each external data file is opened once and hard-linked into a private temporary folder
   (mode 0700) under the name the graph refers to; the link must name the inode that was
   opened (a path swapped in between is caught by comparing inodes; ``linkat`` through
   ``/proc/self/fd`` would avoid the comparison but kernels refuse it for ordinary files);
2. its status (inode, size, mtime, ctime) is taken, and it is hashed through the open file in
   1 MiB chunks;
3. onnxruntime reads the weights from the private folder;
4. the status is taken again. A new size or mtime means a write: the session is refused. A
   moved ctime alone decides nothing, because other processes pinning the same export link
   and unlink the same inode (which moves its ctime) while nothing changes its bytes: the file
   is hashed again through the open descriptor, and the hash is the authority. Finally the
   export's path must still name the inode that was loaded: a file swapped in there during the
   load is refused, as the export is changing under the reader.

Where a hard link cannot be made (the temp folder on another filesystem, no ``/proc``, a
kernel that protects hard links to files this account does not own), `pinned_weights` yields
``None`` and the caller falls back to handing verified bytes from memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from aptp.errors import ArtifactError
from aptp.export.manifest import file_sha256, sha256_mismatch, unreadable

__all__ = ["pinned_weights"]

logger = logging.getLogger(__name__)

_WHAT = "ONNX external data"


def _identity(fd: int) -> tuple[int, ...]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _changed_while_loading(path: Path) -> ArtifactError:
    return ArtifactError(f"{_WHAT} {path} changed while onnxruntime was loading it (its status moved after it "
                         "was hashed); refusing the session; load again once nothing writes to the export")


def _check_unchanged(fd: int, path: Path, digest: str | None, then: tuple[int, ...]) -> None:
    """Raise if the pinned file's bytes may differ from those hashed before the load, or if the
    export's `path` no longer names it."""
    now = _identity(fd)
    if now[:4] != then[:4]:
        raise _changed_while_loading(path)
    if now[4] != then[4] and digest is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        if file_sha256(fd) != digest:
            raise _changed_while_loading(path)
    try:
        current = os.stat(path)
    except OSError as err:
        raise unreadable(path, _WHAT, err) from err
    if (current.st_dev, current.st_ino) != now[:2]:
        raise ArtifactError(f"{_WHAT} {path} was replaced in the export while onnxruntime was loading it; "
                            "refusing the session; load again once nothing writes to the export")


@contextmanager
def pinned_weights(files: Sequence[tuple[Path, str | None]]) -> Iterator[Path | None]:
    """A private folder holding the verified `files` (``(path, sha256)``) under their names, for
    onnxruntime's ``session.model_external_initializers_file_folder_path``; ``None`` where they
    cannot be pinned. On leaving the block, a file changed since it was hashed raises.

    Raises:
        ArtifactError: a file cannot be read, does not match its sha256, or changed while the
            block ran (onnxruntime may have read other bytes than those hashed).
    """
    fds: list[int] = []
    folder: Path | None = None
    try:
        for path, _ in files:
            try:
                fds.append(os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
            except OSError as err:
                raise unreadable(path, _WHAT, err) from err
        try:
            folder = Path(tempfile.mkdtemp(prefix="aptp-weights-"))
            for fd, (path, _) in zip(fds, files):
                link = folder / path.name
                os.link(os.path.realpath(path), link)  # a symlink inside the export: link its target
                opened, linked = os.fstat(fd), os.stat(link, follow_symlinks=False)
                if (opened.st_dev, opened.st_ino) != (linked.st_dev, linked.st_ino):
                    raise ArtifactError(f"{_WHAT} {path} was replaced while it was being opened; refusing it; "
                                        "load again once nothing writes to the export")
        except OSError as err:
            logger.debug("cannot pin %s by hard link (%s): handing verified bytes from memory", files[0][0], err)
            yield None
            return
        before = [_identity(fd) for fd in fds]
        for fd, (path, digest) in zip(fds, files):
            if digest is not None and file_sha256(fd) != digest:
                raise sha256_mismatch(path, _WHAT)
        yield folder
        for fd, (path, digest), then in zip(fds, files, before):
            _check_unchanged(fd, path, digest, then)
    finally:
        for fd in fds:
            os.close(fd)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
