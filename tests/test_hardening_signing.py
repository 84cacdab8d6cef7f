"""Ed25519-signed manifests: a deployment refuses exports it did not sign (issue 9).

The export itself is `runtime_fixtures.tiny_export`, shared with the other runtime tests; each
test signs a private copy of its manifest.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="manifest signing needs the 'cryptography' package (aptp[sign])")

from aptp.errors import ArtifactError, ConfigError  # noqa: E402
from aptp.export.manifest import read_manifest, write_manifest  # noqa: E402
from aptp.export.signing import generate_key, load_private_key, load_public_key, sign_manifest  # noqa: E402
from aptp.export.signing import main as signing_main  # noqa: E402
from aptp.runtime import AptpPipeline, load_artifacts  # noqa: E402
from runtime_fixtures import shallow_copy, tiny_export  # noqa: E402


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("keys")
    return {name: generate_key(root / f"{name}.pem") for name in ("a", "b")}


def _signed_copy(export_dir: Path, target: Path, private: Path) -> Path:
    copy = shallow_copy(export_dir, target)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(sign_manifest(manifest, load_private_key(private)), indent=2))
    return copy


def test_generate_key_writes_a_private_pair_and_never_overwrites(tmp_path, capsys):
    assert signing_main(["generate-key", str(tmp_path / "k.pem")]) == 0
    private, public = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    before = private.read_bytes()
    assert signing_main(["generate-key", str(private)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0], err
    assert private.read_bytes() == before


def test_signed_export_loads_with_its_key(export_dir, tmp_path, keys):
    copy = _signed_copy(export_dir, tmp_path / "export", keys["a"][0])
    artifacts = load_artifacts(copy, trusted_key=keys["a"][1])
    assert artifacts.manifest["signature"]["algorithm"] == "ed25519"
    # PEM bytes are accepted as well as a path.
    load_artifacts(copy, verify=False, trusted_key=keys["a"][1].read_bytes())
    # Without a trusted key the signature is simply not checked.
    load_artifacts(copy, verify=False)


def test_manifest_signed_with_another_key_is_refused(export_dir, tmp_path, keys, capsys):
    copy = _signed_copy(export_dir, tmp_path / "export", keys["a"][0])
    with pytest.raises(ArtifactError, match="does not verify with the trusted key: it was signed by another key"):
        AptpPipeline.from_export(copy, trusted_key=keys["b"][1])
    from aptp.runtime.cli import main

    code = main(["--artifacts", str(copy), "--trusted-key", str(keys["b"][1]), "--prompt", "a cat",
                 "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "signed by another key" in err[0], err


def test_edited_signed_manifest_is_refused(export_dir, tmp_path, keys):
    copy = _signed_copy(export_dir, tmp_path / "export", keys["a"][0])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["guidance_scale"] = 9.0  # in range: only the signature can catch it
    (copy / "manifest.json").write_text(json.dumps(manifest))
    load_artifacts(copy)  # unsigned deployments still accept it
    with pytest.raises(ArtifactError, match="modified after signing"):
        load_artifacts(copy, trusted_key=keys["a"][1])


def test_two_expert_files_swapped_with_their_hashes_are_caught_by_the_signature(export_dir, tmp_path, keys):
    copy = _signed_copy(export_dir, tmp_path / "export", keys["a"][0])
    manifest = json.loads((copy / "manifest.json").read_text())
    files = manifest["files"]
    a, b = "experts/expert_0/unet.onnx", "experts/expert_1/unet.onnx"
    files[a], files[b] = files[b], files[a]
    for name, other in ((a, b), (b, a)):
        (copy / name).unlink()
        (copy / name).write_bytes((export_dir / other).read_bytes())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    load_artifacts(copy)  # hashes agree: without a signature the swap goes unnoticed
    with pytest.raises(ArtifactError, match="does not verify"):
        load_artifacts(copy, trusted_key=keys["a"][1])


def test_unsigned_manifest_with_a_trusted_key_is_refused(export_dir, tmp_path, keys):
    copy = shallow_copy(export_dir, tmp_path / "export")
    with pytest.raises(ArtifactError, match="is not signed"):
        load_artifacts(copy, trusted_key=keys["a"][1])


def test_bad_keys_are_config_errors(tmp_path, keys):
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match="cannot read trusted key"):
        load_public_key(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_private_key(keys["a"][1])  # a public key given where the private one belongs
    from aptp.export.exporter import ExportOptions

    with pytest.raises(ConfigError, match="cannot read signing key"):
        ExportOptions(signing_key=tmp_path / "missing.pem").check()


def test_write_manifest_signs_what_read_manifest_verifies(tmp_path, keys):
    root = tmp_path / "export"
    (root / "experts").mkdir(parents=True)
    (root / "experts" / "unet.onnx").write_bytes(b"graph")
    written = write_manifest(root, {"num_codes": 1, "experts": [{"code": 0, "unet": "experts/unet.onnx"}]},
                             signing_key=keys["a"][0])
    assert read_manifest(root, trusted_key=keys["a"][1]) == written
    with pytest.raises(ArtifactError, match="another key"):
        read_manifest(root, trusted_key=keys["b"][1])
