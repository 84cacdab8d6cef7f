"""UNet weights in external data files: what new exports write, and `aptp.export.relayout` for old ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aptp.errors import ArtifactError
from aptp.export import ExportOptions, export_checkpoint
from aptp.export.manifest import read_manifest
from aptp.export.relayout import externalize_unet_weights, main
from aptp.runtime import AptpPipeline
from aptp.train.models import resolve_pretrained
from export_fixtures import build_tiny_checkpoint

PROMPTS = ["a red sports car on a highway", "a bowl of tomato soup"]


def _latents(export: Path) -> np.ndarray:
    pipe = AptpPipeline.from_export(export, threads=1)
    try:
        return np.stack([r.latents for r in pipe(PROMPTS, seeds=3, output_type="latent")])
    finally:
        pipe.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("relayout") / "checkpoint", resolve_pretrained("tiny"))


def _unet_entries(manifest):
    return [*manifest["experts"], manifest["dense"]]


def test_new_exports_keep_unet_weights_in_external_files(checkpoint, tmp_path):
    export = export_checkpoint(checkpoint, tmp_path / "export", ExportOptions(steps=4, max_batch=2))
    for entry in _unet_entries(export):
        assert entry["external_data"] and (tmp_path / "export" / entry["external_data"]).is_file()
        assert entry["external_data"] in export["files"]
    # the small shared graphs stay single files
    assert export["text_encoder"].get("external_data") is None


def test_relayout_moves_inline_weights_out_and_results_do_not_change(checkpoint, tmp_path):
    root = tmp_path / "export"
    export_checkpoint(checkpoint, root, ExportOptions(steps=4, max_batch=2, unet_external_data=False))
    before = read_manifest(root)
    assert all(e["external_data"] is None for e in _unet_entries(before))
    (root / "NOTES.txt").write_text("the user's own file")
    want = _latents(root)

    done = externalize_unet_weights(root)

    assert sorted(done) == sorted([f"{e['code']} fp32" for e in before["experts"]] + ["dense fp32"])
    after = read_manifest(root, verify=True)  # every listed file present and hashed
    for old, new in zip(_unet_entries(before), _unet_entries(after)):
        assert new["unet"].endswith(".ext.onnx") and new["external_data"] == new["unet"] + ".data"
        assert not (root / old["unet"]).exists() and old["unet"] not in after["files"]
    assert (root / "NOTES.txt").read_text() == "the user's own file"
    assert np.array_equal(_latents(root), want)
    assert externalize_unet_weights(root) == []  # a second run has nothing to do


def test_relayout_refuses_a_modified_export_and_changes_nothing(checkpoint, tmp_path, capsys):
    root = tmp_path / "export"
    export_checkpoint(checkpoint, root, ExportOptions(steps=4, max_batch=2, unet_external_data=False, dense=False))
    manifest = json.loads((root / "manifest.json").read_text())
    graph = root / manifest["experts"][0]["unet"]
    graph.write_bytes(graph.read_bytes() + b"\0")
    listing = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    with pytest.raises(ArtifactError, match="sha256"):
        externalize_unet_weights(root)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == listing
    capsys.readouterr()  # the export's progress bars
    assert main([str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m aptp.export.relayout: error:"), err
