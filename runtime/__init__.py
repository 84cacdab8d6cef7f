"""aptp.runtime: torch-free routing, dispatch and sampling over an aptp export.

Imports only numpy, tokenizers, onnxruntime (or tensorrt), Pillow for PNGs and the ``aptp._C``
extension; never torch, diffusers or training code. Names load lazily, so ``import
aptp.runtime`` itself is cheap.

    from aptp.runtime import AptpPipeline, GenerationServer
    pipe = AptpPipeline.from_export("exports/tiny", device="cpu")
    images = [r.image for r in pipe(["a red car", "a bowl of soup"], seeds=0)]

Public API:
    AptpPipeline, GenerationOptions, GenerationResult, initial_noise, resolve_backend, STAGES
    GenerationServer, QueueFullError, ServerClosedError                   serving under load
    load_artifacts, ExportArtifacts, ModelFile, TokenizerFile, DENSE      export reading
    Engine, OnnxRuntimeEngine, TensorRTEngine, DeviceTensor               engines
    Router, PromptTokenizer, check_prompts                                routing, tokens
    SchedulerTable, SamplerLibrary                                        sampler tables
    denoise, denoise_on_device                                            the sampling loop
    to_uint8, save_png, read_png_parameters, contact_sheet                images
"""

from __future__ import annotations


from aptp.lazy import lazy_exports

_EXPORTS = {
    "AptpPipeline": ".pipeline",
    "GenerationOptions": ".pipeline",
    "GenerationResult": ".pipeline",
    "STAGES": ".pipeline",
    "initial_noise": ".pipeline",
    "resolve_backend": ".pipeline",
    "GenerationServer": ".serving",
    "QueueFullError": ".serving",
    "ServerClosedError": ".serving",
    "DENSE": ".artifacts",
    "ExportArtifacts": ".artifacts",
    "ModelFile": ".artifacts",
    "TokenizerFile": ".artifacts",
    "load_artifacts": ".artifacts",
    "DeviceTensor": ".engine",
    "Engine": ".engine",
    "OnnxRuntimeEngine": ".engine",
    "TensorRTEngine": ".engine",
    "Router": ".router",
    "PromptTokenizer": ".tokenize",
    "check_prompts": ".tokenize",
    "SchedulerTable": ".scheduler",
    "SamplerLibrary": ".sampler_library",
    "denoise": ".denoise",
    "denoise_on_device": ".denoise",
    "save_png": ".images",
    "read_png_parameters": ".images",
    "contact_sheet": ".images",
    "to_uint8": ".images",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
