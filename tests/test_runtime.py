"""aptp.runtime on a real tiny export: torch-free, diffusers parity, dispatch, kernels, bad input.

The export (two experts + dense, 4-step DDIM) is built once per session by
`runtime_fixtures.tiny_export`; its router splits vehicle prompts (code 0) from food prompts
(code 1). The references are diffusers' StableDiffusionPipeline on the sliced experts, on the
full UNet masked by a code, and on the dense UNet: torch is fine here, the runtime is what
must not import it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aptp.errors import ArtifactError, RuntimeInputError
from aptp.runtime import AptpPipeline, SchedulerTable, initial_noise, kernels, load_artifacts
from aptp.runtime import denoise as denoise_module
from aptp.runtime.cli import main as cli_main
from aptp.runtime.cli import read_prompts_file
from aptp.runtime.engine import OnnxRuntimeEngine
from runtime_fixtures import FOOD_PROMPTS, STEPS, VEHICLE_PROMPTS, checkpoint_of_export, shallow_copy, tiny_export

ATOL = 1e-3  # the tolerance on final latents against diffusers
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def pipe(export_dir) -> AptpPipeline:
    return AptpPipeline.from_export(export_dir, threads=1)


@pytest.fixture(scope="module")
def components(export_dir):
    # The diffusers references need torch; the runtime itself does not (aarch64_check.sh runs
    # this file where only the runtime is installed).
    pytest.importorskip("torch", reason="torch is not installed: no diffusers reference here")
    from aptp.train.models import load_components

    return load_components(load_artifacts(export_dir, verify=False).base_model)


@pytest.fixture(scope="module")
def reference(pipe):
    """One routed request, computed once; bad-input tests check the pipeline still gives it."""
    return pipe([VEHICLE_PROMPTS[0]], seeds=[11], output_type="latent")[0]


def diffusers_run(components, unet, table: SchedulerTable, prompts, seeds, guidance_scale=7.5,
                  output_type="latent", gates=None, negative_prompt=None):
    """diffusers' StableDiffusionPipeline with `unet` (optionally masked by `gates`) from the
    same initial noise as the runtime's seeds."""
    import torch
    from diffusers import StableDiffusionPipeline

    from aptp.export.scheduler_tables import make_scheduler
    from aptp.train.gates import apply_gates

    sd = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=unet,
        scheduler=make_scheduler(table.name, table.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    noise = torch.from_numpy(np.stack([initial_noise(s, (4, 16, 16)) for s in seeds]))
    layout, mask = gates if gates is not None else (None, None)
    with torch.no_grad(), apply_gates(components.unet, layout, mask):
        out = sd(list(prompts), height=64, width=64, num_inference_steps=table.num_steps,
                 guidance_scale=guidance_scale, latents=noise, output_type=output_type,
                 negative_prompt=negative_prompt)
    images = out.images
    return images.numpy() if hasattr(images, "numpy") else np.asarray(images)


def expert_unet(export_dir: Path, code: int):
    from aptp.export import load_expert

    return load_expert(export_dir / "experts" / f"expert_{code}").eval()


# ---- torch-free --------------------------------------------------------------------------


def test_aptp_generate_writes_images_without_torch(export_dir, tmp_path):
    """The CLI in a fresh interpreter: numbered PNGs, expert and stage times printed, and
    neither torch nor diffusers nor training code imported on the way."""
    from PIL import Image

    argv = ["--artifacts", str(export_dir), "--prompt", VEHICLE_PROMPTS[0], "--prompt", FOOD_PROMPTS[0],
            "--output", str(tmp_path / "out.png"), "--threads", "1", "--seed", "5"]
    code = (
        "import sys\n"
        "import aptp.runtime\n"
        "for name in aptp.runtime.__all__: getattr(aptp.runtime, name)\n"
        "from aptp.runtime.cli import main\n"
        f"rc = main({argv!r})\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')"
        " or m.startswith(('aptp.train', 'aptp.export.exporter', 'aptp.export.onnx')))\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
    for i in range(2):
        with Image.open(tmp_path / f"out_{i}.png") as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    assert not (tmp_path / "out.png").exists()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert lines[0].startswith("[0] expert 0 on CPUExecutionProvider  seed 5")
    assert lines[1].startswith("[1] expert 1 on CPUExecutionProvider  seed 6")
    for stage in ("tokenise", "route", "text_encode", "denoise", "decode"):
        assert f"{stage} " in lines[0]


def test_aptp_generate_console_script_is_installed():
    script = Path(sys.executable).parent / "aptp-generate"
    if not script.exists():
        pytest.skip(f"no console script at {script} (package not installed with pip install -e .)")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("aptp-generate ")


def test_cli_prompts_file_and_forced_dense(export_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{FOOD_PROMPTS[1]}\n\n  \n{VEHICLE_PROMPTS[1]}\n", encoding="utf-8")
    assert read_prompts_file(prompts) == [FOOD_PROMPTS[1], VEHICLE_PROMPTS[1]]
    assert cli_main(["--artifacts", str(export_dir), "--prompt", "a green apple", "--prompts-file", str(prompts),
                     "--output", str(tmp_path / "img.png"), "--threads", "1", "--no-verify", "--expert", "dense",
                     "--guidance-scale", "3"]) == 0
    assert sorted(p.name for p in tmp_path.glob("img*.png")) == ["img_0.png", "img_1.png", "img_2.png"]
    out = capsys.readouterr().out
    assert out.count("expert dense") == 3 and FOOD_PROMPTS[1] in out


# ---- parity with diffusers ------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "pndm"])
def test_final_latents_match_diffusers_on_each_expert(pipe, components, export_dir, sampler):
    from aptp.export.scheduler_tables import build_scheduler_table

    table = pipe.scheduler if sampler == "ddim" else SchedulerTable.from_dict(
        build_scheduler_table(sampler, pipe.scheduler.config, STEPS))
    runtime = pipe.with_scheduler(table)
    prompts = [FOOD_PROMPTS[0], VEHICLE_PROMPTS[0], VEHICLE_PROMPTS[2]]
    seeds = [21, 22, 23]
    results = runtime(prompts, seeds=seeds, output_type="latent")
    assert [r.expert for r in results] == [1, 0, 0]
    for code in (0, 1):
        rows = [i for i, r in enumerate(results) if r.expert == code]
        want = diffusers_run(components, expert_unet(export_dir, code), table, [prompts[i] for i in rows],
                             [seeds[i] for i in rows])
        got = np.stack([results[i].latents for i in rows])
        assert np.abs(got - want).max() < ATOL, (sampler, code, np.abs(got - want).max())
        assert np.abs(want).max() > 1.0  # a real signal, not two zero tensors


def test_latents_match_full_unet_masked_by_the_code(pipe, components):
    from aptp.train import checkpoint as ckpt

    checkpoint = checkpoint_of_export()
    layout = ckpt.load_layout(checkpoint)
    _, masks = ckpt.load_codes(checkpoint)
    prompts = [FOOD_PROMPTS[2], VEHICLE_PROMPTS[1]]
    for code in (0, 1):
        got = np.stack([r.latents for r in pipe(prompts, seeds=[31, 32], expert=code, output_type="latent")])
        want = diffusers_run(components, components.unet, pipe.scheduler, prompts, [31, 32],
                             gates=(layout, masks[code].float()))
        assert np.abs(got - want).max() < ATOL, (code, np.abs(got - want).max())


def test_dense_images_match_diffusers_pixels(pipe, components):
    prompts = [VEHICLE_PROMPTS[2], FOOD_PROMPTS[1]]
    results = pipe(prompts, seeds=[41, 42], expert="dense", guidance_scale=5.0)
    assert [r.expert for r in results] == ["dense", "dense"]
    want_latents = diffusers_run(components, components.unet, pipe.scheduler, prompts, [41, 42], 5.0)
    assert np.abs(np.stack([r.latents for r in results]) - want_latents).max() < ATOL
    want = diffusers_run(components, components.unet, pipe.scheduler, prompts, [41, 42], 5.0, output_type="np")
    got = np.stack([r.image for r in results]).astype(np.int16)
    assert np.abs(got - np.round(want * 255)).max() <= 1
    assert got.std() > 1.0


def test_guidance_one_runs_the_conditional_model_as_diffusers(pipe, components, export_dir):
    got = pipe([FOOD_PROMPTS[0]], seeds=[7], guidance_scale=1.0, output_type="latent")[0]
    want = diffusers_run(components, expert_unet(export_dir, got.expert), pipe.scheduler, [FOOD_PROMPTS[0]], [7], 1.0)
    assert np.abs(got.latents - want[0]).max() < ATOL


# ---- routing and dispatch -------------------------------------------------------------------


def test_router_matches_sentence_transformers_and_head(pipe):
    torch = pytest.importorskip("torch", reason="torch is not installed: no sentence-transformers reference here")

    from aptp.train import checkpoint as ckpt
    from aptp.train.router import RouterHead, SentenceEncoder, group_weighted_cosine

    from export_fixtures import ENCODER

    prompts = [*VEHICLE_PROMPTS, *FOOD_PROMPTS, "logo", "a very long prompt " * 20]
    checkpoint = checkpoint_of_export()
    head = RouterHead.from_pretrained(str(checkpoint / ckpt.ROUTER_HEAD_DIR)).eval()
    logits, _ = ckpt.load_codes(checkpoint)
    with torch.no_grad():
        want = group_weighted_cosine(head(SentenceEncoder(ENCODER, device="cpu").encode(prompts)), logits,
                                     ckpt.load_layout(checkpoint).unit_weights).numpy()
    assert np.abs(pipe.router.scores(prompts) - want).max() < 1e-4
    assert pipe.route(prompts)[:6].tolist() == [0, 0, 0, 1, 1, 1]


def test_mixed_batch_returns_in_caller_order_and_equals_single_runs(pipe):
    prompts = [FOOD_PROMPTS[0], VEHICLE_PROMPTS[0], FOOD_PROMPTS[1], VEHICLE_PROMPTS[1], VEHICLE_PROMPTS[2]]
    seeds = [101, 102, 103, 104, 105]
    batch = pipe(prompts, seeds=seeds)
    assert [r.expert for r in batch] == [1, 0, 1, 0, 0]
    assert [r.prompt for r in batch] == prompts and [r.seed for r in batch] == seeds
    for prompt, seed, result in zip(prompts, seeds, batch):
        alone = pipe([prompt], seeds=[seed])[0]
        np.testing.assert_allclose(result.latents, alone.latents, rtol=0, atol=1e-5)
        assert np.abs(result.image.astype(int) - alone.image).max() <= 1
    # Each group's images differ: nothing was broadcast from one row to the others.
    assert len({r.image.tobytes() for r in batch}) == len(batch)
    assert set(batch[0].timings) == {"tokenise", "route", "text_encode", "denoise", "decode"}


def test_groups_larger_than_max_batch_run_in_chunks(pipe, monkeypatch):
    prompts = [VEHICLE_PROMPTS[0], FOOD_PROMPTS[0], VEHICLE_PROMPTS[1], VEHICLE_PROMPTS[2], FOOD_PROMPTS[1]]
    whole = pipe(prompts, seeds=7, output_type="latent")
    calls = []
    real = kernels.guided_step
    monkeypatch.setattr(kernels, "guided_step", lambda x, *a: (calls.append(x.shape[0]), real(x, *a)))
    monkeypatch.setattr(pipe, "max_batch", 2)
    chunked = pipe(prompts, seeds=7, output_type="latent")
    # code 0: 3 prompts -> chunks of 2 and 1; code 1: 2 prompts -> one chunk
    assert sorted(set(calls)) == [1, 2] and len(calls) == 3 * STEPS
    for a, b in zip(whole, chunked):
        assert a.expert == b.expert
        np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5)


def test_forced_expert_skips_the_router(pipe):
    results = pipe([VEHICLE_PROMPTS[0], FOOD_PROMPTS[0]], seeds=[1, 2], expert=1, output_type="latent")
    assert [r.expert for r in results] == [1, 1] and results[0].timings["route"] < 1e-3
    routed = pipe([VEHICLE_PROMPTS[0]], seeds=[1], output_type="latent")[0]
    assert routed.expert == 0 and np.abs(routed.latents - results[0].latents).max() > 1e-2


def test_seeds_are_per_prompt_and_reported(pipe):
    shape = (4, 16, 16)
    expected = np.random.Generator(np.random.PCG64(9)).standard_normal(shape, dtype=np.float32)
    np.testing.assert_array_equal(initial_noise(9, shape), expected)
    assert pipe.check_seeds(5, 3) == [5, 6, 7]
    fresh = pipe([VEHICLE_PROMPTS[0]], output_type="latent")[0]
    again = pipe([VEHICLE_PROMPTS[0]], seeds=[fresh.seed], output_type="latent")[0]
    np.testing.assert_array_equal(fresh.latents, again.latents)


# ---- kernels ------------------------------------------------------------------------------


class _CountingModule:
    """Forwards to aptp._C and counts calls per function."""

    def __init__(self, module):
        self._module, self.calls = module, {}

    def __getattr__(self, name):
        target = getattr(self._module, name)

        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return target(*args, **kwargs)

        return call


def test_cpp_kernels_run_and_numpy_fallback_agrees(pipe, monkeypatch):
    if kernels._C is None:
        pytest.skip(f"aptp._C is not built here ({kernels._C_IMPORT_ERROR}); nothing to compare")
    prompts = [FOOD_PROMPTS[0], VEHICLE_PROMPTS[0], VEHICLE_PROMPTS[1]]
    spy = _CountingModule(kernels._C)
    monkeypatch.setattr(kernels, "_C", spy)
    with_cpp = pipe(prompts, seeds=[1, 2, 3])
    groups = 2
    assert spy.calls["group_by_code"] == 1
    assert spy.calls["guided_step"] == groups * STEPS and spy.calls["cfg_input"] == groups * STEPS
    assert spy.calls["gather_rows"] == 2 * groups  # latents and text states
    assert spy.calls["scatter_rows"] == groups  # final latents (the decoder then runs on the whole batch)
    monkeypatch.setattr(kernels, "_C", None)
    assert kernels.backend() == "numpy"
    with_numpy = pipe(prompts, seeds=[1, 2, 3])
    for a, b in zip(with_cpp, with_numpy):
        np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-4)
        assert np.abs(a.image.astype(int) - b.image).max() <= 1


def test_engine_verbs(export_dir):
    engine = OnnxRuntimeEngine(export_dir / "vae_decoder" / "model.onnx", threads=1)
    assert not engine.loaded
    engine.load()
    assert engine.input_names == ["latent_sample"] and engine.output_names == ["sample"]
    out = engine.infer({"latent_sample": np.zeros((2, 4, 16, 16), np.float32)})["sample"]
    assert out.shape == (2, 3, 64, 64)
    with pytest.raises(RuntimeInputError, match="latent_sample"):
        engine.infer({"latents": np.zeros((1, 4, 16, 16), np.float32)})
    with pytest.raises(RuntimeInputError, match="cuda"):
        engine.allocate_buffers({"latent_sample": (1, 4, 16, 16)})
    engine.unload()
    assert not engine.loaded


def test_on_device_loop_matches_cpu(export_dir, pipe):
    import onnxruntime as ort

    if not kernels.cuda_available():
        pytest.skip(f"no CUDA device for the on-device loop: {kernels.cuda_status()}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA execution provider (onnxruntime-gpu absent)")
    gpu = AptpPipeline.from_export(export_dir, device="cuda", backend="onnxruntime", verify=False)
    assert gpu.on_device_loop
    prompts, seeds = [FOOD_PROMPTS[0], VEHICLE_PROMPTS[0], VEHICLE_PROMPTS[1]], [1, 2, 3]
    for guidance in (7.5, 1.0):
        got = gpu(prompts, seeds=seeds, guidance_scale=guidance, output_type="latent")
        want = pipe(prompts, seeds=seeds, guidance_scale=guidance, output_type="latent")
        for a, b in zip(got, want):
            assert a.expert == b.expert
            assert np.abs(a.latents - b.latents).max() < ATOL


class _HostBackedDeviceTensor:
    """`DeviceTensor`'s interface over host memory: pointers are numpy data addresses."""

    def __init__(self, shape, dtype, device_id=0):
        self.shape, self.dtype, self.device_id = tuple(shape), np.dtype(dtype), device_id
        self.array = np.zeros(self.shape, self.dtype)
        self.ptr = self.array.ctypes.data

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3}

    def rows(self, start, stop):
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        return kernels.DeviceArray(self.ptr + start * row, (stop - start, *self.shape[1:]), self.dtype)

    def upload(self, array):
        self.array[...] = array

    def download(self):
        return self.array.copy()


def _host_view(obj):
    """The numpy array behind a fake device pointer."""
    import ctypes

    cai = obj.__cuda_array_interface__
    dtype, shape = np.dtype(cai["typestr"]), tuple(cai["shape"])
    raw = (ctypes.c_byte * (int(np.prod(shape)) * dtype.itemsize)).from_address(cai["data"][0])
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


class _HostBackedCudaEngine:
    """A "cuda" UNet engine whose buffers are host memory and whose runs use the CPU session."""

    device, device_id = "cuda", 0

    def __init__(self, cpu_engine):
        self.cpu, self.path, self.buffers = cpu_engine, cpu_engine.path, {}

    def input_dtype(self, name):
        return self.cpu.input_dtype(name)

    def allocate_buffers(self, shapes):
        self.buffers = {n: _HostBackedDeviceTensor(s, np.float32) for n, s in shapes.items()}

    def infer(self, feed, stream=None):
        host = {n: v if isinstance(v, np.ndarray) else _host_view(v) for n, v in feed.items()}
        for name, value in host.items():
            assert value.shape == self.buffers[name].shape, (name, value.shape, self.buffers[name].shape)
        self.buffers["out_sample"].upload(self.cpu.infer(host)["out_sample"])
        return {"out_sample": self.buffers["out_sample"]}


def use_host_backed_gpu_loop(monkeypatch, device_tensor=_HostBackedDeviceTensor) -> None:
    """Let `denoise_on_device` run on host memory: `device_tensor` for its device buffers, the
    numpy twins for the CUDA kernels, no synchronisation (shared by the GPU-loop tests)."""

    def cfg_input_cuda(x, scale, out, stream=0):
        kernels.cfg_input_numpy(_host_view(x), scale, _host_view(out))

    def guided_step_cuda(x, mu, mc, s, px, pm, coefs, stream=0):
        kernels.guided_step_numpy(_host_view(x), _host_view(mu), _host_view(mc), s, _host_view(px),
                                  _host_view(pm), coefs)

    monkeypatch.setattr(denoise_module, "DeviceTensor", device_tensor)
    monkeypatch.setattr(denoise_module, "_synchronize", lambda: None)
    monkeypatch.setattr(kernels, "cfg_input_cuda", cfg_input_cuda)
    monkeypatch.setattr(kernels, "guided_step_cuda", guided_step_cuda)


def test_on_device_loop_logic_with_host_backed_buffers(pipe, monkeypatch):
    """The GPU loop's buffer plumbing (row views, the unguided half batch, history) run on host
    memory with the numpy twins standing in for the CUDA kernels: it must equal `denoise`."""
    use_host_backed_gpu_loop(monkeypatch)
    unet = pipe.unet(1)
    fake = _HostBackedCudaEngine(unet)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((3, 4, 16, 16), dtype=np.float32)
    for guidance, rows in ((7.5, 6), (1.0, 3)):
        text = rng.standard_normal((rows, 32, 64), dtype=np.float32)
        got = denoise_module.denoise_on_device(fake, latents, text, pipe.scheduler, guidance)
        want = denoise_module.denoise(unet, latents, text, pipe.scheduler, guidance)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert np.abs(want - latents).max() > 0.1


# ---- bad input --------------------------------------------------------------------------------

BAD_CALLS = {
    "empty list": (dict(prompts=[]), "prompt list is empty"),
    "0-character prompt": (dict(prompts=["a cat", ""]), "prompt 1 has 0 characters"),
    "whitespace prompt": (dict(prompts=["  \t"]), "only whitespace"),
    "bytes prompt": (dict(prompts=[b"a cat"]), "decode it first"),
    "zero steps": (dict(num_inference_steps=0), "positive integer"),
    "negative steps": (dict(num_inference_steps=-3), "positive integer"),
    "steps out of range": (dict(num_inference_steps=151), "between 1 and 150"),
    "float steps": (dict(num_inference_steps=2.5), "positive integer"),
    "guidance is text": (dict(guidance_scale="7.5"), "guidance_scale must be a finite number"),
    "guidance is nan": (dict(guidance_scale=math.nan), "guidance_scale must be a finite number"),
    "guidance is a list": (dict(guidance_scale=[7.5]), "guidance_scale must be a finite number"),
    "unknown expert": (dict(expert=5), "expert must be one of"),
    "negative seed": (dict(seeds=[-1]), r"seeds\[0\]"),
    "seed count": (dict(seeds=[1, 2]), "one per prompt"),
    "height off the grid": (dict(height=72), "not a multiple of 16"),
    "width out of range": (dict(width=128), "outside this export's range"),
    "output type": (dict(output_type="pil"), "output_type"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_request_is_refused_and_serving_goes_on(pipe, reference, case):
    kwargs, message = BAD_CALLS[case]
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", ["a cat"])
    with pytest.raises(RuntimeInputError, match=message):
        pipe(prompts, **kwargs)
    again = pipe([reference.prompt], seeds=[reference.seed], output_type="latent")[0]
    np.testing.assert_array_equal(again.latents, reference.latents)


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    prompt = "a red sports car with chrome wheels " * 12
    with caplog.at_level(logging.WARNING, logger="aptp.runtime.tokenize"):
        result = pipe([prompt, VEHICLE_PROMPTS[0]], seeds=[1, 2], expert=0)
    assert result[0].truncated and not result[1].truncated
    assert any("truncated" in r.getMessage() and "32 tokens" in r.getMessage() for r in caplog.records)
    assert result[0].image.shape == (64, 64, 3)
    cut = pipe([prompt + " and more words"], seeds=[1], expert=0)[0]  # beyond the limit nothing changes
    np.testing.assert_array_equal(cut.latents, result[0].latents)


def test_non_utf8_prompts_file(export_dir, tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes("a café\n".encode("latin-1"))
    with pytest.raises(RuntimeInputError, match=r"not UTF-8 text: byte 0xe9 at offset 5 \(line 1\)"):
        read_prompts_file(bad)
    assert cli_main(["--artifacts", str(export_dir), "--prompts-file", str(bad), "--output",
                     str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aptp-generate: error:") and "UTF-8" in err[0]
    assert not list(tmp_path.glob("x*.png"))


@pytest.mark.parametrize("args, message", [
    (["--guidance-scale", "strong"], "--guidance-scale must be a number"),
    (["--steps", "0"], "num_inference_steps must be a positive integer"),
    (["--steps", "many"], "--steps must be a positive integer"),
    (["--expert", "big"], "--expert must be a code"),
    (["--output", "x.jpg"], "must end in .png"),
])
def test_cli_bad_options_are_one_error_line(export_dir, tmp_path, capsys, args, message):
    argv = ["--artifacts", str(export_dir), "--prompt", "a cat", "--output", str(tmp_path / "x.png"), *args]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_tampered_model_file_is_refused(export_dir, tmp_path, pipe, reference):
    copy = shallow_copy(export_dir, tmp_path / "export", copy=("experts/expert_1/unet.onnx",))
    target = copy / "experts" / "expert_1" / "unet.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"experts/expert_1/unet.onnx does not match its sha256"):
        AptpPipeline.from_export(copy)
    assert cli_main(["--artifacts", str(copy), "--prompt", "a cat", "--output", str(tmp_path / "x.png")]) == 2
    # The running pipeline on the intact export is unaffected.
    np.testing.assert_array_equal(pipe([reference.prompt], seeds=[reference.seed], output_type="latent")[0].latents,
                                  reference.latents)


def test_manifest_of_another_version_is_refused(export_dir, tmp_path):
    copy = shallow_copy(export_dir, tmp_path / "export")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 2"):
        load_artifacts(copy)


def test_manifest_missing_entry_names_the_key(export_dir, tmp_path):
    copy = shallow_copy(export_dir, tmp_path / "export")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["tokenizer"]["max_length"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"tokenizer.max_length is missing"):
        load_artifacts(copy)


def test_unavailable_backend_and_device_are_clear(pipe):
    with pytest.raises(RuntimeInputError, match="backend must be one of"):
        AptpPipeline(pipe.artifacts, backend="openvino")
    with pytest.raises(RuntimeInputError, match="device 'cuda' only"):
        AptpPipeline(pipe.artifacts, backend="tensorrt", device="cpu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeInputError, match="install onnxruntime-gpu"):
            AptpPipeline(pipe.artifacts, device="cuda")
    table = pipe.scheduler.to_dict()
    table["prediction_type"] = "v_prediction"
    with pytest.raises(RuntimeInputError, match="v_prediction"):
        pipe.with_scheduler(table)
