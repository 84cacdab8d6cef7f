"""Backend selection that cannot lie: what runs is what the onnxruntime session activated.

onnxruntime-gpu lists the CUDA and TensorRT providers even where their libraries cannot load,
and a session asked for them then quietly runs on the CPU provider. These tests stand a fake
`onnxruntime` in front of the real (CPU) one: it lists whichever providers a test says and
reports as active only the ones the test says activated, while the graphs really run on the
CPU underneath. No GPU is needed: what is checked is the selection and the labels.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from aptp.errors import DependencyError, RuntimeInputError
from aptp.runtime import AptpPipeline, load_artifacts
from aptp.runtime import engine as engine_module
from aptp.runtime.cli import main as cli_main
from aptp.runtime.engine import OnnxRuntimeEngine, check_active_providers
from runtime_fixtures import FOOD_PROMPTS, VEHICLE_PROMPTS, tiny_export

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def fake_onnxruntime(listed: list[str], activates: list[str]) -> types.ModuleType:
    """A module like onnxruntime-gpu on a machine without working CUDA libraries: it lists
    `listed`; a session activates the requested providers that are in `activates` (plus CPU)."""
    import onnxruntime as real

    fake = types.ModuleType("onnxruntime")
    fake.__version__ = real.__version__ + "+fake"
    fake.SessionOptions = real.SessionOptions
    fake.OrtValue = real.OrtValue
    fake.get_available_providers = lambda: list(listed)
    fake.requests = []

    class InferenceSession:
        def __init__(self, path, options=None, providers=None):
            names = [p[0] if isinstance(p, tuple) else p for p in providers or [CPU]]
            fake.requests.append(names)
            self._active = [n for n in names if n in activates or n == CPU]
            self._session = real.InferenceSession(path, options, providers=[CPU])

        def get_providers(self):
            return list(self._active)

        def __getattr__(self, name):
            return getattr(self._session, name)

    fake.InferenceSession = InferenceSession
    return fake


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("runtime"))


@pytest.fixture
def unet_path(export_dir) -> Path:
    return load_artifacts(export_dir, verify=False).unet("dense").onnx


@pytest.fixture
def unet_weights(export_dir, unet_path) -> list:
    """The dense UNet's external weight files, as the pipeline hands them to its engines."""
    return load_artifacts(export_dir, verify=False).external_weights(unet_path)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(engine_module, "_warned", set())


def use(monkeypatch, listed, activates):
    fake = fake_onnxruntime(listed, activates)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    return fake


def test_cuda_listed_but_inactive_is_an_error_never_a_cpu_run_labelled_cuda(monkeypatch, export_dir, unet_path, unet_weights):
    fake = use(monkeypatch, [TRT, CUDA, CPU], [CPU])
    for backend in ("auto", "onnxruntime"):
        with pytest.raises(RuntimeInputError, match=r"did not activate CUDAExecutionProvider.*'CPUExecutionProvider'"):
            AptpPipeline.from_export(export_dir, verify=False, device="cuda", backend=backend, threads=1)
        engine = OnnxRuntimeEngine(unet_path, device="cuda", backend=backend, threads=1, external_data=unet_weights)
        with pytest.raises(RuntimeInputError, match="device 'cuda'"):
            engine.load()
        assert not engine.loaded and engine.provider is None
    assert fake.requests and all(CUDA in names for names in fake.requests)  # CUDA was asked for every time


def test_cli_device_cuda_on_cpu_execution_is_one_error_line_and_no_image(monkeypatch, export_dir, tmp_path, capsys):
    use(monkeypatch, [TRT, CUDA, CPU], [CPU])
    out = tmp_path / "out.png"
    rc = cli_main(["--artifacts", str(export_dir), "--prompt", FOOD_PROMPTS[0], "--device", "cuda",
                   "--steps", "4", "--output", str(out), "--no-verify", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("aptp-generate: error: device 'cuda'") and CPU in err[0]
    assert not list(tmp_path.iterdir())


def test_auto_falls_back_from_an_inactive_tensorrt_provider_with_one_warning(monkeypatch, unet_path, unet_weights,
                                                                            caplog):
    use(monkeypatch, [TRT, CUDA, CPU], [CUDA])
    engines = [OnnxRuntimeEngine(unet_path, device="cuda", backend="auto", threads=1, external_data=unet_weights)
               for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="aptp.runtime.engine"):
        for engine in engines:
            engine.load()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "TensorrtExecutionProvider" in warnings[0].getMessage()
    assert "falling back to CUDAExecutionProvider" in warnings[0].getMessage()
    assert all(e.provider == CUDA and e.providers == [CUDA, CPU] for e in engines)


def test_explicit_tensorrt_provider_that_does_not_activate_or_is_absent_fails(monkeypatch, unet_path, unet_weights):
    use(monkeypatch, [TRT, CUDA, CPU], [CUDA])
    with pytest.raises(RuntimeInputError, match="backend 'tensorrt'.*did not activate"):
        OnnxRuntimeEngine(unet_path, device="cuda", backend="tensorrt", threads=1, external_data=unet_weights).load()
    use(monkeypatch, [CUDA, CPU], [CUDA])
    with pytest.raises(RuntimeInputError, match="backend 'tensorrt' needs onnxruntime's TensorrtExecutionProvider"):
        OnnxRuntimeEngine(unet_path, device="cuda", backend="tensorrt", threads=1, external_data=unet_weights).load()


def test_results_record_the_provider_that_ran(monkeypatch, export_dir):
    prompts = [VEHICLE_PROMPTS[0], FOOD_PROMPTS[0]]
    with AptpPipeline.from_export(export_dir, verify=False, threads=1) as pipe:
        results = pipe(prompts, seeds=0, output_type="latent")
        assert [r.provider for r in results] == [CPU, CPU]
        assert set(pipe.providers().values()) == {CPU}
    # Where the CUDA provider activates, the label says so; the fake runs it on the CPU underneath,
    # so the latents must match the CPU run's exactly.
    use(monkeypatch, [CUDA, CPU], [CUDA])
    with AptpPipeline.from_export(export_dir, verify=False, device="cuda", backend="onnxruntime", threads=1) as gpu:
        got = gpu(prompts, seeds=0, output_type="latent")
    assert [r.provider for r in got] == [CUDA, CUDA]
    for a, b in zip(got, results):
        assert a.expert == b.expert and np.array_equal(a.latents, b.latents)


def test_check_active_providers_cases():
    asked = [(TRT, {}), (CUDA, {}), CPU]
    assert check_active_providers([CPU], [CPU], device="cpu", backend="auto") == CPU
    assert check_active_providers(asked, [TRT, CUDA, CPU], device="cuda", backend="tensorrt") == TRT
    assert check_active_providers(asked, [CUDA, CPU], device="cuda", backend="auto") == CUDA
    with pytest.raises(RuntimeInputError, match="backend 'tensorrt'"):
        check_active_providers(asked, [CUDA, CPU], device="cuda", backend="tensorrt")
    with pytest.raises(RuntimeInputError, match="device 'cuda'"):
        check_active_providers(asked, [CPU], device="cuda", backend="auto")


def test_runtime_imports_without_onnxruntime_and_names_the_extras(monkeypatch, export_dir, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    import aptp.runtime

    assert aptp.runtime.AptpPipeline is AptpPipeline
    with pytest.raises(DependencyError, match=r"aptp\[cpu\].*aptp\[gpu\]"):
        AptpPipeline.from_export(export_dir, verify=False)
    rc = cli_main(["--artifacts", str(export_dir), "--prompt", "a cat", "--output", str(tmp_path / "x.png"),
                   "--no-verify"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "aptp[cpu]" in err[0]


def test_latency_suite_never_times_an_inactive_gpu_provider_as_gpu(monkeypatch, export_dir, tmp_path):
    pytest.importorskip("torch", reason="the latency suite loads its models with torch (aptp[train]); a runtime-only "
                        "install, such as the arm64 emulation's, has none")
    from aptp.benchmarks.latency import LatencyOptions, run_latency

    use(monkeypatch, [CUDA, CPU], [CPU])  # onnxruntime-gpu without working CUDA libraries
    options = LatencyOptions(backends=["onnxruntime", "onnxruntime-cuda"], batch_sizes=[1], repeats=1, warmup=0,
                             threads=1, masked=False, static=False, e2e=False, gap_threshold=100.0)
    results = run_latency(export_dir, tmp_path / "bench", options)
    status = results["backends"]["onnxruntime-cuda"]
    assert status["available"] is False and "did not activate CUDAExecutionProvider" in status["reason"]
    assert results["unet_step"] and {r["backend"] for r in results["unet_step"]} == {"onnxruntime"}
    assert {r["provider"] for r in results["unet_step"]} == {CPU}
    assert results["backends"]["onnxruntime"]["providers"] == [CPU]
