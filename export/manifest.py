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
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from aptp.errors import ArtifactError

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MANIFEST_FORMAT_VERSION",
    "contained_path",
    "file_sha256",
    "hash_files",
    "manifest_paths",
    "open_fp32_export",
    "read_manifest",
    "read_verified",
    "write_manifest",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "aptp-export"
MANIFEST_FORMAT_VERSION = 1

_CHUNK = 1 << 20
# A manifest is a few hundred KiB even with many codes; refuse what could only exhaust memory.
MAX_MANIFEST_BYTES = 64 * 1024**2
# Nesting of the manifest's JSON; aptp writes 4 levels. Deeper input is refused, not recursed into.
MAX_MANIFEST_DEPTH = 16


def file_sha256(path: str | os.PathLike | int) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (ONNX files can be gigabytes). `path` may be an
    open file descriptor, which is read from its current offset and left open."""
    digest = hashlib.sha256()
    with open(path, "rb", closefd=not isinstance(path, int)) as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_verified(path: str | os.PathLike, sha256: str | None, what: str = "file") -> bytes:
    """The bytes of `path`, checked against `sha256` (hex) when it is given.

    Callers hand exactly these bytes to the library that parses them (onnxruntime, TensorRT,
    tokenizers): the file is read once, so replacing it after the check cannot change what is
    loaded.

    Raises:
        ArtifactError: the file cannot be read, or its bytes do not have the expected hash.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise unreadable(path, what, err) from err
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise sha256_mismatch(path, what)
    return data


def unreadable(path: str | os.PathLike, what: str, err: OSError) -> ArtifactError:
    """The error for an export file that cannot be read."""
    return ArtifactError(f"cannot read {what} {path}: {err.strerror or err}; check that it exists and that "
                         "this account may read it")


def sha256_mismatch(path: str | os.PathLike, what: str) -> ArtifactError:
    """The error for an export file whose bytes are not those the manifest hashed."""
    return ArtifactError(f"{what} {path} does not match its sha256 in {MANIFEST_FILE}: it was modified or "
                         "replaced after the export (refusing to load it); re-export or restore the file")


def contained_path(root: str | os.PathLike, rel: Any, entry: str = "file") -> Path:
    """``root / rel`` for a manifest path that stays inside the export.

    `rel` must be a non-empty relative POSIX path without ``..`` parts, and the file it names,
    with every symlink on the way resolved, must lie under the (resolved) export root.

    Raises:
        ArtifactError: naming `entry` and the path, when any of that does not hold.
    """
    root = Path(root)
    where = root / MANIFEST_FILE
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise ArtifactError(f"{where}: {entry} {rel!r} is not a relative POSIX path; re-export with aptp-export")
    posix = PurePosixPath(rel)
    if posix.is_absolute() or ".." in posix.parts:
        raise ArtifactError(f"{where}: {entry} is an unsafe path {rel!r} that points outside the export "
                            "(absolute or '..'); refusing it")
    full = root.joinpath(*posix.parts)
    real, real_root = Path(os.path.realpath(full)), Path(os.path.realpath(root))
    if real != real_root and real_root not in real.parents:
        raise ArtifactError(f"{where}: {entry} {rel!r} resolves to {real}, outside the export {real_root} "
                            "(a symlink leaving it?); copy the file into the export or re-export")
    return full


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


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any],
                   signing_key: str | os.PathLike | Any | None = None) -> dict[str, Any]:
    """Hash every file under `root`, store the table as ``files`` and write ``manifest.json``.

    Call it last, once every other file of the export is in place. Returns the manifest written.
    With `signing_key` (an Ed25519 private key or its PEM file) the manifest is signed
    (`aptp.export.signing`).

    Raises:
        ArtifactError: an entry points to a file that does not exist under `root`.
    """
    root = Path(root)
    manifest = dict(manifest)
    manifest["format"] = MANIFEST_FORMAT
    manifest["format_version"] = MANIFEST_FORMAT_VERSION
    manifest["files"] = hash_files(root)
    _check_entries_hashed(manifest, "were not written")
    return _store(root, manifest, signing_key)


def replace_manifest(root: str | os.PathLike, manifest: dict[str, Any],
                     signing_key: str | os.PathLike | Any | None = None) -> dict[str, Any]:
    """Replace ``manifest.json`` of an existing export with `manifest`, whose ``files`` table the
    caller has already updated (files added beside the export's, such as int8 UNets, or moved).
    Written atomically and signed again when a key is given; `manifest` is updated in place to
    what was written, and returned.

    Raises:
        ArtifactError: an entry points to a file the ``files`` table does not hash.
    """
    _check_entries_hashed(manifest, "are not hashed")
    written = _store(Path(root), manifest, signing_key)
    if written is not manifest:
        manifest.clear()
        manifest.update(written)
    return manifest


def open_fp32_export(root: str | os.PathLike, signing_key: Any, adding: str, flag: str,
                     why_fp32: str) -> tuple[Path, dict[str, Any], Any]:
    """An fp32 export that graphs are about to be added to (int8 UNets, CPU graphs): its
    absolute root, its verified manifest and the loaded signing key (``None`` without one).

    Raises:
        ArtifactError: the export is incomplete or modified.
        ConfigError: a signed export without `signing_key` (adding changes the manifest), an
            unusable key, or an export that is not fp32 (`why_fp32` says why that matters).
    """
    from aptp.errors import ConfigError

    root = Path(root).expanduser().absolute()
    manifest = read_manifest(root, verify=True)
    if manifest.get("signature") is not None and signing_key is None:
        raise ConfigError(f"{root} is signed and {adding} changes its manifest: pass the signing key "
                          f"(aptp-export --sign KEYFILE {flag}) to re-sign it")
    if signing_key is not None:
        from .signing import load_private_key

        signing_key = load_private_key(signing_key)  # an unusable key fails now, not after the work
    if manifest.get("precision") != "fp32":
        raise ConfigError(f"{why_fp32}; {root} is {manifest.get('precision')}: export with --precision fp32 {flag}")
    return root, manifest, signing_key


def unet_entries(manifest: dict[str, Any]) -> list[tuple[int | str, dict[str, Any]]]:
    """``(key, entry)`` of every UNet in the manifest: the experts by code, then ``"dense"``."""
    entries: list[tuple[int | str, dict[str, Any]]] = [(int(e["code"]), e) for e in manifest["experts"]]
    if manifest.get("dense"):
        entries.append(("dense", manifest["dense"]))
    return entries


def _check_entries_hashed(manifest: dict[str, Any], reason: str) -> None:
    """Refuse a manifest with an entry whose file its ``files`` table does not hash."""
    missing = [p for p in manifest_paths(manifest) if p not in manifest["files"]]
    if missing:
        raise ArtifactError(f"manifest entries point to files that {reason}: {missing[:5]}")


def _store(root: Path, manifest: dict[str, Any], signing_key: Any) -> dict[str, Any]:
    """Sign `manifest` when a key is given and write it as ``manifest.json`` through a temporary
    file and a rename; returns what was written."""
    if signing_key is not None:
        from .signing import sign_manifest

        manifest = sign_manifest(manifest, signing_key)
    tmp = root / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, root / MANIFEST_FILE)
    return manifest


def read_manifest(root: str | os.PathLike, verify: bool = True, trusted_key: Any = None) -> dict[str, Any]:
    """Load ``manifest.json`` of an export and check that the export is complete and untouched.

    Args:
        root: the export directory (what ``aptp-export --output`` wrote).
        verify: also recompute the sha256 of every listed file (the default). ``False`` only
            checks that the listed files exist, for quick listings.
        trusted_key: an Ed25519 public key (PEM path, PEM or raw bytes, or key object): the
            manifest must carry a valid signature by it (`aptp.export.signing.verify_manifest`).

    Raises:
        ArtifactError: no manifest, another format or version, a listed file missing or with a
            different sha256, or an entry pointing outside the hashed files.
    """
    root = Path(root)
    path = root / MANIFEST_FILE
    manifest = _load_json(root, path)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path} is not an aptp export manifest (format {got!r}, expected {MANIFEST_FORMAT!r})")
    version = manifest.get("format_version")
    if version != MANIFEST_FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has export format version {version!r}; this aptp reads version {MANIFEST_FORMAT_VERSION}: "
            "re-export the checkpoint with this aptp's aptp-export"
        )
    if trusted_key is not None:
        from .signing import verify_manifest

        verify_manifest(manifest, trusted_key, str(path))
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path} lists no files; run aptp-export again")
    for rel, expected in files.items():
        full = contained_path(root, rel, f"files[{rel!r}]")
        if not isinstance(expected, str) or len(expected) != 64 or not all(c in _HEX for c in expected):
            raise ArtifactError(f"{path}: files[{rel!r}] must be a sha256 (64 hex digits), got {expected!r}")
        if not full.is_file():
            raise ArtifactError(f"export {root} is incomplete: {rel} is missing; run aptp-export again")
        if verify:
            try:
                actual = file_sha256(full)
            except OSError as err:
                raise ArtifactError(f"cannot read {full}: {err.strerror or err}; check that this account may read "
                                    "every file of the export") from err
            if actual != expected:
                raise ArtifactError(f"export {root}: {rel} does not match its sha256 in {MANIFEST_FILE} "
                                    "(modified or corrupt)")
    unhashed = [p for p in manifest_paths(manifest) if p not in files]
    if unhashed:
        raise ArtifactError(f"{path} references files it does not hash: {unhashed[:5]}")
    return manifest


_HEX = frozenset("0123456789abcdef")


def _load_json(root: Path, path: Path) -> Any:
    """The parsed manifest, refusing one that leaves the export, is huge, or nests too deeply."""
    if not path.is_file():
        raise ArtifactError(
            f"{root} is not a complete aptp export: {MANIFEST_FILE} is missing "
            "(an interrupted export leaves none); run aptp-export again"
        )
    contained_path(root, MANIFEST_FILE, MANIFEST_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as err:
        raise ArtifactError(f"cannot read {path}: {err.strerror or err}; check that this account may read it") from err
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest aptp-export wrote")
    return parse_manifest_bytes(data, path)


def parse_manifest_bytes(data: bytes, source: str | os.PathLike = MANIFEST_FILE) -> Any:
    """JSON from manifest bytes with at most `MAX_MANIFEST_DEPTH` levels of nesting.

    Raises:
        ArtifactError: invalid UTF-8 or JSON, non-finite numbers (NaN, Infinity), or deeper nesting.
    """
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a valid number here")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text} overflows a float")
        return value

    try:
        value = json.loads(data.decode("utf-8"), parse_constant=no_constants, parse_float=finite)
    except RecursionError:  # the json module recurses once per level and stops itself
        value, depth = None, MAX_MANIFEST_DEPTH + 1
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ArtifactError(f"{source} is not valid JSON ({err}); run aptp-export again") from err
    else:
        depth = _depth(value)
    if depth > MAX_MANIFEST_DEPTH:
        raise ArtifactError(f"{source} nests JSON deeper than {MAX_MANIFEST_DEPTH} levels: not a manifest "
                            "aptp-export wrote")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node)
    return deepest
