"""Every sampler, PNDM (PLMS) included, end to end against diffusers with epsilon and v-prediction.

The runtime against diffusers' StableDiffusionPipeline with the SAME expert UNet, prompts and
initial noise: final latents within `ATOL` and decoded pixels within 1/255. Epsilon: the shared
tiny export. v-prediction: a two-expert export of the tiny v-prediction teacher
(``train/assets/tiny-sd-zero-snr``), whose manifest's stored table and sampler section are
rebuilt by the exporter's own functions from the teacher's scheduler config without zero-SNR
rescaling (diffusers' PNDM has none); the stored table is PNDM at 25 steps, as the authors'
SD 2.1 experts generate. (An epsilon UNet read as v-prediction is no substitute: with guidance
7.5 its float32 sampling amplifies rounding ~250x, and PNDM's 25-step latents then differ from
diffusers by 1.3e-3 although the same loop in float64 agrees to 3.5e-6.)

Run with ``-s`` to see the parity figures (``PARITY ...`` lines).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aptp.runtime import AptpPipeline
from aptp.runtime import denoise as denoise_module
from runtime_fixtures import FOOD_PROMPTS, VEHICLE_PROMPTS
# The tiny export and its pipeline and torch components are test_runtime's fixtures (one export per session).
from test_runtime import (  # noqa: F401
    ATOL,
    _HostBackedCudaEngine,
    _HostBackedDeviceTensor,
    components,
    diffusers_run,
    export_dir,
    expert_unet,
    pipe,
    use_host_backed_gpu_loop,
)

# Steps per sampler: PNDM at the authors' 25 and at 4 (second- and third-order start only).
CASES = [("ddim", 10), ("euler", 10), ("dpmpp_2m", 10), ("pndm", 25), ("pndm", 4)]
GUIDANCE = 7.5


TEACHER = Path(__file__).resolve().parents[1] / "train" / "assets" / "tiny-sd-zero-snr"


@pytest.fixture(scope="module")
def vpred_export(tmp_path_factory) -> Path:
    """A two-expert export of the tiny v-prediction teacher, its samplers rebuilt from the
    teacher's scheduler config without zero-SNR rescaling (diffusers' PNDM has none)."""
    pytest.importorskip("torch", reason="the v-prediction export is built by the exporter (torch, diffusers)")
    from aptp.export import ExportOptions, export_checkpoint
    from aptp.export.scheduler_tables import build_scheduler_table, sampler_specs

    from export_fixtures import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("vpred")
    checkpoint = build_tiny_checkpoint(root / "checkpoint", TEACHER)
    export = root / "export"
    export_checkpoint(checkpoint, export, ExportOptions(steps=25, max_batch=2, scheduler="euler"))
    manifest = json.loads((export / "manifest.json").read_text())
    config = {**json.loads((TEACHER / "scheduler" / "scheduler_config.json").read_text()),
              "rescale_betas_zero_snr": False}
    assert config["prediction_type"] == "v_prediction"
    manifest["scheduler"] = build_scheduler_table("pndm", config, 25)
    manifest["samplers"] = sampler_specs(config)
    (export / "manifest.json").write_text(json.dumps(manifest))
    return export


@pytest.fixture(scope="module")
def vpred_pipe(vpred_export) -> AptpPipeline:
    return AptpPipeline.from_export(vpred_export, threads=1)


@pytest.fixture(scope="module")
def vpred_components(vpred_export):
    from aptp.train.models import load_components

    return load_components(str(TEACHER))


@pytest.mark.parametrize("sampler, steps", CASES, ids=[f"{s}-{n}" for s, n in CASES])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_latents_and_pixels_match_diffusers(request, prediction, sampler, steps):
    if prediction == "epsilon":
        runtime, components, export = (request.getfixturevalue(n) for n in ("pipe", "components", "export_dir"))
    else:
        runtime, components, export = (request.getfixturevalue(n) for n in ("vpred_pipe", "vpred_components",
                                                                             "vpred_export"))
    table = runtime.table(runtime.options(scheduler=sampler, steps=steps))
    assert (table.name, table.num_steps, table.prediction_type) == (sampler, steps, prediction)
    prompts, seeds = [VEHICLE_PROMPTS[0], FOOD_PROMPTS[0]], [81, 82]
    results = runtime(prompts, seeds=seeds, scheduler=sampler, steps=steps, guidance_scale=GUIDANCE)
    latent_error = pixel_error = 0.0
    for result, prompt, seed in zip(results, prompts, seeds):
        unet = expert_unet(export, result.expert)
        want = diffusers_run(components, unet, table, [prompt], [seed], GUIDANCE)[0]
        latent_error = max(latent_error, float(np.abs(result.latents - want).max()))
        assert np.abs(want).max() > 1.0  # a real signal, not two zero tensors
        pixels = diffusers_run(components, unet, table, [prompt], [seed], GUIDANCE, output_type="np")[0]
        got = result.image.astype(np.int16)
        pixel_error = max(pixel_error, float(np.abs(got - np.round(pixels * 255)).max()))
        assert got.std() > 1.0
    print(f"\nPARITY {prediction} {sampler} {steps} steps ({table.num_calls} UNet calls): final latents "
          f"max|diff| {latent_error:.2e}, pixels max|diff| {pixel_error:.0f}/255")
    assert latent_error < ATOL, (prediction, sampler, steps, latent_error)
    assert pixel_error <= 1, (prediction, sampler, steps, pixel_error)


def test_pndm_makes_one_more_unet_call_than_steps(vpred_pipe, monkeypatch):
    """diffusers' PLMS repeats its second timestep: 25 steps are 26 UNet calls."""
    unet = vpred_pipe.unet(0)
    calls = []
    real_infer = unet.infer
    monkeypatch.setattr(unet, "infer", lambda feed, *a: calls.append(float(feed["timestep"][0])) or real_infer(feed, *a))
    vpred_pipe([VEHICLE_PROMPTS[1]], seeds=[5], expert=0, output_type="latent")  # the stored 25-step PNDM
    assert len(calls) == 26 and calls[1] == calls[2] and calls == vpred_pipe.scheduler.timesteps.tolist()


class _NaNDeviceTensor(_HostBackedDeviceTensor):
    """Host-backed device memory that starts as NaN, as uninitialised GPU memory may."""

    def __init__(self, shape, dtype, device_id=0):
        super().__init__(shape, dtype, device_id)
        self.array[...] = np.nan


def test_on_device_loop_keeps_the_plms_history(vpred_pipe, monkeypatch):
    """The GPU loop's PLMS history buffers (moved with the fused step kernel alone), run on host
    memory with the numpy twins for the CUDA kernels: it must equal the host loop."""
    use_host_backed_gpu_loop(monkeypatch, _NaNDeviceTensor)
    unet = vpred_pipe.unet(1)
    fake = _HostBackedCudaEngine(unet)
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    text = rng.standard_normal((4, 32, 64), dtype=np.float32)
    for steps in (1, 2, 4, 9):
        table = vpred_pipe.table(vpred_pipe.options(scheduler="pndm", steps=steps))
        got = denoise_module.denoise_on_device(fake, latents, text, table, GUIDANCE)
        want = denoise_module.denoise(unet, latents, text, table, GUIDANCE)
        assert np.all(np.isfinite(got)), steps
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert np.abs(want - latents).max() > 0.1
