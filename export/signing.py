"""Ed25519 signatures over an export's manifest, so a deployment can refuse exports it did not sign.

    python -m aptp.export.signing generate-key keys/aptp.pem      # keys/aptp.pem + keys/aptp.pub.pem
    aptp-export --checkpoint runs/x --output exports/x --sign keys/aptp.pem
    aptp-generate --artifacts exports/x --trusted-key keys/aptp.pub.pem --prompt "a red car" --output car.png
    AptpPipeline.from_export("exports/x", trusted_key="keys/aptp.pub.pem")

The manifest holds the sha256 of every file of the export and the runtime hashes each file as
it reads it, so signing the manifest covers the whole export. What is signed is
`canonical_manifest_bytes`: the manifest without its ``signature`` entry, as JSON with sorted
keys, compact separators, ASCII only and no NaN, so the signature checks the values the runtime
parsed, not a particular formatting. The signature sits in the manifest itself::

    "signature": {"algorithm": "ed25519", "public_key_sha256": "<hex>", "value": "<base64>"}

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), as written by
`generate_key` or ``openssl genpkey -algorithm ed25519``. Needs the ``cryptography`` package
(``pip install 'aptp[sign]'``), imported only when a key is used: torch-free, like the manifest.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from aptp.errors import ArtifactError, ConfigError
from aptp.readers import read_user_file

__all__ = [
    "SIGNATURE_KEY",
    "TrustedKey",
    "canonical_manifest_bytes",
    "generate_key",
    "load_private_key",
    "load_public_key",
    "sign_manifest",
    "verify_manifest",
]

SIGNATURE_KEY = "signature"
ALGORITHM = "ed25519"

#: What `verify_manifest` accepts as the trusted key: a PEM file path, PEM bytes, the 32 raw
#: public-key bytes, or a ``cryptography`` ``Ed25519PublicKey``.
TrustedKey = Any


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigError("signing and verifying exports needs the 'cryptography' package: "
                          "pip install 'aptp[sign]'") from None
    return ed25519


def canonical_manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the manifest minus ``signature``, in one fixed JSON form."""
    body = {k: v for k, v in manifest.items() if k != SIGNATURE_KEY}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except ValueError as err:  # NaN or infinity: read_manifest never lets them through
        raise ArtifactError(f"the manifest cannot be signed or verified: {err}") from err
    return text.encode("ascii")


#: Largest key file read (a PEM Ed25519 key is about 120 bytes).
MAX_KEY_FILE_BYTES = 64 * 1024


def _read_key_file(path: str | os.PathLike, what: str) -> bytes:
    return read_user_file(path, what, MAX_KEY_FILE_BYTES, ConfigError)


def load_private_key(source: str | os.PathLike | bytes) -> Any:
    """An Ed25519 private key from a PEM file path or PEM bytes (unencrypted PKCS#8).

    Raises:
        ConfigError: unreadable, not PEM, encrypted, or not an Ed25519 key.
    """
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    data = source if isinstance(source, bytes) else _read_key_file(source, "signing key")
    where = "the signing key" if isinstance(source, bytes) else f"signing key {source}"
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where} is not an unencrypted PEM private key ({err}); create one with "
                          "'python -m aptp.export.signing generate-key PATH'") from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{where} is a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(source: TrustedKey) -> Any:
    """An Ed25519 public key from a PEM file path, PEM bytes, 32 raw bytes or a key object.

    Raises:
        ConfigError: unreadable, malformed, or not an Ed25519 public key.
    """
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    if isinstance(source, ed25519.Ed25519PublicKey):
        return source
    if isinstance(source, (bytes, bytearray)):
        data, where = bytes(source), "the trusted key"
        if len(data) == 32:
            return ed25519.Ed25519PublicKey.from_public_bytes(data)
    elif isinstance(source, (str, os.PathLike)):
        data, where = _read_key_file(source, "trusted key"), f"trusted key {source}"
    else:
        raise ConfigError(f"trusted_key must be a PEM file path, PEM bytes, 32 raw bytes or an Ed25519PublicKey, "
                          f"got {type(source).__name__}")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where} is not a PEM public key ({err})") from err
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{where} is a {type(key).__name__}, not an Ed25519 public key")
    return key


def _raw_public(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_manifest(manifest: Mapping[str, Any], private_key: Any) -> dict[str, Any]:
    """A copy of `manifest` with its ``signature`` entry (replacing any earlier one)."""
    key = private_key if hasattr(private_key, "sign") else load_private_key(private_key)
    signed = {k: v for k, v in manifest.items() if k != SIGNATURE_KEY}
    signed[SIGNATURE_KEY] = {
        "algorithm": ALGORITHM,
        "public_key_sha256": hashlib.sha256(_raw_public(key.public_key())).hexdigest(),
        "value": base64.b64encode(key.sign(canonical_manifest_bytes(signed))).decode("ascii"),
    }
    return signed


def verify_manifest(manifest: Mapping[str, Any], trusted_key: TrustedKey, source: str = "manifest.json") -> None:
    """Check that `manifest` carries a valid signature by `trusted_key`.

    Raises:
        ArtifactError: the manifest is unsigned, signed with another algorithm or key, or
            edited after signing.
        ConfigError: the trusted key cannot be read.
    """
    key = load_public_key(trusted_key)
    from cryptography.exceptions import InvalidSignature

    entry = manifest.get(SIGNATURE_KEY)
    if entry is None:
        raise ArtifactError(f"{source} is not signed, and a trusted key was given: sign the export "
                            "(aptp-export --sign KEY) or drop the trusted key")
    if not isinstance(entry, Mapping) or entry.get("algorithm") != ALGORITHM or not isinstance(entry.get("value"), str):
        raise ArtifactError(f"{source}: 'signature' must be an {ALGORITHM} signature entry; re-sign the export")
    try:
        value = base64.b64decode(entry["value"], validate=True)
    except ValueError as err:
        raise ArtifactError(f"{source}: the signature is not base64 ({err}); re-sign the export") from None
    fingerprint = hashlib.sha256(_raw_public(key)).hexdigest()
    try:
        key.verify(value, canonical_manifest_bytes(manifest))
    except InvalidSignature:
        signer = entry.get("public_key_sha256")
        why = ("it was signed by another key (public key sha256 "
               f"{str(signer)[:16]}..., trusted {fingerprint[:16]}...)" if signer != fingerprint
               else "it was modified after signing")
        raise ArtifactError(f"{source}: the signature does not verify with the trusted key: {why}; "
                            "refusing the export") from None


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 under a temporary name, then renamed: never world-readable, never half-written.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def generate_key(private_path: str | os.PathLike, public_path: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as PEM: the private key (mode 0600) and the public key
    (default: ``<stem>.pub.pem`` beside it). Existing files are never overwritten.

    Raises:
        ConfigError: a target exists or cannot be written.
    """
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    private_path = Path(private_path)
    public_path = Path(public_path) if public_path is not None else private_path.with_name(
        f"{private_path.stem}.pub.pem")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} already exists; choose another path (keys are never overwritten)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(private_path, private_pem)
        tmp = public_path.with_name(f".{public_path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(public_pem)
        os.replace(tmp, public_path)
    except OSError as err:
        raise ConfigError(f"cannot write the key pair: {err.strerror or err} ({err.filename})") from err
    return private_path, public_path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aptp.export.signing generate-key PRIVATE.pem [--public PUBLIC.pem]``."""
    from aptp.cli import run_command

    parser = argparse.ArgumentParser(prog="python -m aptp.export.signing",
                                     description="Ed25519 keys for signing aptp exports.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate-key", help="write a new key pair (PEM)")
    gen.add_argument("private", type=Path, help="private key to write (kept secret; mode 0600)")
    gen.add_argument("--public", type=Path, help="public key to write (default: <stem>.pub.pem beside it)")
    args = parser.parse_args(argv)

    def run() -> None:
        private, public = generate_key(args.private, args.public)
        print(f"private key: {private}  (give it to aptp-export --sign)")
        print(f"public key:  {public}  (give it to aptp-generate --trusted-key / trusted_key=)")

    return run_command(parser.prog, run)


if __name__ == "__main__":
    sys.exit(main())
