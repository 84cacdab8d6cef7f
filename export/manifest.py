"""The export manifest: what an aptp export directory holds, and the check that it is whole.

Torch-free on purpose (json, hashlib, pathlib only): the runtime reads exports with
`read_manifest` and must not need torch or diffusers.

An export directory is complete exactly when ``manifest.json`` is present, names this format
and version, and every file it lists exists with the recorded sha256. The exporter writes
``manifest.json`` last, into a staging directory that is renamed into place only afterwards,
so a killed export never leaves a directory that `read_manifest` accepts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from aptp.errors import ArtifactError

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MANIFEST_FORMAT_VERSION",
    "file_sha256",
    "hash_files",
    "manifest_paths",
    "read_manifest",
    "write_manifest",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "aptp-export"
MANIFEST_FORMAT_VERSION = 1

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (ONNX files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _relative_files(root: Path) -> Iterable[str]:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_FILE:
                yield rel


def hash_files(root: str | os.PathLike) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file under `root` except the manifest, sorted."""
    root = Path(root)
    return {rel: file_sha256(root / rel) for rel in sorted(_relative_files(root))}


def manifest_paths(manifest: dict[str, Any]) -> list[str]:
    """Every file path the manifest's model entries point to (not the ``files`` table itself).

    Used to check that each referenced file is also hashed: a reference outside ``files`` would
    escape the integrity check.
    """
    found: list[str] = []

    def walk(node: Any, key: str | None = None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("files", "scheduler"):
                    continue
                walk(v, k)
        elif isinstance(node, list):
            for item in node:
                walk(item, key)
        elif isinstance(node, str) and key in _PATH_KEYS:
            found.append(node)

    walk(manifest)
    return found


# Keys whose string values are paths relative to the export root.
_PATH_KEYS = frozenset({"file", "unet", "external_data", "arch_spec", "tensorrt", "tokenizer", "timing_cache"})


def _check_relative(rel: str, root: Path) -> Path:
    posix = PurePosixPath(rel)
    if posix.is_absolute() or ".." in posix.parts or not rel:
        raise ArtifactError(f"{root / MANIFEST_FILE} lists an unsafe path {rel!r}; re-export with aptp-export")
    return root.joinpath(*posix.parts)


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file under `root`, store the table as ``files`` and write ``manifest.json``.

    Call it last, once every other file of the export is in place. Returns the manifest written.

    Raises:
        ArtifactError: an entry points to a file that does not exist under `root`.
    """
    root = Path(root)
    manifest = dict(manifest)
    manifest["format"] = MANIFEST_FORMAT
    manifest["format_version"] = MANIFEST_FORMAT_VERSION
    manifest["files"] = hash_files(root)
    missing = [p for p in manifest_paths(manifest) if p not in manifest["files"]]
    if missing:
        raise ArtifactError(f"manifest entries point to files that were not written: {missing[:5]}")
    tmp = root / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, root / MANIFEST_FILE)
    return manifest


def read_manifest(root: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Load ``manifest.json`` of an export and check that the export is complete and untouched.

    Args:
        root: the export directory (what ``aptp-export --output`` wrote).
        verify: also recompute the sha256 of every listed file (the default). ``False`` only
            checks that the listed files exist, for quick listings.

    Raises:
        ArtifactError: no manifest, another format or version, a listed file missing or with a
            different sha256, or an entry pointing outside the hashed files.
    """
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{root} is not a complete aptp export: {MANIFEST_FILE} is missing "
            "(an interrupted export leaves none); run aptp-export again"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); run aptp-export again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path} is not an aptp export manifest (format {got!r}, expected {MANIFEST_FORMAT!r})")
    version = manifest.get("format_version")
    if version != MANIFEST_FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has export format version {version!r}; this aptp reads version {MANIFEST_FORMAT_VERSION}: "
            "re-export the checkpoint with this aptp's aptp-export"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path} lists no files; run aptp-export again")
    for rel, expected in files.items():
        full = _check_relative(rel, root)
        if not full.is_file():
            raise ArtifactError(f"export {root} is incomplete: {rel} is missing; run aptp-export again")
        if verify and file_sha256(full) != expected:
            raise ArtifactError(f"export {root}: {rel} does not match its sha256 in {MANIFEST_FILE} (modified or corrupt)")
    unhashed = [p for p in manifest_paths(manifest) if p not in files]
    if unhashed:
        raise ArtifactError(f"{path} references files it does not hash: {unhashed[:5]}")
    return manifest
