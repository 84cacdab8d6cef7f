"""The offline quality replication's machinery: teacher pretraining, the procedural classifier,
and the quality table end to end, all on tiny step counts (no test depends on long training)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aptp.errors import ConfigError


# ----------------------------------------------------------------------------------------------
# Pretraining
# ----------------------------------------------------------------------------------------------


def test_pretrain_writes_a_loadable_pipeline(tmp_path):
    from aptp.train.models import load_components
    from aptp.train.pretrain import load_pretrain_config, run_pretrain

    config = load_pretrain_config("tiny_teacher", [
        "num_samples=16", "num_threads=null",
        "vae.max_steps=2", "vae.batch_size=2", "unet.max_steps=3", "unet.batch_size=2", "unet.warmup_steps=1",
    ])
    before = load_components("tiny")  # random or committed: pretraining starts from a fresh random build
    out = run_pretrain(config, tmp_path / "teacher")
    components = load_components(str(out))
    assert (out / "model_index.json").is_file() and (out / "pretrain_config.yaml").is_file()
    log = [json.loads(line) for line in (out / "pretrain_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["vae"] * 2 + ["unet"] * 3
    assert all(np.isfinite(r.get("loss", r.get("l1"))) for r in log)
    # The scaling factor is recalibrated on the trained VAE: scaled latents have unit std.
    from aptp.train.data import ProceduralCaptions

    pixels = torch.stack([ProceduralCaptions(16, seed=0)[i]["pixel_values"] for i in range(16)])
    with torch.no_grad():
        latents = components.vae.encode(pixels).latent_dist.mean * components.vae.config.scaling_factor
    assert 0.8 < float(latents.std()) < 1.25
    assert type(components.unet) is type(before.unet)
    assert components.unet.config.block_out_channels == before.unet.config.block_out_channels
    # Refuses to overwrite without being asked.
    with pytest.raises(ConfigError, match="already holds a pipeline written by aptp-train pretrain"):
        run_pretrain(config, out)
    # With overwrite its own pipeline is replaced whole, through a staging directory beside it.
    assert run_pretrain(config, out, overwrite=True) == out and (out / "model_index.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher"]


def test_pretrain_scheduler_changes_train_and_save_the_changed_schedule(tmp_path):
    from aptp.train.models import load_components
    from aptp.train.pretrain import load_pretrain_config, run_pretrain

    settings = ["num_samples=8", "num_threads=null", "resolution=32", "vae.max_steps=1", "vae.batch_size=2",
                "unet.max_steps=2", "unet.batch_size=2", "unet.warmup_steps=1"]
    zero_snr = ["scheduler.prediction_type=v_prediction", "scheduler.rescale_betas_zero_snr=true",
                "scheduler.timestep_spacing=trailing"]
    out = run_pretrain(load_pretrain_config("tiny_teacher", settings + zero_snr), tmp_path / "zero-snr")
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (saved["prediction_type"], saved["rescale_betas_zero_snr"], saved["timestep_spacing"]) == (
        "v_prediction", True, "trailing")
    training = load_components(str(out)).noise_scheduler
    assert float(training.alphas_cumprod[-1]) == 0.0 and float(training.alphas_cumprod[0]) > 0.99
    # Changing the schedule without training the UNet under it, or zero SNR with epsilon, is refused first.
    with pytest.raises(ConfigError, match="need the unet stage"):
        run_pretrain(load_pretrain_config("tiny_teacher", settings + zero_snr), tmp_path / "vae-only", stages=["vae"])
    with pytest.raises(ConfigError, match="needs prediction_type v_prediction"):
        run_pretrain(load_pretrain_config("tiny_teacher", settings + ["scheduler.rescale_betas_zero_snr=true"]),
                     tmp_path / "eps")
    with pytest.raises(ConfigError, match="scheduler.prediction_type must be one of"):
        load_pretrain_config("tiny_teacher", ["scheduler.prediction_type=eps"])
    assert not (tmp_path / "vae-only").exists() and not (tmp_path / "eps").exists()
    # An unset key keeps the starting pipeline's value: this one already predicts v.
    again = run_pretrain(load_pretrain_config("tiny_teacher", settings + ["scheduler.rescale_betas_zero_snr=true"]),
                         tmp_path / "again", init_from=out, stages=["unet"])
    assert json.loads((again / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_committed_zero_snr_teacher_is_what_its_preset_says():
    import yaml

    from aptp.train.models import TINY_WEIGHTS, load_components
    from aptp.train.pretrain import load_pretrain_config

    path = TINY_WEIGHTS.parent / "tiny-sd-zero-snr"
    preset = load_pretrain_config("tiny_teacher_zero_snr")
    assert yaml.safe_load((path / "pretrain_config.yaml").read_text()) == preset.to_dict()
    saved = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    assert {key: saved[key] for key in preset.scheduler.changes()} == preset.scheduler.changes()
    components = load_components(str(path))
    assert components.noise_scheduler.config.prediction_type == "v_prediction"
    assert float(components.noise_scheduler.alphas_cumprod[-1]) == 0.0
    # Fine-tuned from the committed teacher: same VAE and tokenizer, a different UNet.
    teacher = load_components(str(TINY_WEIGHTS))
    assert torch.equal(components.vae.decoder.conv_out.weight, teacher.vae.decoder.conv_out.weight)
    assert not torch.equal(components.unet.conv_out.weight, teacher.unet.conv_out.weight)


def test_pretrain_config_rejects_unknown_keys():
    from aptp.train.pretrain import load_pretrain_config

    with pytest.raises(ConfigError, match="unknown key"):
        load_pretrain_config("tiny_teacher", ["unet.max_stepz=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_pretrain_config("no_such_preset")


def test_pretrain_overrides_read_numbers_like_the_training_config():
    from aptp.train.pretrain import load_pretrain_config

    # Plain YAML 1.1 reads 5e-4 as a string; the pretrain config used to refuse it as "not a number".
    config = load_pretrain_config("tiny_teacher", ["unet.learning_rate=5e-4", "vae.learning_rate=2e-3"])
    assert config.unet.learning_rate == pytest.approx(5e-4) and config.vae.learning_rate == pytest.approx(2e-3)
    with pytest.raises(ConfigError, match=r"override 'unet.max_steps=\[1': malformed YAML"):
        load_pretrain_config("tiny_teacher", ["unet.max_steps=[1"])


# ----------------------------------------------------------------------------------------------
# Classifier / feature extractor
# ----------------------------------------------------------------------------------------------


def test_classifier_shapes_and_extractor():
    from aptp.benchmarks.quality.classifier import FEATURE_DIM, LABELS, ProceduralClassifier, procedural_extractor

    model = ProceduralClassifier().eval()
    images = torch.rand(3, 3, 64, 64)
    logits = model(images)
    assert {name: tuple(v.shape) for name, v in logits.items()} == {name: (3, len(l)) for name, l in LABELS.items()}
    predicted = model.predict(images)
    assert len(predicted) == 3 and all(p["shape"] in LABELS["shape"] for p in predicted)
    features = procedural_extractor(model)(images)
    assert features.shape == (3, FEATURE_DIM) and features.dtype == np.float32


def test_committed_classifier_beats_chance_on_real_images():
    from aptp.benchmarks.quality.classifier import DEFAULT_WEIGHTS, LABELS, heldout_accuracy, load_classifier

    if not DEFAULT_WEIGHTS.is_file():
        pytest.fail(f"the classifier weights must be committed at {DEFAULT_WEIGHTS}")
    accuracy = heldout_accuracy(load_classifier(), num_images=64, seed=4242)
    for name, labels in LABELS.items():
        # Chance is at most 1/2 here (shape/word: the "None" class covers 3/4 or 1/4 of images).
        assert accuracy[name] > 0.8, (name, accuracy)


def test_load_classifier_refuses_missing_file(tmp_path):
    from aptp.benchmarks.quality.classifier import load_classifier
    from aptp.errors import ArtifactError

    with pytest.raises(ArtifactError, match="no classifier weights"):
        load_classifier(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------
# Table helpers
# ----------------------------------------------------------------------------------------------


def test_routing_stats_by_hand():
    from aptp.benchmarks.quality.table import routing_stats

    stats = routing_stats([0, 1, 1, 0], [0.5, 0.9], [True, True, False, False])
    assert stats["macs_ratio"] == pytest.approx(0.7)
    assert stats["code_share"] == [0.5, 0.5]
    assert stats["text_macs"] == pytest.approx(0.7) and stats["shape_macs"] == pytest.approx(0.7)
    stats = routing_stats([1, 1, 0], [0.5, 0.9], [True, True, False])
    assert stats["text_macs"] == pytest.approx(0.9) and stats["shape_macs"] == pytest.approx(0.5)


def test_median_bandwidth_by_hand():
    from aptp.benchmarks.quality.table import median_bandwidth

    points = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # distances 3, 4, 5
    assert median_bandwidth(points) == pytest.approx(4.0)


def test_same_prompt_same_noise_across_rows():
    from aptp.benchmarks.quality.table import prompt_noise

    a, b = prompt_noise(5, (4, 2, 2), seed=3), prompt_noise(3, (4, 2, 2), seed=3)
    assert torch.equal(a[:3], b) and not torch.equal(a[0], a[1])


def test_row_specs_share_everything_but_codes_and_assignment():
    from aptp.benchmarks.quality.rows import row_specs, sinkhorn_switch_available
    from aptp.benchmarks.quality.table import build_parser
    from aptp.train.config import load_config

    args = build_parser().parse_args(["--num-codes", "4", "--prune-steps", "30", "--finetune-steps", "7"])
    specs = {spec.name: spec for spec in row_specs(args)}
    assert set(specs) == {"aptp", "static", "aptp_no_ot", "static_long"}
    configs = {}
    for name, spec in specs.items():
        if name == "aptp_no_ot" and not sinkhorn_switch_available():
            continue
        configs[name] = load_config("tiny", spec.overrides)
    assert configs["aptp"].codes.num_codes == 4 and configs["static"].codes.num_codes == 1
    assert configs["aptp"].prune == configs["static"].prune and configs["aptp"].finetune == configs["static"].finetune
    assert configs["aptp"].prune.max_steps == 30 and configs["aptp"].finetune.max_steps == 7
    assert configs["static_long"].finetune.max_steps == 4 * 7 and configs["static_long"].prune == configs["static"].prune
    if "aptp_no_ot" in configs:
        assert configs["aptp_no_ot"].sinkhorn.enabled is False and configs["aptp"].sinkhorn.enabled is True


@pytest.mark.parametrize("row, option, weight", [("aptp_quality", "--quality-weight", "quality_weight"),
                                                  ("aptp_sensitivity", "--sensitivity-weight", "sensitivity_weight")])
def test_assignment_rows_differ_from_aptp_only_in_their_weight(row, option, weight):
    from aptp.benchmarks.quality.rows import row_specs
    from aptp.benchmarks.quality.table import build_parser
    from aptp.train.config import load_config

    args = build_parser().parse_args(["--rows", "aptp", row, option, "0.5"])
    configs = {spec.name: load_config("tiny", spec.overrides) for spec in row_specs(args)}
    assert getattr(configs["aptp"].sinkhorn, weight) == 0.0 and getattr(configs[row].sinkhorn, weight) == 0.5
    setattr(configs[row].sinkhorn, weight, 0.0)
    assert configs[row] == configs["aptp"]


def test_static_budget_rows_differ_from_static_only_in_their_budget():
    from aptp.benchmarks.quality.rows import row_specs
    from aptp.benchmarks.quality.table import build_parser
    from aptp.train.config import load_config

    args = build_parser().parse_args(["--rows", "static", "static_lower", "static_upper", "--target", "0.5",
                                      "--static-spread", "0.2"])
    configs = {spec.name: load_config("tiny", spec.overrides) for spec in row_specs(args)}
    assert [configs[name].budget.target for name in ("static_lower", "static", "static_upper")] == [0.3, 0.5, 0.7]
    for name in ("static_lower", "static_upper"):
        assert configs[name].codes.num_codes == 1
        configs[name].budget.target = 0.5
        assert configs[name] == configs["static"]


def test_aptp_is_paired_with_static_upper_as_the_equal_macs_baseline():
    from aptp.benchmarks.quality.table import paired_comparisons

    families = ["easy", "easy", "hard", "hard"]
    rows = {"aptp": {"per_prompt_alignment": [1.0, 0.5, 0.75, 0.25]},
            "static": {"per_prompt_alignment": [0.5, 0.5, 0.5, 0.5]},
            "static_upper": {"per_prompt_alignment": [0.75, 0.75, 0.25, 0.25]}}
    paired = paired_comparisons(rows, families)
    assert set(paired) == {"aptp - static", "aptp - static_upper", "static_upper - static"}
    assert paired["aptp - static_upper"]["easy"]["mean"] == pytest.approx(0.0)
    assert paired["aptp - static_upper"]["hard"]["mean"] == pytest.approx(0.25)
    assert paired["aptp - static_upper"]["all"]["mean"] == pytest.approx(0.125)


def test_what_longer_fine_tuning_alone_buys_static_is_paired():
    from aptp.benchmarks.quality.table import paired_comparisons

    families = ["easy", "hard"]
    rows = {"static": {"per_prompt_alignment": [0.5, 0.75]},
            "static_long": {"per_prompt_alignment": [1.0, 0.5]},
            "dense": {"per_prompt_alignment": [1.0, 1.0]}}
    paired = paired_comparisons(rows, families)
    assert set(paired) == {"static - dense", "static_long - static", "static_long - dense"}
    assert paired["static_long - static"]["easy"]["mean"] == pytest.approx(0.5)
    assert paired["static_long - static"]["hard"]["mean"] == pytest.approx(-0.25)
    assert paired["static_long - dense"]["all"]["mean"] == pytest.approx(-0.25)


@pytest.mark.parametrize("spread", ["0", "0.6", "-0.1"])
def test_a_static_spread_leaving_the_unit_interval_is_refused(tmp_path, spread):
    from aptp.benchmarks.quality.table import build_parser, run_quality

    args = build_parser().parse_args(["--rows", "static_upper", "--static-spread", spread, "--output-dir", str(tmp_path / "q")])
    with pytest.raises(ConfigError, match="--static-spread"):
        run_quality(args)
    assert not (tmp_path / "q").exists()


def test_a_run_recorded_before_an_option_compares_under_its_default():
    from aptp.benchmarks.quality.table import saved_setting

    assert saved_setting({"train_seed": 2}, "sensitivity_weight") == 1.0
    assert saved_setting({"sensitivity_weight": 0.5}, "sensitivity_weight") == 0.5


def test_family_gaps_by_hand():
    from aptp.benchmarks.quality.sensitivity import family_gaps, relative_log_errors

    errors = torch.tensor([[1.0, 4.0], [2.0, 2.0], [3.0, 3.0]])
    relative = relative_log_errors(errors)
    assert relative[0].tolist() == pytest.approx([float(np.log(0.4)), float(np.log(1.6))])
    assert relative[1].tolist() == [0.0, 0.0]
    # Two timesteps; code 1 is the smaller (MACs 0.4): its gap is code 1 minus code 0.
    stacked = torch.stack([relative, relative * 3], dim=2).numpy()
    gaps = family_gaps(stacked, [0.8, 0.4], ["hard", "easy", "easy"])
    assert gaps["smallest_code"] == 1 and gaps["largest_code"] == 0
    assert gaps["families"]["hard"]["gap"]["mean"] == pytest.approx(2 * float(np.log(4.0)))
    assert gaps["families"]["hard"]["gap_per_timestep"] == pytest.approx([float(np.log(4.0)), 3 * float(np.log(4.0))], abs=1e-4)
    assert gaps["families"]["easy"]["gap"]["mean"] == 0.0
    with pytest.raises(ValueError, match="2 codes"):
        family_gaps(stacked, [0.8, 0.4], ["hard", "easy"])


def test_quality_table_end_to_end(tmp_path):
    from aptp.benchmarks.quality.table import build_parser, run_quality

    parti = tmp_path / "parti.tsv"
    parti.write_text("Prompt\tCategory\tChallenge\tNote\n"
                     "a sign that says HELLO\tArtifacts\tWriting & Symbols\t\n"
                     "a red circle\tAbstract\tBasic\t\n"
                     "a dog\tAnimals\tBasic\t\n")
    args = build_parser().parse_args([
        "--output-dir", str(tmp_path / "q"), "--rows", "dense", "aptp", "static",
        "--num-codes", "2", "--prune-steps", "2", "--finetune-steps", "1", "--batch-size", "2",
        "--train-samples", "8", "--num-samples", "4", "--steps", "2", "--parti", str(parti),
    ])
    results = run_quality(args)
    saved = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert saved["rows"].keys() == results["rows"].keys() == {"dense", "aptp", "static"}
    for name in ("dense", "aptp", "static"):
        row = saved["rows"][name]
        assert np.isfinite(row["fid_like"]) and np.isfinite(row["cmmd"])
        assert 0 <= row["alignment"]["mean"] <= 1
        routing = row["routing"]
        assert len(routing["code_share"]) == len(routing["code_macs_ratio"]) == {"dense": 1, "aptp": 2, "static": 1}[name]
        assert sum(routing["code_share"]) == pytest.approx(1.0, abs=1e-3)
        assert routing["text_macs"] is not None or routing["shape_macs"] is not None
    assert saved["rows"]["dense"]["routing"]["macs_ratio"] == 1.0
    assert saved["rows"]["aptp"]["routing"]["macs_ratio"] <= 1.0
    assert saved["rows"]["aptp"]["training"]["overrides"][-1] == "codes.num_codes=2"
    parti_stats = saved["parti_routing"]["challenges"]
    assert parti_stats["Basic"]["prompts"] == 2 and parti_stats["Writing & Symbols"]["prompts"] == 1
    assert np.isfinite(saved["vae_reference"]["fid_like"]) and 0 <= saved["real_reference"]["alignment"]["all"] <= 1
    table = (tmp_path / "q" / "quality.md").read_text()
    for column in ("MACs ratio", "FID-like", "CMMD", "alignment", "share per code", "text-prompt MACs", "shape-prompt MACs"):
        assert column in table
    assert (tmp_path / "q" / "samples_aptp.png").is_file()
    # Per-prompt, per-family and paired results (issue 13).
    for name in ("dense", "aptp", "static"):
        row = saved["rows"][name]
        assert np.mean(row["per_prompt_alignment"]) == pytest.approx(row["alignment"]["mean"], abs=1e-3)
        fam = row["family_alignment"]
        assert fam["all"]["n"] == 4 and fam["all"]["low"] <= fam["all"]["mean"] <= fam["all"]["high"]
        assert row["routing"]["family_macs"]["all"]["mean"] == pytest.approx(row["routing"]["macs_ratio"])
    router = saved["rows"]["aptp"]["router"]
    assert sum(router["uncalibrated"]["code_share"]) == pytest.approx(1.0, abs=1e-3)
    assert router["calibrated"]["code_share"] == saved["rows"]["aptp"]["routing"]["code_share"]
    assert "router" not in saved["rows"]["static"]
    diff = saved["paired"]["aptp - static"]["all"]["mean"]
    assert diff == pytest.approx(np.mean(saved["rows"]["aptp"]["per_prompt_alignment"]) - np.mean(saved["rows"]["static"]["per_prompt_alignment"]))
    assert "Paired alignment differences" in table and "Alignment per prompt family" in table
    # What the quality-aware assignment would see in this row's codes (issue 13's diagnostic).
    from aptp.benchmarks.quality.sensitivity import code_sensitivity

    report = code_sensitivity(tmp_path / "q" / "rows" / "aptp", num_prompts=6, timesteps=(300, 800), batch_size=4)
    assert report["code_macs_ratio"] == pytest.approx(saved["rows"]["aptp"]["routing"]["code_macs_ratio"], abs=1e-4)
    assert sum(f["gap"]["n"] for f in report["families"].values()) == 6 == report["all_gap"]["n"]
    for family in report["families"].values():
        assert len(family["relative_log_error_per_code"]) == 2 and len(family["gap_per_timestep"]) == 2
        assert np.isfinite(family["gap"]["mean"]) and 0 < family["routed_macs"] <= 1
    # A second run with --reuse trains nothing, gives the same routing, and keeps the rows it
    # was not asked to score (same evaluation settings) in the table.
    args.reuse, args.rows = True, ["aptp"]
    again = run_quality(args)
    assert again["rows"]["aptp"]["routing"] == saved["rows"]["aptp"]["routing"]
    assert list(again["rows"]) == ["dense", "aptp", "static"]
    assert again["rows"]["static"] == saved["rows"]["static"]
    # Other evaluation settings: nothing is kept.
    args.num_samples = 3
    assert list(run_quality(args)["rows"]) == ["aptp"]
    # The equal-total-fine-tuning row prunes as static does: it copies static's pruning (not its
    # fine-tuned expert) and fine-tunes num_codes times longer.
    args.train_only, args.rows = True, ["static_long"]
    record = run_quality(args)["rows"]["static_long"]
    static_dir, long_dir = tmp_path / "q" / "rows" / "static", tmp_path / "q" / "rows" / "static_long"
    assert record["pruning_from"] == "static" and record["finetuned"] == [0]
    assert (long_dir / "codes.safetensors").read_bytes() == (static_dir / "codes.safetensors").read_bytes()
    from aptp.train.config import load_config

    assert load_config(str(long_dir / "config.yaml")).finetune.max_steps == 2 * 1
    assert len((long_dir / "finetune" / "expert_0" / "log.jsonl").read_text().splitlines()) == 2
    assert (long_dir / "experts" / "expert_0").is_dir()


def _fake_run(seed: int, aptp: list[float], static: list[float], family_macs: dict[str, float], **settings) -> dict:
    """A quality.json as `run_quality` writes it, reduced to what the seed summary reads."""
    def row(title, scores, codes, macs, fam):
        return {"title": title, "per_prompt_alignment": scores, "fid_like": 50.0 + seed, "cmmd": 1.0,
                "routing": {"macs_ratio": macs, "code_macs_ratio": codes,
                            "family_macs": {f: {"mean": m} for f, m in fam.items()}}}
    return {"settings": {"train_seed": seed, "num_samples": len(aptp), "prompt_seed": 1, **settings},
            "rows": {"aptp": row("APTP (K=2)", aptp, [0.4, 0.8], 0.6, family_macs),
                     "static": row("static", static, [0.6], 0.6, {f: 0.6 for f in family_macs})}}


def test_over_seeds_summary_by_hand(tmp_path):
    from aptp.benchmarks.quality.seeds import load_runs, seed_summary, seeds_markdown
    from aptp.errors import ConfigError

    families = ["hard", "easy", "hard", "easy"]
    macs = {"easy": 0.5, "hard": 0.7, "all": 0.6}
    runs = [_fake_run(1, [1.0, 0.5, 1.0, 0.5], [0.5, 0.5, 0.5, 0.5], macs),
            _fake_run(0, [1.0, 0.5, 0.75, 0.25], [0.5, 0.5, 0.5, 0.5], dict(macs, hard=0.55))]
    paths = []
    for run in runs:
        paths.append(tmp_path / f"seed{run['settings']['train_seed']}.json")
        paths[-1].write_text(json.dumps(run))
    loaded = load_runs(paths, ["num_samples", "prompt_seed"])
    assert [r["settings"]["train_seed"] for r in loaded] == [0, 1]  # sorted by seed
    summary = seed_summary(loaded, families, [("aptp", "static"), ("aptp", "dense")], ["dense", "aptp", "static"])
    assert list(summary["rows"]) == ["aptp", "static"] and list(summary["pairs"]) == ["aptp - static"]
    assert summary["families"] == {"easy": 2, "hard": 2}
    hard = summary["pairs"]["aptp - static"]["hard"]
    assert [s["mean"] for s in hard["per_seed"]] == pytest.approx([0.375, 0.5])
    assert hard["pooled"]["mean"] == pytest.approx(0.4375) and hard["seed_sd"] == pytest.approx(np.std([0.375, 0.5], ddof=1))
    assert hard["seeds_above_zero"] == 2 and hard["seeds_below_zero"] == 0  # every resample of +0.25/+0.5 is positive
    easy = summary["pairs"]["aptp - static"]["easy"]
    assert [s["mean"] for s in easy["per_seed"]] == pytest.approx([-0.125, 0.0]) and easy["seeds_above_zero"] == 0
    aptp = summary["rows"]["aptp"]
    assert aptp["fid_like"]["per_seed"] == [50.0, 51.0] and aptp["alignment"]["all"]["mean"] == pytest.approx((0.625 + 0.75) / 2)
    assert aptp["routed_macs_minus_mean"]["hard"]["per_seed"] == pytest.approx([-0.05, 0.1])
    assert "routed_macs_minus_mean" not in summary["rows"]["static"]
    loaded[0]["rows"]["aptp"]["family_alignment"] = {"easy": {"n": 3}, "hard": {"n": 1}, "all": {"n": 4}}
    with pytest.raises(ConfigError, match="regenerated"):
        seed_summary(loaded, families, [("aptp", "static")], ["aptp", "static"])
    table = seeds_markdown(summary)
    assert "| APTP (K=2) | hard | 0.550 (-0.050) | 0.700 (+0.100) | 1 of 2 |" in table
    # Refused: one run, the same seed twice, other settings, a file that is not a quality result.
    with pytest.raises(ConfigError, match="at least 2"):
        load_runs(paths[:1], ["num_samples"])
    with pytest.raises(ConfigError, match="repeat"):
        load_runs([paths[0], paths[0]], ["num_samples"])
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_fake_run(2, [1.0] * 4, [1.0] * 4, macs, steps=10)))
    with pytest.raises(ConfigError, match="differ in steps"):
        load_runs([paths[0], other], ["num_samples", "steps"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not an aptp-bench quality result"):
        load_runs([paths[0], tmp_path / "bad.json"], ["num_samples"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_runs([paths[0], tmp_path / "missing"], ["num_samples"])


def test_over_seeds_cli_writes_the_summary_and_refuses_bad_input(tmp_path, capsys):
    from aptp.benchmarks.quality.table import main_quality

    macs = {"easy": 0.5, "medium": 0.6, "hard": 0.7, "all": 0.6}
    for seed in (0, 1):
        run = _fake_run(seed, [1.0, 0.5], [0.5, 0.5], macs, **{k: None for k in ("pretrained", "noise_seed")})
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "quality.json").write_text(json.dumps(run))
    # The held-out prompts are regenerated from the settings (2 prompts, seed 1) for their families.
    assert main_quality(["--over-seeds", str(tmp_path / "s0"), str(tmp_path / "s1"), "--output-dir", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "seeds.json").read_text())
    assert summary["train_seeds"] == [0, 1] and sum(summary["families"].values()) == 2
    assert "Paired alignment differences" in (tmp_path / "out" / "seeds.md").read_text()
    assert main_quality(["--over-seeds", str(tmp_path / "s0"), "--output-dir", str(tmp_path / "out2")]) == 2
    assert "at least 2" in capsys.readouterr().err and not (tmp_path / "out2").exists()
