"""Per-request generation options on the tiny export: sampler and step count, negative prompts,
PNG parameters, contact sheets, and a mixed GenerationServer load.

The references are diffusers' StableDiffusionPipeline on the same UNets from the same initial
noise (`test_runtime.diffusers_run`); the export (`runtime_fixtures.tiny_export`) was made with
a 4-step DDIM table, so every other sampler and step count here is built by the runtime.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from aptp.errors import RuntimeInputError
from aptp.runtime import AptpPipeline, GenerationServer, read_png_parameters
from aptp.runtime.cli import main as cli_main
from runtime_fixtures import FOOD_PROMPTS, STEPS, VEHICLE_PROMPTS, shallow_copy
# The tiny export and its pipeline and torch components are test_runtime's fixtures (one export per session).
from test_runtime import ATOL, components, diffusers_run, export_dir, expert_unet, pipe  # noqa: F401


# ---- sampler and step count per request -------------------------------------------------------


@pytest.mark.parametrize("sampler, steps", [("ddim", 7), ("euler", 7), ("dpmpp_2m", 1),
                                            ("dpmpp_2m", 7)])
def test_any_sampler_and_step_count_match_diffusers(pipe, components, export_dir, sampler, steps):
    prompts, seeds = [VEHICLE_PROMPTS[0], FOOD_PROMPTS[0]], [61, 62]
    results = pipe(prompts, seeds=seeds, scheduler=sampler, steps=steps, output_type="latent")
    assert [r.expert for r in results] == [0, 1]
    for result, prompt, seed in zip(results, prompts, seeds):
        assert (result.scheduler, result.num_inference_steps) == (sampler, steps)
        table = pipe.table(pipe.options(scheduler=sampler, steps=steps))
        want = diffusers_run(components, expert_unet(export_dir, result.expert), table, [prompt], [seed])
        error = np.abs(result.latents - want[0]).max()
        assert error < ATOL, (sampler, steps, error)
        assert np.abs(want).max() > 1.0


def test_default_request_uses_the_stored_table(pipe):
    assert pipe.table(pipe.options()) is pipe.scheduler
    assert pipe.options().scheduler == "ddim" and pipe.options().num_inference_steps == STEPS
    assert pipe.options(steps=12).scheduler == "ddim"
    a = pipe([VEHICLE_PROMPTS[1]], seeds=[3], output_type="latent")[0]
    b = pipe([VEHICLE_PROMPTS[1]], seeds=[3], scheduler="DDIM", num_inference_steps=STEPS, output_type="latent")[0]
    np.testing.assert_array_equal(a.latents, b.latents)
    c = pipe([VEHICLE_PROMPTS[1]], seeds=[3], scheduler="euler", output_type="latent")[0]
    assert c.num_inference_steps == STEPS and np.abs(c.latents - a.latents).max() > 1e-2


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=151), "num_inference_steps must be between 1 and 150, got 151"),
    (dict(steps=0), "positive integer"),
    (dict(steps=3, num_inference_steps=4), "disagree"),
    (dict(scheduler="heun"), "unknown sampler 'heun'; this export runs: ddim, dpmpp_2m, euler, pndm"),
    (dict(scheduler=5), "sampler name"),
    (dict(negative_prompt=["a", "b"]), "one per prompt"),
    (dict(negative_prompt=[3]), r"negative_prompt\[0\] must be a string"),
])
def test_bad_options_are_one_clear_error(pipe, kwargs, message):
    with pytest.raises(RuntimeInputError, match=message) as info:
        pipe([FOOD_PROMPTS[0]], **kwargs)
    assert "\n" not in str(info.value)


def test_export_without_samplers_section_still_loads(export_dir, tmp_path):
    copy = shallow_copy(export_dir, tmp_path / "old")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["samplers"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    old = AptpPipeline.from_export(copy, threads=1)
    assert old.options().num_inference_steps == STEPS
    with pytest.raises(RuntimeInputError, match=f"stores only its {STEPS}-step ddim table"):
        old.options(steps=STEPS + 1)


# ---- negative prompts -------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_negative_prompt_matches_diffusers(pipe, components, export_dir, sampler):
    prompts, seeds = [VEHICLE_PROMPTS[2], FOOD_PROMPTS[1]], [71, 72]
    negatives = [FOOD_PROMPTS[2], "blurry, low quality"]
    results = pipe(prompts, seeds=seeds, scheduler=sampler, negative_prompt=negatives, output_type="latent")
    plain = pipe(prompts, seeds=seeds, scheduler=sampler, output_type="latent")
    # The router reads the positive prompt only: a food negative prompt keeps the vehicle expert.
    assert [r.expert for r in results] == [r.expert for r in plain] == [0, 1]
    table = pipe.table(pipe.options(scheduler=sampler))
    for result, other, prompt, negative, seed in zip(results, plain, prompts, negatives, seeds):
        assert result.negative_prompt == negative
        want = diffusers_run(components, expert_unet(export_dir, result.expert), table, [prompt], [seed],
                             negative_prompt=[negative])
        assert np.abs(result.latents - want[0]).max() < ATOL
        assert np.abs(result.latents - other.latents).max() > 1e-2  # the negative prompt changed the image


def test_empty_negative_prompt_is_the_unconditional_prompt(pipe):
    prompts = [FOOD_PROMPTS[0], VEHICLE_PROMPTS[0]]
    plain = pipe(prompts, seeds=[5, 6], output_type="latent")
    mixed = pipe(prompts, seeds=[5, 6], negative_prompt=["", "rain"], output_type="latent")
    np.testing.assert_allclose(mixed[0].latents, plain[0].latents, rtol=0, atol=1e-5)
    assert mixed[0].negative_prompt is None and mixed[1].negative_prompt == "rain"
    assert np.abs(mixed[1].latents - plain[1].latents).max() > 1e-2


# ---- a mixed server load ----------------------------------------------------------------------


def test_mixed_server_load_equals_solo_runs(pipe):
    """Concurrent requests with different samplers, step counts and negative prompts: batches
    never mix (sampler, steps), and every result equals the same request run alone."""
    settings = [("ddim", STEPS), ("euler", 3), ("dpmpp_2m", 5), ("ddim", 6)]
    prompts = [*VEHICLE_PROMPTS, *FOOD_PROMPTS]
    requests = [(prompts[i % len(prompts)], 900 + i, *settings[i % len(settings)],
                 "blurry" if i % 3 == 0 else None) for i in range(16)]
    batches = []
    real_generate = pipe.generate

    class Spy:
        def __getattr__(self, name):
            return getattr(pipe, name)

        def generate(self, prompts, seeds, options, codes=None, **kwargs):
            batches.append((len(prompts), options.scheduler, options.num_inference_steps))
            return real_generate(prompts, seeds, options, codes, **kwargs)

    server = GenerationServer(Spy(), max_batch=4, max_wait=0.05, max_queue=64)
    try:
        def client(half: int):
            mine = requests[half::2]
            futures = [server.submit(p, seed=s, scheduler=name, steps=n, negative_prompt=neg, output_type="latent")
                       for p, s, name, n, neg in mine]
            return [(request, future.result(timeout=300)) for request, future in zip(mine, futures)]

        with ThreadPoolExecutor(2) as pool:
            served = [item for chunk in pool.map(client, range(2)) for item in chunk]
    finally:
        server.close()
    assert len(served) == len(requests)
    for (prompt, seed, name, steps, negative), result in served:
        alone = pipe([prompt], seeds=[seed], scheduler=name, steps=steps, negative_prompt=negative,
                     output_type="latent")[0]
        assert (result.scheduler, result.num_inference_steps, result.negative_prompt) == (name, steps, negative)
        assert result.expert == alone.expert
        np.testing.assert_allclose(result.latents, alone.latents, rtol=0, atol=1e-5)
    assert sum(size for size, _, _ in batches) == len(requests)
    assert max(size for size, _, _ in batches) > 1  # batching happened despite the mixed settings
    assert {(name, steps) for _, name, steps in batches} == set(settings)


# ---- images that remember -----------------------------------------------------------------------


def test_saved_png_carries_its_parameters(pipe, tmp_path):
    from PIL import Image

    result = pipe([FOOD_PROMPTS[2]], seeds=[17], scheduler="dpmpp_2m", steps=3, guidance_scale=5.0,
                  negative_prompt="burnt, café")[0]
    path = result.save(tmp_path / "soup.png")
    params = read_png_parameters(path)
    assert params == result.parameters()
    assert {k: params[k] for k in ("prompt", "negative_prompt", "seed", "steps", "sampler", "guidance_scale",
                                   "width", "height", "expert")} == {
        "prompt": FOOD_PROMPTS[2], "negative_prompt": "burnt, café", "seed": "17", "steps": "3",
        "sampler": "dpmpp_2m", "guidance_scale": "5.0", "width": "64", "height": "64", "expert": "1"}
    assert params["manifest_sha256"] == pipe.manifest_sha256 and len(pipe.manifest_sha256) == 64
    with Image.open(path) as image:  # the documented Pillow-only way
        assert image.text["sampler"] == "dpmpp_2m" and np.array_equal(np.asarray(image), result.image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup.png"]  # no temporary file left behind
    latent = pipe([FOOD_PROMPTS[2]], seeds=[17], output_type="latent")[0]
    with pytest.raises(RuntimeInputError, match="no image"):
        latent.save(tmp_path / "x.png")


def test_cli_options_grid_and_show_params(export_dir, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "img.png"
    argv = ["--artifacts", str(export_dir), "--prompt", VEHICLE_PROMPTS[0], "--prompt", FOOD_PROMPTS[0],
            "--output", str(out), "--threads", "1", "--no-verify", "--seed", "4", "--scheduler", "euler",
            "--steps", "3", "--negative-prompt", "blurry", "--grid"]
    assert cli_main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img_0.png", "img_1.png", "img_grid.png"]
    with Image.open(tmp_path / "img_grid.png") as grid:
        assert grid.size == (64 * 2 + 2, 64)
        assert grid.text["prompts"] == f"{VEHICLE_PROMPTS[0]}\n{FOOD_PROMPTS[0]}" and grid.text["sampler"] == "euler"
        assert grid.text["seeds"] == "4 5" and grid.text["experts"] == "0 1"
    with Image.open(tmp_path / "img_1.png") as image:
        single = np.asarray(image)
    with Image.open(tmp_path / "img_grid.png") as grid:
        np.testing.assert_array_equal(np.asarray(grid)[:, 66:], single)
    capsys.readouterr()
    assert cli_main(["--show-params", str(tmp_path / "img_1.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:6] == [f"prompt: {FOOD_PROMPTS[0]}", "negative_prompt: blurry", "seed: 5", "steps: 3",
                         "sampler: euler", "guidance_scale: 7.5"]
    assert any(line.startswith("manifest_sha256: ") for line in lines)


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "k_lms"], "unknown sampler 'k_lms'"),
    (["--steps", "151"], "between 1 and 150"),
    (["--show-params", "missing.png"], "cannot read missing.png"),
    (["--show-params", "notes.txt"], "not an image"),
    (["--show-params", "plain.png"], "carries no generation parameters"),
])
def test_cli_bad_options_are_one_error_line(export_dir, tmp_path, capsys, monkeypatch, args, message):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a png")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    argv = ["--artifacts", str(export_dir), "--prompt", "a cat", "--output", str(tmp_path / "x.png"),
            "--no-verify", *args]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aptp-generate: error:") and message in err[0], err
    assert not (tmp_path / "x.png").exists()
