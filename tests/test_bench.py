"""aptp-bench: the latency suite on a tiny export, the synthetic experts, the CLI's errors.

Timings are never asserted: only that every figure is produced and consistent with the others.
"""

from __future__ import annotations

import json
import statistics
import sys
import types
from pathlib import Path

import pytest

from aptp.benchmarks import cli
from aptp.benchmarks.latency import LatencyOptions, run_latency, summarize, synthetic_assignment
from aptp.benchmarks.synthetic import (
    KIND_PROFILES,
    load_bench_config,
    mask_from_fractions,
    search_mask,
)

sys.path.insert(0, str(Path(__file__).parent))
from runtime_fixtures import tiny_export  # noqa: E402


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def suite(export_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    options = LatencyOptions(backends=["onnxruntime", "torch"], batch_sizes=[1, 2], resolutions=[64, 32],
                             repeats=2, warmup=0, calls_in_a_row=2, threads=1, e2e_batch=3, e2e_repeats=1,
                             e2e_workers=[2],
                             profile_repeats=2, gap_threshold=0.0)  # every expert row counts as a gap: the profiler runs
    return run_latency(export_dir, out, options), out


def test_suite_writes_json_markdown_and_png(suite):
    results, out = suite
    saved = json.loads((out / "results.json").read_text())
    assert saved["format"] == "aptp-bench-latency" and saved["unet_step"] == json.loads(json.dumps(results["unet_step"]))
    for key in ("cpu_model", "logical_cores", "versions", "load_average", "load_average_after", "memory_gib"):
        assert key in saved["machine"], key
    assert saved["settings"]["threads"] == 1 and saved["settings"]["interleaved"] == "all variants"
    png = (out / "latency_vs_macs.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "results.md").read_text()
    for heading in ("### onnxruntime, 64 px", "### torch, 32 px", "## End to end", "## Gaps", "## Checks"):
        assert heading in md, heading


def test_every_variant_backend_resolution_and_batch_is_timed(suite, export_dir):
    results, _ = suite
    manifest = json.loads((export_dir / "manifest.json").read_text())
    k = len(manifest["experts"])
    experts = {f"expert_{c}" for c in range(k)}
    want = {
        "onnxruntime": {"dense", "static", *experts},
        "torch": {"dense", "static", *experts, *{f"masked_{c}" for c in range(k)}},
    }
    for backend, variants in want.items():
        for res in (64, 32):
            for batch in (1, 2):
                rows = {r["variant"]: r for r in results["unet_step"]
                        if (r["backend"], r["resolution"], r["batch"]) == (backend, res, batch)}
                assert set(rows) == variants, (backend, res, batch)
                dense = rows["dense"]["median_s"]
                for name, row in rows.items():
                    # Two rounds of two calls in a row: the second of each is a sample, the first
                    # (right after another model) gives the switch cost.
                    assert row["n"] == 2 and len(row["samples_s"]) == 2
                    assert row["median_s"] == pytest.approx(statistics.median(row["samples_s"]))
                    assert row["switch_s"] == pytest.approx(row["first_call_median_s"] - row["median_s"])
                    assert row["latency_ratio"] == pytest.approx(row["median_s"] / dense)
                    assert row["latency_per_macs"] == pytest.approx(row["latency_ratio"] / row["macs_ratio"])
    # MACs ratios at the nominal resolution are the export's own.
    nominal = results["variants"]["64"]
    for entry in manifest["experts"]:
        assert nominal[f"expert_{entry['code']}"]["macs_ratio"] == pytest.approx(entry["macs_ratio"], rel=1e-6)
    # Attention is quadratic in the image length: ratios move with the resolution.
    assert results["variants"]["32"]["expert_0"]["macs_ratio"] != pytest.approx(nominal["expert_0"]["macs_ratio"],
                                                                                  rel=1e-9)


def test_static_baseline_has_the_routed_mixture_macs(suite):
    results, _ = suite
    routed = results["routing"]
    codes = routed["codes"]
    nominal = results["variants"]["64"]
    expected = sum(nominal[f"expert_{c}"]["macs_ratio"] for c in codes) / len(codes)
    assert routed["expected_macs_ratio"] == pytest.approx(expected)
    assert abs(nominal["static"]["macs_ratio"] - expected) <= 0.02 * expected


def test_end_to_end_rows_and_overheads(suite):
    results, _ = suite
    rows = {r["variant"]: r for r in results["end_to_end"]}
    assert set(rows) == {"routed", "dense", "static", "routed@2w", "dense@2w", "static@2w"}
    assert rows["routed@2w"]["workers"] == 2 and rows["routed"]["workers"] == 1
    for name in ("routed", "routed@2w"):
        static = rows[name.replace("routed", "static")]["median_s"]
        assert rows[name]["speed_vs_static"] == pytest.approx(static / rows[name]["median_s"])
    assert results["checks"]["fastest_routed_workers"] in (1, 2)
    for row in rows.values():
        assert row["batch"] == 3 and row["images_per_s"] == pytest.approx(3 / row["median_s"])
        # Every prompt's two guidance rows go through one UNet call per step, whatever the plan.
        assert sum(row["unet_calls_per_step"]) == 6 and max(row["unet_calls_per_step"]) <= 2 * row["max_batch_per_unet_call"]
        assert row["speedup_vs_dense"] == pytest.approx(rows["dense"]["median_s"] / row["median_s"])
        assert set(row["stages_median_s"]) >= {"text_encode", "denoise", "decode"}
    assert rows["dense"]["unet_calls_per_step"] == [6] and len(rows["dense@2w"]["unet_calls_per_step"]) == 2
    routed = rows["routed"]
    assert sum(routed["assignment"]) == 3 and routed["routing"] == "router (argmax)"
    assert 0 < routed["router_share"] < 1 and 0 <= routed["dispatch_share"] < 1
    assert routed["overhead_share"] == pytest.approx(routed["router_share"] + routed["dispatch_share"])
    assert results["checks"]["routed_speedup_vs_dense"] == pytest.approx(routed["speedup_vs_dense"])


def test_gaps_carry_an_op_profile_and_an_explanation(suite):
    results, _ = suite
    profiled = {g["variant"] for g in results["gaps"]}
    assert profiled >= {r["variant"] for r in results["unet_step"]
                        if r["backend"] == "onnxruntime" and r["variant"].startswith("expert_")}
    for gap in results["gaps"]:
        ops = {op["op_type"]: op for op in gap["op_types"]}
        assert "Conv" in ops and ops["Conv"]["dense_s"] > 0 and ops["Conv"]["expert_s"] > 0
        assert gap["explanation"].startswith("latency ratio")


@pytest.mark.parametrize("pairwise", [False, True], ids=["interleaved", "pairwise"])
def test_fixed_shape_sessions_are_timed_beside_the_dynamic_ones(export_dir, tmp_path, pairwise):
    options = LatencyOptions(backends=["onnxruntime"], batch_sizes=[2], resolutions=[64], repeats=2, warmup=0,
                             calls_in_a_row=1, threads=1, static=False, e2e=False, gap_threshold=10.0,
                             pairwise=pairwise, fixed_shapes=True)
    results = run_latency(export_dir, tmp_path / "out", options)
    rows = {r["variant"]: r for r in results["unet_step"]}
    k = len(json.loads((export_dir / "manifest.json").read_text())["experts"])
    dynamic = {"dense", *(f"expert_{c}" for c in range(k))}
    assert set(rows) == dynamic | {f"{name}+fixed" for name in dynamic}
    assert rows["dense+fixed"]["latency_ratio"] == pytest.approx(1.0)
    for name in dynamic:
        fixed, base = rows[f"{name}+fixed"], rows[name]
        assert (fixed["sessions"], base["sessions"]) == ("fixed shapes", "dynamic")
        assert fixed["macs_ratio"] == base["macs_ratio"]
        assert fixed["speed_vs_dynamic"] == pytest.approx(base["median_s"] / fixed["median_s"])
        # Created in prepare (untimed), measured, and charged on top of the dynamic session.
        assert fixed["specialised_s"] > 0 and fixed["specialised_bytes"] >= 0 and base["session_bytes"] > 0
        assert fixed["memory_vs_dynamic"] == pytest.approx(
            (base["session_bytes"] + fixed["specialised_bytes"]) / base["session_bytes"])
    if not pairwise:  # one dense+fixed for all: every ratio against its median
        for name in dynamic:
            assert rows[f"{name}+fixed"]["latency_ratio"] == pytest.approx(
                rows[f"{name}+fixed"]["median_s"] / rows["dense+fixed"]["median_s"])
    assert {f["sessions"] for f in results["fixed_cost_fits"]} == {"dynamic", "fixed shapes"}
    assert results["checks"]["onnxruntime_expert_rows"] == k  # the checks count the dynamic rows
    low, high = results["checks"]["fixed_shapes_speed_vs_dynamic"]
    assert low == min(rows[f"{n}+fixed"]["speed_vs_dynamic"] for n in dynamic) and high >= low
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Sessions specialised to the call's shapes" in md and "| fixed shapes |" in md


def test_summarize_median_and_iqr():
    stats = summarize([4.0, 1.0, 3.0, 2.0, 100.0])
    assert stats["median_s"] == 3.0 and stats["q1_s"] == 2.0 and stats["q3_s"] == 4.0 and stats["iqr_s"] == 2.0
    assert stats["min_s"] == 1.0 and stats["max_s"] == 100.0 and stats["n"] == 5


def test_synthetic_assignment_follows_shares_and_not_order():
    prompts = [f"prompt {i}" for i in range(10)]
    codes = synthetic_assignment(prompts, [0.5, 0.3, 0.2])
    assert sorted(codes.tolist()) == [0] * 5 + [1] * 3 + [2] * 2
    shuffled = prompts[::-1]
    again = synthetic_assignment(shuffled, [0.5, 0.3, 0.2])
    assert dict(zip(shuffled, again.tolist())) == dict(zip(prompts, codes.tolist()))


# -- synthetic experts ------------------------------------------------------------------------


def test_mask_search_hits_targets_by_torchs_own_flop_counter():
    """The search uses the analytic MacsModel; the sliced UNets are checked by FlopCounterMode."""
    import torch
    from conftest import make_unet

    from aptp.train.gates import GateLayout
    from aptp.train.macs import DeployShape, MacsModel, count_flops
    from aptp.train.slicing import slice_unet

    unet = make_unet("multi_layer")
    layout = GateLayout.from_unet(unet, ff_groups=8, depth=False)
    shape = DeployShape(16, 16, 8)
    macs = MacsModel(unet, layout, shape)
    dense = count_flops(unet, shape)
    masks = []
    for k, target in enumerate((0.45, 0.55, 0.65, 0.75)):
        found = search_mask(macs, layout, target, KIND_PROFILES[k], seed=k)
        assert found.relative_error <= 0.02, (target, found.ratio)
        sliced, _ = slice_unet(unet, layout, found.mask)
        assert abs(count_flops(sliced, shape) / dense - target) <= 0.02 * target
        for site in layout.sites:  # no site emptied
            assert found.mask[layout.site_slice(site)].any()
        masks.append(found.mask)
    assert not torch.equal(masks[0], masks[1])


def test_mask_from_fractions_keeps_rounded_counts():
    from conftest import make_unet

    from aptp.train.gates import GateLayout

    layout = GateLayout.from_unet(make_unet("single_layer"), ff_groups=4, depth=False)
    mask = mask_from_fractions(layout, [0.5] * len(layout.sites), seed=3)
    for site in layout.sites:
        assert int(mask[layout.site_slice(site)].sum()) == max(1, round(0.5 * site.num_units))


def test_sd21_config_is_the_real_sd21_unet():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = load_bench_config("sd21")
    unet_cfg = config["unet"]
    assert unet_cfg["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet_cfg["attention_head_dim"] == [5, 10, 20, 20] and unet_cfg["cross_attention_dim"] == 1024
    assert config["text_length"] == 77 and unet_cfg["sample_size"] == 96
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_cfg)
    # stabilityai/stable-diffusion-2-1's UNet has 865,910,724 parameters.
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724


def test_synthetic_checkpoint_records_targets_and_synthetic_routing(tmp_path):
    import yaml

    from aptp.benchmarks.synthetic import build_synthetic_checkpoint, build_synthetic_pipeline
    from aptp.train.checkpoint import CheckpointInfo, load_codes
    from conftest import UNET_CONFIGS

    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIGS["multi_layer"].items()}
    config_file = tmp_path / "small.yaml"
    config_file.write_text(yaml.safe_dump({
        "name": "small", "text_length": 8, "unet": unet,
        "reduced": {"text_encoder": {"num_hidden_layers": 1, "intermediate_size": 32, "num_attention_heads": 2},
                    "vae": {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}},
        "experts": {"targets": [0.5, 0.7], "shares": [0.5, 0.5]},
    }))
    config = load_bench_config(str(config_file))
    pipeline = build_synthetic_pipeline(tmp_path / "pipe", config)
    checkpoint = build_synthetic_checkpoint(tmp_path / "ckpt", pipeline, config, resolution=64)
    info = CheckpointInfo.load(checkpoint)
    assert [abs(r - t) / t <= 0.02 for r, t in zip(info.code_macs_ratio, (0.5, 0.7))] == [True, True]
    assert info.budget_target == pytest.approx(0.5 * sum(info.code_macs_ratio))
    _, masks = load_codes(checkpoint)
    assert masks.shape[0] == 2 and not bool((masks[0] == masks[1]).all())
    synthetic = json.loads((checkpoint / "synthetic.json").read_text())
    assert synthetic["synthetic"] is True and synthetic["routing"].startswith("synthetic")


# -- CLI ----------------------------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("aptp-bench")
    return err[0]


def test_cli_missing_artifacts_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["latency", "--artifacts", str(missing), "--output-dir", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys)
    assert str(missing) in line and "aptp-export" in line
    # The bare form is the latency command too.
    assert cli.main(["--artifacts", str(missing)]) == 2
    assert str(missing) in _one_error_line(capsys)


def test_cli_unknown_backend_is_one_line(export_dir, tmp_path, capsys):
    code = cli.main(["latency", "--artifacts", str(export_dir), "--backends", "onnxruntime,warp-drive",
                     "--output-dir", str(tmp_path / "r")])
    assert code == 2
    line = _one_error_line(capsys)
    assert "warp-drive" in line and "onnxruntime" in line


def test_cli_bad_numbers_and_commands_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["latency", "--artifacts", str(tmp_path), "--batch-sizes", "1,zero"])
    assert exit_info.value.code == 2
    assert "1,zero" in _one_error_line(capsys)
    assert cli.main(["benchmark-everything"]) == 2
    assert "benchmark-everything" in _one_error_line(capsys)
    assert cli.main(["make-synthetic", "--unet-config", "sd99", "--output", str(tmp_path / "a")]) == 2
    assert "sd99" in _one_error_line(capsys)


def test_cli_not_an_export_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["--artifacts", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "r")]) == 2
    assert "manifest.json" in _one_error_line(capsys)


def test_cli_quality_dispatches_to_main_quality(monkeypatch):
    seen = {}
    stub = types.ModuleType("aptp.benchmarks.quality.table")

    def main_quality(argv):
        seen["argv"] = argv
        return 0

    stub.main_quality = main_quality
    monkeypatch.setitem(sys.modules, "aptp.benchmarks.quality.table", stub)
    assert cli.main(["quality", "--foo", "bar"]) == 0
    assert seen["argv"] == ["--foo", "bar"]


def test_a_profile_that_disagrees_with_the_timing_says_so():
    from aptp.benchmarks.latency.profile import explain_gap

    # Timed slower than MACs-proportional (0.60 vs 0.45), but the profile's ops shrank more than that.
    _, text = explain_gap({"Conv": 0.030}, {"Conv": 0.100}, macs_ratio=0.45, latency_ratio=0.60)
    assert "slower than MACs-proportional" in text and "-15.00 ms per step (below it, unlike the timing" in text
    _, agreeing = explain_gap({"Conv": 0.060}, {"Conv": 0.100}, macs_ratio=0.45, latency_ratio=0.60)
    assert "+15.00 ms per step, led by" in agreeing
