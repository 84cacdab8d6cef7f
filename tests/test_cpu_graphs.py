"""UNet graphs optimised for CPU at export (`aptp.export.cpu_graphs`): listed and hashed in the
manifest, checked against the exported graph, and what the runtime loads on CPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from aptp.errors import ArtifactError
from aptp.export import cpu_graphs
from aptp.export.cpu_graphs import optimize_export
from aptp.runtime import AptpPipeline
from runtime_fixtures import FOOD_PROMPTS, VEHICLE_PROMPTS, tiny_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("cpu-graphs"))


@pytest.fixture(scope="module")
def optimised(export_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("optimised") / "export"
    shutil.copytree(export_dir, root)
    optimize_export(root, threads=1)
    return root


def test_every_unet_gets_a_hashed_cpu_graph_with_fewer_nodes(optimised):
    manifest = json.loads((optimised / "manifest.json").read_text())
    entries = [*manifest["experts"], manifest["dense"]]
    for entry in entries:
        graph = entry["cpu_graph"]
        assert graph["unet"] == entry["unet"].replace("unet.onnx", "unet.cpu.onnx")
        assert graph["unet"] in manifest["files"] and graph["sha256"] == manifest["files"][graph["unet"]]
        assert (optimised / graph["unet"]).is_file()
        assert graph["nodes"][1] < graph["nodes"][0]  # shape arithmetic folded, ops fused
        assert 0 <= graph["max_abs_diff"] <= cpu_graphs.MAX_DIFF and graph["level"] == "ORT_ENABLE_EXTENDED"


def test_the_runtime_loads_the_cpu_graphs_and_makes_the_same_images(export_dir, optimised):
    prompts = [VEHICLE_PROMPTS[0], FOOD_PROMPTS[0]]
    with AptpPipeline.from_export(export_dir, threads=1) as plain, \
            AptpPipeline.from_export(optimised, threads=1) as fast:
        assert fast.unet_file(0).onnx.name == "unet.cpu.onnx" and plain.unet_file(0).onnx.name == "unet.onnx"
        want, got = plain(prompts, seeds=[0, 1]), fast(prompts, seeds=[0, 1])
    for a, b in zip(want, got):
        assert a.expert == b.expert
        np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5)
        assert np.abs(a.image.astype(int) - b.image).max() <= 1


def test_a_modified_cpu_graph_is_refused(optimised, tmp_path):
    root = tmp_path / "export"
    shutil.copytree(optimised, root)
    graph = root / "experts" / "expert_0" / "unet.cpu.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="unet.cpu.onnx"):
        AptpPipeline.from_export(root)


def test_a_graph_failing_its_parity_check_leaves_the_export_as_it_was(export_dir, tmp_path, monkeypatch):
    root = tmp_path / "export"
    shutil.copytree(export_dir, root)
    before = (root / "manifest.json").read_bytes()
    monkeypatch.setattr(cpu_graphs, "MAX_DIFF", -1.0)  # no difference passes
    with pytest.raises(ArtifactError, match="differs from it by"):
        optimize_export(root, threads=1)
    assert (root / "manifest.json").read_bytes() == before
    assert not list(root.rglob("unet.cpu.onnx*")) and not list(root.rglob(".cpu-graph-*"))
