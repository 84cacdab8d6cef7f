"""ONNX export configs: one class per model kind, declaring its graph's inputs and outputs.

As in optimum's exporters, a config says *what* a graph looks like (input/output names, which
axes are dynamic, dummy inputs, opset and validation tolerance, TensorRT input profiles) and
how to wrap the PyTorch model so that its forward matches those names; `onnx_export` does the
exporting and the checking. Shapes are declared once, symbolically (``INPUT_SHAPES``): the
ONNX dynamic axes, the dummy inputs and the TensorRT profiles are all read off them.

Kinds (registered in `ONNX_CONFIGS`):
    unet            sample, timestep, encoder_hidden_states -> out_sample   (optimum's names)
    text_encoder    input_ids (int32, as diffusers' ONNX pipeline feeds it) -> last_hidden_state
    vae_decoder     latent_sample -> sample; the latent scale is folded into the graph
    vae_encoder     sample -> latent_sample (pipeline directories only)
    vae_posterior   sample -> latent_mean, latent_std: the encoder's posterior, for img2img
    router_encoder  input_ids, attention_mask -> sentence_embedding (pooled, L2-normalised)
    router_head     sentence_embedding -> scores (B, K): group-weighted cosine to the K codes
    release_router_head  the same I/O for an imported release: the authors' rule (row-0 noise)
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from aptp.errors import ConfigError

__all__ = [
    "ONNX_CONFIGS",
    "DummyInputGenerator",
    "OnnxConfig",
    "RouterEncoderOnnxConfig",
    "ReleaseRouterHeadOnnxConfig",
    "RouterHeadOnnxConfig",
    "TextEncoderOnnxConfig",
    "UNetOnnxConfig",
    "VaeDecoderOnnxConfig",
    "VaeEncoderOnnxConfig",
    "VaePosteriorOnnxConfig",
    "register_onnx_config",
]

ONNX_CONFIGS: dict[str, type["OnnxConfig"]] = {}


def register_onnx_config(cls: type["OnnxConfig"]) -> type["OnnxConfig"]:
    """Class decorator: make a config available by its ``NAME``."""
    if not cls.NAME or cls.NAME in ONNX_CONFIGS:
        raise ValueError(f"ONNX config {cls.__name__} needs a unique NAME, got {cls.NAME!r}")
    ONNX_CONFIGS[cls.NAME] = cls
    return cls


# -- dummy inputs ------------------------------------------------------------------------------


class DummyInputGenerator:
    """Random inputs for the names it supports; shapes come from the config, values from here."""

    SUPPORTED_INPUT_NAMES: ClassVar[tuple[str, ...]] = ()

    def supports(self, name: str) -> bool:
        return name in self.SUPPORTED_INPUT_NAMES

    def generate(self, name: str, shape: tuple[int, ...], dims: Mapping[str, int], dtype: torch.dtype,
                 generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class DummyNormalInputGenerator(DummyInputGenerator):
    """Standard normal floats: latents and text-encoder states."""

    SUPPORTED_INPUT_NAMES = ("sample", "latent_sample", "encoder_hidden_states")

    def generate(self, name, shape, dims, dtype, generator):
        return torch.randn(shape, generator=generator).to(dtype)


class DummyTimestepInputGenerator(DummyInputGenerator):
    """Timesteps anywhere in the training range, as floats (diffusers' ONNX pipeline casts them)."""

    SUPPORTED_INPUT_NAMES = ("timestep",)

    def generate(self, name, shape, dims, dtype, generator):
        high = float(dims.get("num_train_timesteps", 1000))
        return (torch.rand(shape, generator=generator) * (high - 1)).round().to(dtype)


class DummyTokenInputGenerator(DummyInputGenerator):
    """Token ids below the vocabulary size, and attention masks with a random padded tail."""

    SUPPORTED_INPUT_NAMES = ("input_ids", "attention_mask")

    def generate(self, name, shape, dims, dtype, generator):
        if name == "input_ids":
            return torch.randint(0, int(dims["vocab_size"]), shape, generator=generator).to(dtype)
        batch, length = shape
        # At least one real token per row, so mean pooling never divides by zero.
        lengths = torch.randint(1, length + 1, (batch,), generator=generator)
        return (torch.arange(length)[None, :] < lengths[:, None]).to(dtype)


class DummyEmbeddingInputGenerator(DummyInputGenerator):
    """L2-normalised vectors, like the router encoder's output."""

    SUPPORTED_INPUT_NAMES = ("sentence_embedding",)

    def generate(self, name, shape, dims, dtype, generator):
        return F.normalize(torch.randn(shape, generator=generator), dim=-1).to(dtype)


# -- configs -----------------------------------------------------------------------------------


class OnnxConfig:
    """Base of the per-kind export configs.

    Subclasses declare ``INPUT_SHAPES``/``OUTPUT_SHAPES`` as tuples of dimension names or ints;
    names listed in ``DYNAMIC_DIMS`` become ONNX dynamic axes (the name is the symbol), all
    others are fixed and resolved from ``dims`` (the model's own sizes plus the export's
    nominal batch and resolution).

    Args:
        dims: sizes for every dimension name the shapes use.
        precision: ``"fp32"`` or ``"fp16"``: the dtype of the graph's float inputs and weights
            (inputs in ``FP32_INPUTS`` stay float32).
    """

    NAME: ClassVar[str] = ""
    DEFAULT_ONNX_OPSET: ClassVar[int] = 18
    # Max abs difference between onnxruntime and PyTorch on random inputs.
    ATOL_FOR_VALIDATION: ClassVar[float] = 1e-3
    # fp16 graphs are checked against the fp32 PyTorch model: fp16 keeps 11 significant bits
    # (relative rounding 4.9e-4 per op) and errors add up over dozens of layers, so outputs of
    # order 1 drift by 1e-3..1e-2; 5e-2 still catches a wrong graph (errors of order 1).
    ATOL_FOR_VALIDATION_FP16: ClassVar[float] = 5e-2
    INPUT_SHAPES: ClassVar[dict[str, tuple[str | int, ...]]] = {}
    OUTPUT_SHAPES: ClassVar[dict[str, tuple[str | int, ...]]] = {}
    DYNAMIC_DIMS: ClassVar[frozenset[str]] = frozenset()
    # Non-float inputs and float inputs kept in float32 whatever the precision.
    INPUT_DTYPES: ClassVar[dict[str, torch.dtype]] = {}
    FP32_INPUTS: ClassVar[frozenset[str]] = frozenset()
    DUMMY_INPUT_GENERATOR_CLASSES: ClassVar[tuple[type[DummyInputGenerator], ...]] = ()
    # Precisions this kind may be exported in (the router stays fp32: routing is an argmax and
    # must not flip on fp16 rounding).
    PRECISIONS: ClassVar[tuple[str, ...]] = ("fp32", "fp16")

    def __init__(self, dims: Mapping[str, int], precision: str = "fp32"):
        if precision not in ("fp32", "fp16"):
            raise ConfigError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        if precision not in self.PRECISIONS:
            precision = "fp32"
        self.dims = dict(dims)
        self.precision = precision
        needed = {d for shape in (*self.INPUT_SHAPES.values(), *self.OUTPUT_SHAPES.values()) for d in shape if isinstance(d, str)}
        missing = sorted(needed - set(self.dims))
        if missing:
            raise ConfigError(f"{type(self).__name__} needs sizes for {missing}")
        self._generators = [cls() for cls in self.DUMMY_INPUT_GENERATOR_CLASSES]
        for name in self.INPUT_SHAPES:
            if not any(g.supports(name) for g in self._generators):
                raise ConfigError(f"{type(self).__name__}: no dummy input generator supports input {name!r}")

    # Declarative I/O -------------------------------------------------------------------------
    @property
    def float_dtype(self) -> torch.dtype:
        return torch.float16 if self.precision == "fp16" else torch.float32

    @property
    def atol(self) -> float:
        return self.ATOL_FOR_VALIDATION_FP16 if self.precision == "fp16" else self.ATOL_FOR_VALIDATION

    def _axes(self, shapes: Mapping[str, tuple[str | int, ...]]) -> dict[str, dict[int, str]]:
        return {name: {i: d for i, d in enumerate(shape) if isinstance(d, str) and d in self.DYNAMIC_DIMS}
                for name, shape in shapes.items()}

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        """Input names, in graph order, with their dynamic axes ``{axis: symbol}``."""
        return self._axes(self.INPUT_SHAPES)

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        """Output names, in graph order, with their dynamic axes ``{axis: symbol}``."""
        return self._axes(self.OUTPUT_SHAPES)

    def input_dtype(self, name: str) -> torch.dtype:
        if name in self.INPUT_DTYPES:
            return self.INPUT_DTYPES[name]
        return torch.float32 if name in self.FP32_INPUTS else self.float_dtype

    def shape(self, name: str, dims: Mapping[str, int] | None = None) -> tuple[int, ...]:
        """Concrete shape of input or output `name` for `dims` (default: the config's dims)."""
        dims = {**self.dims, **(dims or {})}
        symbolic = self.INPUT_SHAPES.get(name) or self.OUTPUT_SHAPES.get(name)
        if symbolic is None:
            raise ConfigError(f"{type(self).__name__} has no input or output {name!r}")
        return tuple(d if isinstance(d, int) else int(dims[d]) for d in symbolic)

    def io_spec(self) -> dict[str, dict[str, Any]]:
        """JSON-friendly description of the graph's inputs and outputs (for the manifest)."""
        def describe(shapes, is_input):
            out = {}
            for name, shape in shapes.items():
                dtype = self.input_dtype(name) if is_input else self.output_dtype(name)
                out[name] = {
                    "shape": [d if isinstance(d, int) or d in self.DYNAMIC_DIMS else int(self.dims[d]) for d in shape],
                    "dtype": str(dtype).replace("torch.", ""),
                }
            return out
        return {"inputs": describe(self.INPUT_SHAPES, True), "outputs": describe(self.OUTPUT_SHAPES, False)}

    def output_dtype(self, name: str) -> torch.dtype:
        return self.float_dtype

    # Dummy inputs and validation sets ---------------------------------------------------------
    def dummy_inputs(self, dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random inputs, in graph order, for `dims` (default: the config's)."""
        merged = {**self.dims, **(dims or {})}
        generator = torch.Generator().manual_seed(seed)
        inputs = {}
        for name in self.INPUT_SHAPES:
            gen = next(g for g in self._generators if g.supports(name))
            inputs[name] = gen.generate(name, self.shape(name, merged), merged, self.input_dtype(name), generator)
        return inputs

    def validation_dims(self) -> list[dict[str, int]]:
        """Sizes to check the exported graph at: the export's own, then others along every
        dynamic axis, so a size baked in by tracing shows up as an error."""
        return [dict(self.dims)]

    # Model wrapping and export-time patches ---------------------------------------------------
    def wrap(self, model: Any) -> nn.Module:
        """A module whose ``forward(*inputs)`` takes the inputs in graph order and returns the
        outputs in graph order (a tensor when there is one)."""
        raise NotImplementedError

    @contextmanager
    def patch(self, model: nn.Module) -> Iterator[None]:
        """Export-time tweaks, undone on exit (optimum's ModelPatcher). The base silences the
        tracer's warnings about Python control flow on shapes: the configs' validation at other
        sizes is what proves those branches harmless."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            yield

    # TensorRT ---------------------------------------------------------------------------------
    def input_profile(self, min_dims: Mapping[str, int], opt_dims: Mapping[str, int],
                      max_dims: Mapping[str, int]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: ``{input: (min shape, opt shape, max shape)}``."""
        return {name: (self.shape(name, min_dims), self.shape(name, opt_dims), self.shape(name, max_dims))
                for name in self.INPUT_SHAPES}


@contextmanager
def plain_attention(model: nn.Module) -> Iterator[None]:
    """Swap in diffusers' plain `AttnProcessor` (baddbmm + softmax + bmm) and restore the
    original processors on exit: it traces into plain MatMul/Softmax nodes that onnxruntime and
    TensorRT both run, with no dependence on how a torch version lowers SDPA."""
    from diffusers.models.attention_processor import AttnProcessor

    if not hasattr(model, "set_attn_processor"):
        yield
        return
    original = dict(model.attn_processors)
    model.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        model.set_attn_processor(original)


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run a transformers model with its "eager" attention while exporting, then restore it.

    The TorchScript exporter's SDPA lowering leaves a float32 Softmax inside fp16 graphs
    (onnxruntime then rejects the graph: LayerNormalization sees float and float16); the eager
    path casts explicitly and exports cleanly in both precisions.
    """
    setter = getattr(model, "set_attn_implementation", None)
    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if setter is None or original is None or original == "eager":
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(original)


class _UNetWrapper(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


@register_onnx_config
class UNetOnnxConfig(OnnxConfig):
    """A diffusers UNet2DConditionModel, dense or sliced expert (optimum's names).

    dims: ``batch, in_channels, out_channels, height, width`` (latent), ``steps`` (timestep
    length: 1 or batch; the UNet broadcasts), ``sequence, hidden`` (text states),
    ``num_train_timesteps`` and ``latent_multiple`` (spatial sizes must be multiples of it).
    """

    NAME = "unet"
    INPUT_SHAPES = {
        "sample": ("batch", "in_channels", "height", "width"),
        "timestep": ("steps",),
        "encoder_hidden_states": ("batch", "sequence", "hidden"),
    }
    OUTPUT_SHAPES = {"out_sample": ("batch", "out_channels", "height", "width")}
    DYNAMIC_DIMS = frozenset({"batch", "height", "width", "steps", "sequence"})
    FP32_INPUTS = frozenset({"timestep"})
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyNormalInputGenerator, DummyTimestepInputGenerator)

    @classmethod
    def from_unet(cls, unet: nn.Module, latent_height: int, latent_width: int, text_length: int,
                  batch: int = 2, precision: str = "fp32") -> "UNetOnnxConfig":
        config = unet.config
        return cls({
            "batch": batch, "steps": batch, "in_channels": config.in_channels, "out_channels": config.out_channels,
            "height": latent_height, "width": latent_width, "sequence": text_length,
            "hidden": config.cross_attention_dim, "num_train_timesteps": 1000,
            "latent_multiple": 2 ** (len(config.down_block_types) - 1),
        }, precision)

    def validation_dims(self):
        base = dict(self.dims)
        step = int(base.get("latent_multiple", 1))
        other = {**base, "batch": 1 if base["batch"] > 1 else 2, "steps": 1, "sequence": base["sequence"] + 5,
                 "height": base["height"] + step, "width": base["width"] + 2 * step}
        return [base, other]

    def wrap(self, model):
        return _UNetWrapper(model)

    @contextmanager
    def patch(self, model):
        with super().patch(model), plain_attention(model):
            yield


class _TextEncoderWrapper(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids=input_ids, return_dict=False)[0]


@register_onnx_config
class TextEncoderOnnxConfig(OnnxConfig):
    """The diffusion text encoder (a transformers CLIPTextModel or alike): the UNet's context.

    ``input_ids`` are int32 because diffusers' `OnnxStableDiffusionPipeline` feeds int32.
    dims: ``batch, sequence, hidden, vocab_size``.
    """

    NAME = "text_encoder"
    INPUT_SHAPES = {"input_ids": ("batch", "sequence")}
    OUTPUT_SHAPES = {"last_hidden_state": ("batch", "sequence", "hidden")}
    DYNAMIC_DIMS = frozenset({"batch", "sequence"})
    INPUT_DTYPES = {"input_ids": torch.int32}
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyTokenInputGenerator,)

    @classmethod
    def from_model(cls, text_encoder: nn.Module, text_length: int, batch: int = 2,
                   precision: str = "fp32") -> "TextEncoderOnnxConfig":
        config = text_encoder.config
        return cls({"batch": batch, "sequence": text_length, "hidden": config.hidden_size,
                    "vocab_size": config.vocab_size}, precision)

    def validation_dims(self):
        # Shorter sequences only: the position embeddings fix the longest one.
        shorter = max(1, self.dims["sequence"] // 2)
        return [dict(self.dims), {**self.dims, "batch": self.dims["batch"] + 1, "sequence": shorter}]

    def wrap(self, model):
        return _TextEncoderWrapper(model)

    @contextmanager
    def patch(self, model):
        with super().patch(model), eager_attention(model):
            yield


class _VaeDecoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module, latent_scale: float):
        super().__init__()
        self.vae = vae
        self.latent_scale = float(latent_scale)

    def forward(self, latent_sample):
        if self.latent_scale != 1.0:
            latent_sample = latent_sample * self.latent_scale
        return self.vae.decode(latent_sample, return_dict=False)[0]


@register_onnx_config
class VaeDecoderOnnxConfig(OnnxConfig):
    """The VAE decoder, with the latent scale multiplied in first.

    aptp's own export folds ``1 / scaling_factor`` in, so the runtime hands over the final
    latents as they are; a diffusers ONNX pipeline directory multiplies by ``1 / 0.18215`` itself,
    so its decoder folds ``0.18215 / scaling_factor`` in (1 for Stable Diffusion's own VAE).
    dims: ``batch, latent_channels, height, width`` (latent), ``image_channels, image_height,
    image_width``.
    """

    NAME = "vae_decoder"
    INPUT_SHAPES = {"latent_sample": ("batch", "latent_channels", "height", "width")}
    OUTPUT_SHAPES = {"sample": ("batch", "image_channels", "image_height", "image_width")}
    DYNAMIC_DIMS = frozenset({"batch", "height", "width", "image_height", "image_width"})
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyNormalInputGenerator,)

    def __init__(self, dims, precision="fp32", latent_scale: float = 1.0):
        super().__init__(dims, precision)
        self.latent_scale = float(latent_scale)

    @classmethod
    def from_vae(cls, vae: nn.Module, latent_height: int, latent_width: int, latent_scale: float,
                 batch: int = 1, precision: str = "fp32") -> "VaeDecoderOnnxConfig":
        config = vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        return cls({
            "batch": batch, "latent_channels": config.latent_channels, "height": latent_height, "width": latent_width,
            "image_channels": config.out_channels, "image_height": latent_height * factor,
            "image_width": latent_width * factor, "vae_scale_factor": factor,
        }, precision, latent_scale=latent_scale)

    def validation_dims(self):
        base = dict(self.dims)
        factor = int(base.get("vae_scale_factor", 1))
        h, w = base["height"] + 2, base["width"] + 4
        return [base, {**base, "batch": base["batch"] + 1, "height": h, "width": w,
                       "image_height": h * factor, "image_width": w * factor}]

    def wrap(self, model):
        return _VaeDecoderWrapper(model, self.latent_scale)

    @contextmanager
    def patch(self, model):
        with super().patch(model), plain_attention(model):
            yield


class _VaeEncoderWrapper(nn.Module):
    def __init__(self, vae: nn.Module, latent_scale: float):
        super().__init__()
        self.vae = vae
        self.latent_scale = float(latent_scale)

    def forward(self, sample):
        # The posterior mean, not a sample: the graph stays deterministic.
        latents = self.vae.encode(sample, return_dict=False)[0].mode()
        return latents * self.latent_scale if self.latent_scale != 1.0 else latents


@register_onnx_config
class VaeEncoderOnnxConfig(VaeDecoderOnnxConfig):
    """The VAE encoder (image in [-1, 1] -> posterior mean times `latent_scale`).

    Only diffusers ONNX pipeline directories need it (their loader requires a ``vae_encoder``;
    img2img multiplies its output by 0.18215, so it folds ``scaling_factor / 0.18215`` in).
    dims, validation shapes and export patches as `VaeDecoderOnnxConfig`, inputs and outputs swapped.
    """

    NAME = "vae_encoder"
    INPUT_SHAPES = {"sample": ("batch", "image_channels", "image_height", "image_width")}
    OUTPUT_SHAPES = {"latent_sample": ("batch", "latent_channels", "height", "width")}

    @classmethod
    def from_vae(cls, vae: nn.Module, latent_height: int, latent_width: int, latent_scale: float,
                 batch: int = 1, precision: str = "fp32") -> "VaeEncoderOnnxConfig":
        dims = VaeDecoderOnnxConfig.from_vae(vae, latent_height, latent_width, 1.0, batch).dims
        dims["image_channels"] = vae.config.in_channels
        return cls(dims, precision, latent_scale=latent_scale)

    def wrap(self, model):
        return _VaeEncoderWrapper(model, self.latent_scale)


class _VaePosteriorWrapper(nn.Module):
    def __init__(self, vae: nn.Module, latent_scale: float):
        super().__init__()
        self.vae = vae
        self.latent_scale = float(latent_scale)

    def forward(self, sample):
        # diffusers' DiagonalGaussianDistribution: logvar clamped to [-30, 20], std = exp(logvar / 2).
        posterior = self.vae.encode(sample, return_dict=False)[0]
        return posterior.mean * self.latent_scale, posterior.std * self.latent_scale


@register_onnx_config
class VaePosteriorOnnxConfig(VaeEncoderOnnxConfig):
    """The VAE encoder's posterior (image in [-1, 1] -> mean and std, both times `latent_scale`).

    aptp's own export folds ``scaling_factor`` in, so ``latent_mean + latent_std * eps`` is
    exactly what diffusers' img2img draws (``retrieve_latents(..., sample_mode="sample")`` times
    ``scaling_factor``); the runtime draws ``eps`` from the request's seed. The posterior is
    exported, not a sample, so the graph stays deterministic and the randomness stays the
    runtime's. dims, validation shapes and patches as `VaeEncoderOnnxConfig`.
    """

    NAME = "vae_posterior"
    OUTPUT_SHAPES = {"latent_mean": ("batch", "latent_channels", "height", "width"),
                     "latent_std": ("batch", "latent_channels", "height", "width")}

    def wrap(self, model):
        return _VaePosteriorWrapper(model, self.latent_scale)


class _RouterEncoderWrapper(nn.Module):
    """Transformer + pooling + L2 normalisation, as sentence-transformers computes `encode`
    (without the normalisation for the authors' router, which feeds the raw mean)."""

    def __init__(self, transformer: nn.Module, pooling_mode: str, normalize: bool = True):
        super().__init__()
        self.transformer = transformer
        self.pooling_mode = pooling_mode
        self.normalize = normalize

    def forward(self, input_ids, attention_mask):
        tokens = self.transformer(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        if self.pooling_mode == "mean":
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        elif self.pooling_mode == "cls":
            pooled = tokens[:, 0]
        else:  # "max": padded positions must never win
            pooled = tokens.masked_fill(mask == 0, torch.finfo(tokens.dtype).min).amax(dim=1)
        return F.normalize(pooled, p=2.0, dim=-1) if self.normalize else pooled


@register_onnx_config
class RouterEncoderOnnxConfig(OnnxConfig):
    """The router's frozen sentence encoder with its pooling and L2 normalisation, one graph.

    dims: ``batch, sequence, vocab_size, embed_dim``. Always fp32.
    """

    NAME = "router_encoder"
    INPUT_SHAPES = {"input_ids": ("batch", "sequence"), "attention_mask": ("batch", "sequence")}
    OUTPUT_SHAPES = {"sentence_embedding": ("batch", "embed_dim")}
    DYNAMIC_DIMS = frozenset({"batch", "sequence"})
    INPUT_DTYPES = {"input_ids": torch.int64, "attention_mask": torch.int64}
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyTokenInputGenerator,)
    PRECISIONS = ("fp32",)
    POOLING_MODES = ("mean", "cls", "max")

    def __init__(self, dims, precision="fp32", pooling_mode: str = "mean", normalize: bool = True):
        super().__init__(dims, precision)
        self.normalize = bool(normalize)
        mode = pooling_mode.replace("pooling_mode_", "").replace("_tokens", "")
        if mode not in self.POOLING_MODES:
            raise ConfigError(
                f"router encoder pooling {pooling_mode!r} cannot be exported; supported: {', '.join(self.POOLING_MODES)}"
            )
        self.pooling_mode = mode

    @classmethod
    def from_encoder(cls, encoder: Any, sequence: int = 16, batch: int = 2) -> "RouterEncoderOnnxConfig":
        """From an `aptp.train.router.SentenceEncoder` (its transformer, tokenizer and pooling)."""
        return cls({"batch": batch, "sequence": sequence, "vocab_size": len(encoder.tokenizer),
                    "embed_dim": encoder.dim}, pooling_mode=encoder.pooling_mode)

    def validation_dims(self):
        return [dict(self.dims), {**self.dims, "batch": self.dims["batch"] + 1, "sequence": self.dims["sequence"] * 2 + 3}]

    def wrap(self, model):
        return _RouterEncoderWrapper(model, self.pooling_mode, self.normalize)

    @contextmanager
    def patch(self, model):
        with super().patch(model), eager_attention(model):
            yield


class _RouterHeadWrapper(nn.Module):
    """RouterHead's routing scores: group-weighted cosine to every code plus its calibrated bias."""

    def __init__(self, head: nn.Module, code_logits: torch.Tensor, unit_weights: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("code_logits", code_logits.detach().float().clone())
        self.register_buffer("unit_weights", unit_weights.detach().float().clone())

    def forward(self, sentence_embedding):
        return self.head.scores(sentence_embedding, self.code_logits, self.unit_weights)


@register_onnx_config
class RouterHeadOnnxConfig(OnnxConfig):
    """RouterHead + code lookup: ``scores`` (B, K), so the runtime only takes an argmax.

    `wrap` takes ``(head, code_logits (K, N), unit_weights (N,))``. dims: ``batch, embed_dim,
    num_codes``. Always fp32.
    """

    NAME = "router_head"
    INPUT_SHAPES = {"sentence_embedding": ("batch", "embed_dim")}
    OUTPUT_SHAPES = {"scores": ("batch", "num_codes")}
    DYNAMIC_DIMS = frozenset({"batch"})
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyEmbeddingInputGenerator,)
    PRECISIONS = ("fp32",)

    def validation_dims(self):
        return [dict(self.dims), {**self.dims, "batch": self.dims["batch"] * 3 + 1}]

    def wrap(self, model):
        head, code_logits, unit_weights = model
        return _RouterHeadWrapper(head, code_logits, unit_weights)


class DummyPooledEmbeddingInputGenerator(DummyInputGenerator):
    """Unnormalised vectors of a few units of norm, like a mean-pooled MPNet embedding."""

    SUPPORTED_INPUT_NAMES = ("sentence_embedding",)

    def generate(self, name, shape, dims, dtype, generator):
        return (0.5 * torch.randn(shape, generator=generator)).to(dtype)


@register_onnx_config
class ReleaseRouterHeadOnnxConfig(RouterHeadOnnxConfig):
    """An imported release's router head (`aptp.train.release.routing.ReleaseRouterHead`):
    ``sentence_embedding (B, E) -> scores (B, K)``, the runtime takes the argmax as for aptp's.

    `wrap` takes the module itself. Scores pass binarised gates, so a gate value within float
    rounding of 0.5 could flip between PyTorch and onnxruntime; the validation inputs are random
    and such a flip would show as an error of order 0.01, above the tolerance.
    """

    NAME = "release_router_head"
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyPooledEmbeddingInputGenerator,)

    def wrap(self, model):
        return model
