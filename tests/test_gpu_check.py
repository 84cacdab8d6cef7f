"""The prepared GPU check runs end to end on a CPU in --dry-run mode (tiny shapes, float32).

This is what makes the script trustworthy before a GPU sees it: the same shell entry point,
the same steps and the same report fields as a real run. Figures are not checked (they are CPU
timings of a toy model); their presence, labels and consistency are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"dense", "expert_0", "expert_1", "expert_2", "expert_3", "static"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, dict, subprocess.CompletedProcess]:
    pytest.importorskip("torch", reason="torch is not installed: the GPU check's models need it")
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "APTP_GPU_CHECK_SITE": str(tmp_path_factory.mktemp("site"))}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check" / "run.sh"), str(out), "--dry-run", "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), proc


@pytest.mark.slow
def test_dry_run_writes_every_step_and_report_under_one_folder(dry_run):
    out, results, proc = dry_run
    assert {p.name for p in out.iterdir()} >= {"gpu_check.json", "summary.md", "gpu_check.log", "cuda_tests.xml",
                                               "cuda_tests.log"}
    assert results["format"] == "aptp-gpu-check" and results["dry_run"] is True
    steps = results["steps"]
    for name in ("environment", "cuda_extension", "cuda_tests", "models", "unet_step_torch", "end_to_end",
                 "onnxruntime_cpu_onnxruntime"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    assert steps["unet_step_cuda_graphs"]["status"] == "skipped"
    assert "imported" in results["cuda_extension"] and "status_line" in results["cuda_extension"]
    tests = results["cuda_tests"]
    assert tests["ran"] and tests["returncode"] == 0 and tests["tests"] >= 1 and tests["failures"] == 0
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "## UNet step: torch-cpu" in summary and "## End to end" in summary
    assert "wrote" in proc.stdout and "exit status 0" in (out / "gpu_check.log").read_text()


@pytest.mark.slow
def test_dry_run_unet_grid_has_ratios_for_every_cell_and_labels_what_ran(dry_run):
    _, results, _ = dry_run
    macs = results["models"]["macs_ratio"]
    assert set(macs) == {"64", "128"}
    for ratios in macs.values():
        assert set(ratios) == VARIANTS and ratios["dense"] == 1.0
        assert all(0.3 < ratios[v] < 0.9 for v in VARIANTS - {"dense"})
    torch_rows = [r for r in results["unet_step"] if r.get("column") == "torch-cpu"]
    assert {(r["resolution"], r["batch"]) for r in torch_rows} == {(64, 1), (64, 2), (128, 1), (128, 2)}
    assert {r["variant"] for r in torch_rows} == VARIANTS
    for r in torch_rows:
        assert r["provider"] == "torch cpu float32" and r["n"] == 2
        assert r["macs_ratio"] == pytest.approx(macs[str(r["resolution"])][r["variant"]])
        dense = next(d for d in torch_rows if (d["resolution"], d["batch"], d["variant"]) ==
                     (r["resolution"], r["batch"], "dense"))
        assert r["latency_ratio"] == pytest.approx(r["median_s"] / dense["median_s"])
        if r["variant"] != "dense":
            assert r["gap"] == pytest.approx(r["latency_ratio"] / r["macs_ratio"] - 1)
    ort_rows = [r for r in results["unet_step"] if r.get("column") == "onnxruntime-cpu"]
    # The provider label is what the session activated, never what was asked for.
    assert ort_rows and {r["provider"] for r in ort_rows} == {"CPUExecutionProvider"}


@pytest.mark.slow
def test_dry_run_end_to_end_routes_mixed_prompts_per_expert(dry_run):
    _, results, _ = dry_run
    rows = [r for r in results["end_to_end"] if "variant" in r]
    assert {(r["prompts"], r["variant"]) for r in rows} == {(n, v) for n in (4, 8) for v in ("routed", "dense",
                                                                                                "static")}
    for r in rows:
        assert r["steps"] == 2 and r["guidance_scale"] == 7.5 and r["provider"] == "torch cpu float32"
        assert r["images_per_s"] == pytest.approx(r["prompts"] / r["median_s"])
        assert set(r["stages_median_s"]) == {"denoise", "decode"}
        if r["variant"] == "routed":
            assert sum(r["assignment"]) == r["prompts"] and r["unet_calls_per_step"] >= 1
            assert 0.3 < r["macs_ratio"] < 0.9
    checks = results["checks"]
    assert any(k.startswith("routed vs static throughput, 8 prompts") for k in checks)


def test_gpu_check_refuses_a_real_run_without_a_gpu_and_bad_options(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from aptp.benchmarks import cli

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: this test covers machines without one")
    assert cli.main(["gpu-check", "--output-dir", str(tmp_path / "o"), "--no-tests"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert cli.main(["gpu-check", "--output-dir", str(tmp_path / "o"), "--dry-run", "--e2e-steps", "50"]) == 2
    assert "at most 25 steps" in capsys.readouterr().err


def test_torch_step_backend_on_cpu_matches_the_module(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from conftest import make_unet

    from aptp.benchmarks.latency.backends import unet_inputs
    from aptp.benchmarks.latency.torch_cuda import TorchPlacement, torch_cuda_step

    unet = make_unet("multi_layer")
    shape = {"channels": unet.config.in_channels, "text_length": 8, "hidden": unet.config.cross_attention_dim}
    placement = TorchPlacement.for_device("cpu", cuda_graphs=True)
    assert placement == TorchPlacement("cpu", "float32", False) and placement.label == "torch cpu float32"
    assert TorchPlacement.for_device("cuda", cuda_graphs=True).label == "torch cuda float16 + CUDA graph"
    step = torch_cuda_step(unet, shape, placement)
    got = step.prepare(2, 8, 8)()
    feed = {k: torch.from_numpy(v) for k, v in unet_inputs(2, shape["channels"], 8, 8, 8, shape["hidden"]).items()}
    with torch.no_grad():
        want = unet(feed["sample"], feed["timestep"], encoder_hidden_states=feed["encoder_hidden_states"]).sample
    assert torch.allclose(got, want, atol=1e-5)
    assert step.provider == "torch cpu float32"
    step.close()
