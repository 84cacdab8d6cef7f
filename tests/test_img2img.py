"""img2img and inpainting through the routed experts, against diffusers on the tiny export.

The runtime against diffusers' ``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline``
(its blending path for a 4-channel, text-to-image UNet) with the SAME expert UNet, prompt, init
image, mask and random draws: diffusers' ``randn_tensor`` is replaced by the runtime's draws
for the request's seed (``eps_vae`` for the VAE posterior sample, then ``eps``). Every sampler
at several strengths; final latents within `ATOL` and pixels within 1/255, as the
text-to-image parity tests (`test_sampler_parity`).

Run with ``-s`` to see the parity figures (``PARITY ...`` lines).
"""

from __future__ import annotations

import numpy as np
import pytest

from aptp.errors import RuntimeInputError
from aptp.runtime import img2img
from runtime_fixtures import FOOD_PROMPTS, VEHICLE_PROMPTS
# The tiny export and its pipeline and torch components are test_runtime's fixtures (one export per session).
from test_runtime import ATOL, components, export_dir, expert_unet, pipe  # noqa: F401

SAMPLERS = [("ddim", 10), ("euler", 10), ("dpmpp_2m", 10), ("pndm", 10)]
# t_start 7, 5, 1 (PLMS's repeated timestep falls on the second kept call) and 0 (nothing cut).
STRENGTHS = (0.3, 0.5, 0.9, 1.0)
GUIDANCE = 7.5
SIZE = 64


def init_picture(size: int = SIZE) -> np.ndarray:
    """A deterministic RGB picture: colour gradients, a disc and a bar."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    image = np.stack([x, y, 1 - x * y], axis=2) * 200 + 20
    disc = (x - 0.35) ** 2 + (y - 0.6) ** 2 < 0.05
    image[disc] = (240, 60, 40)
    image[int(size * 0.15):int(size * 0.25), int(size * 0.2):int(size * 0.85)] = (30, 30, 160)
    return np.round(image).astype(np.uint8)


def centre_mask(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4: 3 * size // 4, size // 3: size - size // 8] = 255
    return mask


@pytest.fixture()
def replayed_noise(monkeypatch):
    """Make diffusers draw the runtime's noise: ``arm(seed)`` queues ``eps_vae`` then ``eps``."""
    import torch
    from diffusers.models.autoencoders import vae as vae_module
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module

    queue: list[np.ndarray] = []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        # The inpaint pipeline also encodes the masked image (unused by a 4-channel UNet): zeros.
        value = queue.pop(0) if queue else np.zeros(tuple(shape), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(value).reshape(tuple(shape))).to(dtype or torch.float32)

    for module in (vae_module, img2img_module, inpaint_module):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)

    def arm(seed: int) -> None:
        eps, eps_vae = img2img.request_noise(seed, (4, SIZE // 4, SIZE // 4))
        queue[:] = [eps_vae[None], eps[None]]

    return arm


def diffusers_edit(components, unet, spec_config, sampler, steps, prompt, image, strength, mask=None,
                   output_type="latent"):
    """diffusers' img2img (or, with `mask`, inpaint) pipeline on `unet`, one prompt."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from PIL import Image

    from aptp.export.scheduler_tables import make_scheduler

    cls = StableDiffusionInpaintPipeline if mask is not None else StableDiffusionImg2ImgPipeline
    sd = cls(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=unet,
             scheduler=make_scheduler(sampler, spec_config), safety_checker=None, feature_extractor=None,
             requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    extra = {} if mask is None else {"mask_image": Image.fromarray(mask, "L"), "height": SIZE, "width": SIZE}
    with torch.no_grad():
        out = sd(prompt, image=Image.fromarray(image), strength=strength, num_inference_steps=steps,
                 guidance_scale=GUIDANCE, output_type=output_type, **extra)
    images = out.images
    return (images.numpy() if hasattr(images, "numpy") else np.asarray(images))[0]


def _parity(pipe, components, export_dir, replayed_noise, sampler, steps, strength, mask=None):
    """Max |diff| of final latents and of pixels (0-255) over two prompts on two experts."""
    image = init_picture()
    prompts, seeds = [VEHICLE_PROMPTS[0], FOOD_PROMPTS[0]], [81, 82]
    # keep_unmasked=False: diffusers' pipeline does not composite the init pixels back.
    results = pipe(prompts, seeds=seeds, scheduler=sampler, steps=steps, guidance_scale=GUIDANCE,
                   init_image=image, strength=strength, mask_image=mask, keep_unmasked=False)
    config = pipe.samplers.specs[sampler]["config"]
    latent_error = pixel_error = 0.0
    for result, prompt, seed in zip(results, prompts, seeds):
        unet = expert_unet(export_dir, result.expert)
        replayed_noise(seed)
        want = diffusers_edit(components, unet, config, sampler, steps, prompt, image, strength, mask)
        assert np.abs(want).max() > 0.5  # a real signal, not two zero tensors
        latent_error = max(latent_error, float(np.abs(result.latents - want).max()))
        replayed_noise(seed)
        pixels = diffusers_edit(components, unet, config, sampler, steps, prompt, image, strength, mask, "np")
        got = result.image.astype(np.int16)
        pixel_error = max(pixel_error, float(np.abs(got - np.round(pixels * 255)).max()))
        assert got.std() > 1.0
    assert {r.expert for r in results} == {0, 1}  # both experts ran
    return results, latent_error, pixel_error


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("sampler, steps", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_img2img_matches_diffusers(pipe, components, export_dir, replayed_noise, sampler, steps, strength):
    results, latent_error, pixel_error = _parity(pipe, components, export_dir, replayed_noise, sampler, steps,
                                                 strength)
    start = img2img.t_start(steps, strength)
    calls = steps - start + (sampler == "pndm")
    print(f"\nPARITY img2img {sampler} {steps} steps strength {strength} (t_start {start}, {calls} UNet calls): "
          f"final latents max|diff| {latent_error:.2e}, pixels max|diff| {pixel_error:.0f}/255")
    assert results[0].strength == strength and results[0].num_inference_steps == steps
    assert latent_error < ATOL, (sampler, strength, latent_error)
    assert pixel_error <= 1, (sampler, strength, pixel_error)


@pytest.mark.parametrize("strength", (0.5, 1.0))
@pytest.mark.parametrize("sampler, steps", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_inpainting_matches_diffusers(pipe, components, export_dir, replayed_noise, sampler, steps, strength):
    mask = centre_mask()
    results, latent_error, pixel_error = _parity(pipe, components, export_dir, replayed_noise, sampler, steps,
                                                 strength, mask)
    print(f"\nPARITY inpaint {sampler} {steps} steps strength {strength}: final latents max|diff| "
          f"{latent_error:.2e}, pixels max|diff| {pixel_error:.0f}/255")
    assert latent_error < ATOL, (sampler, strength, latent_error)
    assert pixel_error <= 1, (sampler, strength, pixel_error)


def test_unmasked_region_keeps_the_init_latents_and_pixels(pipe):
    """Inpainting leaves the known region at the init image's latents exactly (the encoder's
    posterior sample of the same seed) and, by default, at the init image's own pixels; without
    the composite (diffusers' output) the kept pixels move with the decoder."""
    image, mask = init_picture(), centre_mask()
    request = dict(seeds=[7], init_image=image, mask_image=mask, strength=0.9, steps=6)
    result = pipe([FOOD_PROMPTS[1]], **request)[0]
    _, eps_vae = img2img.request_noise(7, (4, 16, 16))
    moments = pipe._vae_encoder().infer({"sample": (image.astype(np.float32) / 255 * 2 - 1).transpose(2, 0, 1)[None]})
    known = moments["latent_mean"][0] + moments["latent_std"][0] * eps_vae
    keep = centre_mask()[::4, ::4] == 0
    assert np.array_equal(result.latents[:, keep], known[:, keep])
    assert np.abs(result.latents[:, ~keep] - known[:, ~keep]).max() > 0.1  # the masked part was repainted
    assert np.array_equal(result.image[mask == 0], image[mask == 0])  # kept pixels are the input's
    assert np.abs(result.image[mask > 0].astype(int) - image[mask > 0]).mean() > 2  # the rest was repainted
    raw = pipe([FOOD_PROMPTS[1]], **request, keep_unmasked=False)[0]
    np.testing.assert_array_equal(raw.latents, result.latents)
    decoded = pipe._engines["vae_decoder"].infer({"latent_sample": known[None]})["sample"]
    round_trip = np.round(np.clip(decoded[0] / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255)
    diff = np.abs(raw.image.astype(np.int16) - round_trip).mean(axis=2)
    kept, repainted = float(diff[mask == 0].mean()), float(diff[mask > 0].mean())
    # The decoder's mid-block attention lets every latent reach every pixel, so without the
    # composite kept pixels move with the repainted latents (docs/img2img.md).
    print(f"\nPARITY inpaint pixels without the composite vs the VAE round trip: mean|diff| kept {kept:.2f}/255, "
          f"repainted {repainted:.2f}/255")
    assert kept < 0.6 * repainted


def test_old_export_without_encoder_runs_text_to_image_and_refuses_img2img(export_dir, tmp_path):
    import json
    import shutil

    from aptp.runtime import AptpPipeline
    from runtime_fixtures import shallow_copy

    old = shallow_copy(export_dir, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["vae_encoder"], manifest["io"]["vae_encoder"]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("vae_encoder/")}
    (old / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(old / "vae_encoder")
    pipe = AptpPipeline.from_export(old, threads=1)
    assert pipe.artifacts.vae_encoder is None
    assert pipe([VEHICLE_PROMPTS[0]], seeds=[1], steps=2)[0].image.shape == (SIZE, SIZE, 3)
    with pytest.raises(RuntimeInputError, match="no VAE encoder .*re-export") as err:
        pipe([VEHICLE_PROMPTS[0]], init_image=init_picture())
    assert "\n" not in str(err.value)


def _png(tmp_path, array, name, mode=None):
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(array, mode).save(path)
    return path


def test_bad_inputs_are_one_line_each(pipe, tmp_path):
    image = init_picture()
    rgba = np.dstack([image, np.full(image.shape[:2], 200, np.uint8)])
    garbage = tmp_path / "not.png"
    garbage.write_bytes(b"\x89PNG\r\n not really")
    cases = {
        "unreadable": (dict(init_image=garbage), "not an image PIL can read"),
        "missing": (dict(init_image=tmp_path / "nope.png"), "cannot read"),
        "directory": (dict(init_image=tmp_path), "directory"),
        "strength 0": (dict(init_image=image, strength=0), r"strength must be a number in \(0, 1\]"),
        "strength 1.5": (dict(init_image=image, strength=1.5), r"strength must be a number in \(0, 1\]"),
        "strength nan": (dict(init_image=image, strength=float("nan")), "strength must be"),
        "keeps no step": (dict(init_image=image, strength=0.05, steps=4), "keeps no step"),
        "transparent": (dict(init_image=rgba), "transparent pixels"),
        "float image": (dict(init_image=image.astype(np.float32)), "uint8"),
        "mask size": (dict(init_image=image, mask_image=np.zeros((32, 64), np.uint8)), "mask_image is 64x32"),
        "mask alone": (dict(mask_image=centre_mask()), "needs an init_image"),
        "strength alone": (dict(strength=0.5), "apply to an init_image"),
        "blur": (dict(init_image=image, mask_image=centre_mask(), mask_blur=-1), "mask_blur"),
        "odd size": (dict(init_image=np.zeros((70, 64, 3), np.uint8)), "height 70 is not a multiple"),
        "list length": (dict(init_image=[image, image, image]), "list of 3"),
    }
    for name, (kwargs, message) in cases.items():
        with pytest.raises(RuntimeInputError, match=message) as err:
            pipe([VEHICLE_PROMPTS[0], FOOD_PROMPTS[0]], seeds=[1, 2], **kwargs)
        assert "\n" not in str(err.value), name


def test_grayscale_and_opaque_rgba_are_converted(pipe, tmp_path):
    """Grayscale repeats its channel and opaque RGBA drops alpha: the same image as the RGB."""
    gray = init_picture()[:, :, 0]
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    opaque = np.dstack([rgb, np.full(gray.shape, 255, np.uint8)])
    kwargs = dict(seeds=[3], steps=4, strength=0.5, output_type="latent")
    want = pipe([VEHICLE_PROMPTS[1]], init_image=rgb, **kwargs)[0].latents
    for source in (gray, opaque, _png(tmp_path, gray, "g.png", "L"), _png(tmp_path, opaque, "a.png", "RGBA")):
        got = pipe([VEHICLE_PROMPTS[1]], init_image=source, **kwargs)[0]
        np.testing.assert_array_equal(got.latents, want)
    # A file's hash is the hash of its bytes; an array's of its RGB pixels.
    import hashlib

    path = _png(tmp_path, rgb, "rgb.png")
    assert pipe([VEHICLE_PROMPTS[1]], init_image=path, **kwargs)[0].init_image.image.sha256 == \
        hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_request_gives_the_same_image_alone_or_batched(pipe):
    image, mask = init_picture(), centre_mask()
    kwargs = dict(steps=5, strength=0.7, scheduler="dpmpp_2m", output_type="latent")
    prompts = [VEHICLE_PROMPTS[0], VEHICLE_PROMPTS[1], FOOD_PROMPTS[2]]
    other = np.ascontiguousarray(image[::-1])
    batched = pipe(prompts, seeds=[4, 5, 6], init_image=[image, other, image], mask_image=[mask, None, mask],
                   **kwargs)
    for i, (prompt, seed, source, m) in enumerate(zip(prompts, [4, 5, 6], [image, other, image], [mask, None, mask])):
        alone = pipe([prompt], seeds=[seed], init_image=source, mask_image=m, **kwargs)[0]
        np.testing.assert_allclose(batched[i].latents, alone.latents, rtol=0, atol=1e-5)
    assert batched[1].init_image.mask is None and batched[0].init_image.mask is not None


# ---- surfaces: CLI, server, HTTP, PNG chunks ---------------------------------------------------


def test_cli_writes_img2img_and_inpainting_pngs_with_their_hashes(export_dir, tmp_path, capsys):
    import hashlib

    from aptp.runtime.cli import main
    from aptp.runtime.images import read_png_parameters

    init, mask = _png(tmp_path, init_picture(), "init.png"), _png(tmp_path, centre_mask(), "mask.png", "L")
    base = ["--artifacts", str(export_dir), "--prompt", FOOD_PROMPTS[0], "--threads", "1", "--seed", "3",
            "--steps", "4", "--init-image", str(init)]
    assert main([*base, "--strength", "0.5", "--output", str(tmp_path / "a.png")]) == 0
    assert main([*base, "--mask", str(mask), "--mask-blur", "2", "--output", str(tmp_path / "b.png")]) == 0
    a, b = read_png_parameters(tmp_path / "a.png"), read_png_parameters(tmp_path / "b.png")
    assert a["strength"] == "0.5" and a["init_image_sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()
    assert "mask_sha256" not in a and a["steps"] == "4"
    assert b["strength"] == "1.0" and b["mask_sha256"] == hashlib.sha256(mask.read_bytes()).hexdigest()
    assert b["mask_blur"] == "2.0"
    assert main(["--show-params", str(tmp_path / "b.png")]) == 0
    assert "mask_sha256: " in capsys.readouterr().out


def test_cli_bad_image_flags_are_one_line_and_write_nothing(export_dir, tmp_path, capsys):
    from aptp.runtime.cli import main

    init = _png(tmp_path, init_picture(), "init.png")
    small_mask = _png(tmp_path, np.zeros((32, 32), np.uint8), "small.png", "L")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"nope")
    out = tmp_path / "out" / "o.png"
    base = ["--artifacts", str(export_dir), "--prompt", FOOD_PROMPTS[0], "--threads", "1", "--output", str(out)]
    cases = [
        (["--init-image", str(garbage)], "not an image PIL can read"),
        (["--init-image", str(tmp_path / "missing.png")], "cannot read"),
        (["--init-image", str(init), "--strength", "0"], "strength must be"),
        (["--init-image", str(init), "--strength", "1.5"], "strength must be"),
        (["--init-image", str(init), "--strength", "half"], "--strength must be a number"),
        (["--init-image", str(init), "--mask", str(small_mask)], "mask_image is 32x32"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--init-image", str(init), "--mask-blur", "2"], "--mask-blur needs --mask"),
    ]
    for flags, message in cases:
        assert main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (flags, err)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_server_batches_img2img_requests_apart_from_text_to_image(pipe):
    from aptp.runtime.serving import GenerationServer

    image = init_picture()
    alone = pipe([VEHICLE_PROMPTS[0]], seeds=[11], init_image=image, strength=0.6, steps=4)[0]
    with GenerationServer(pipe, max_batch=4, max_wait=0.2) as server:
        futures = [server.submit(VEHICLE_PROMPTS[0], seed=11, init_image=image, strength=0.6, steps=4),
                   server.submit(VEHICLE_PROMPTS[1], seed=12, init_image=image, strength=0.6, steps=4),
                   server.submit(VEHICLE_PROMPTS[2], seed=13, steps=4)]
        results = [f.result(timeout=120) for f in futures]
        with pytest.raises(RuntimeInputError, match="strength must be"):
            server.submit(VEHICLE_PROMPTS[0], init_image=image, strength=2)
    assert [r.batch_size for r in results] == [2, 2, 1]  # the text-to-image request ran on its own
    np.testing.assert_allclose(results[0].latents, alone.latents, rtol=0, atol=1e-5)
    assert results[0].strength == 0.6 and results[2].strength is None and results[2].init_image is None


def test_http_native_and_a1111_img2img(export_dir):
    import base64
    import io

    httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install 'aptp[test]')")
    pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'aptp[serve]')")
    from PIL import Image

    from aptp.runtime.local_serve import LocalOptions, LocalServer
    from aptp.runtime.serve_http import encode_png

    init = base64.b64encode(encode_png(init_picture())).decode()
    mask = base64.b64encode(encode_png(np.dstack([centre_mask()] * 3))).decode()
    server = LocalServer.start(str(export_dir), options=LocalOptions(threads=1, max_wait=0.05), timeout=300)
    try:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            native = c.post("/?format=json", json={"prompt": FOOD_PROMPTS[0], "seed": 5, "steps": 4,
                                                   "init_image": init, "strength": 0.5})
            assert native.status_code == 200, native.text
            assert Image.open(io.BytesIO(base64.b64decode(native.json()["image_png_base64"]))).size == (SIZE, SIZE)
            body = {"prompt": FOOD_PROMPTS[0], "seed": 5, "steps": 4, "init_images": [f"data:image/png;base64,{init}"],
                    "denoising_strength": 0.5, "mask": mask, "mask_blur": 0, "batch_size": 2}
            a1111 = c.post("/sdapi/v1/img2img", json=body)
            assert a1111.status_code == 200, a1111.text
            assert len(a1111.json()["images"]) == 2 and a1111.json()["parameters"]["denoising_strength"] == 0.5
            bad = [({**body, "denoising_strength": 0}, "strength must be"),
                   ({**body, "init_images": ["!!"]}, "not valid base64"),
                   ({**body, "init_images": [init, init]}, "one base64 image"),
                   ({**body, "inpaint_full_res": True}, "inpaint_full_res"),
                   ({**body, "mask": base64.b64encode(encode_png(np.zeros((8, 8, 3), np.uint8))).decode()},
                    "mask_image is 8x8")]
            for request, message in bad:
                response = c.post("/sdapi/v1/img2img", json=request)
                assert response.status_code == 422 and message in response.json()["detail"], response.text
            refused = c.post("/", json={"prompt": FOOD_PROMPTS[0], "init_image": "!!"})
            assert refused.status_code == 400 and "not valid base64" in refused.json()["error"]
    finally:
        server.stop()
