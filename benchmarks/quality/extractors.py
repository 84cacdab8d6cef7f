"""Feature extractors for the quality metrics: images (and prompts) in, (N, D) features out.

Every extractor takes images as a float array or tensor of shape (N, 3, H, W) with values in
[0, 1] (uint8 arrays in [0, 255] are accepted too), runs them in batches without gradients, and
returns a float32 numpy array of shape (N, D). The metrics in `aptp.benchmarks.quality.metrics`
take those arrays as they are.

- `ClipExtractor`: CLIP image and text embeddings from a `transformers.CLIPModel` (hub id or
  local directory), for CLIP score and CMMD.
- `InceptionExtractor`: the 2048-d pool features of FID's Inception-v3, from a local weights
  file. No package that ships this network works here: pytorch-fid, torch-fidelity and
  torchmetrics[image] all need torchvision, for which no CPU build matching torch 2.13 is
  available, and all of them download the weights at first use. So the network is defined
  here and the weights are a file you provide (see the class docstring).
- `OfflineFeatureExtractor`: any `torch.nn.Module` mapping images to features, e.g. the small
  network trained on the procedural dataset, so that every metric runs without downloads.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from aptp.errors import ArtifactError, ConfigError, DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "ClipExtractor",
    "FeatureExtractor",
    "FidInceptionV3",
    "InceptionExtractor",
    "OfflineFeatureExtractor",
    "TextEmbedder",
]


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images (N, 3, H, W) in [0, 1] to features (N, dim)."""

    name: str
    dim: int

    def __call__(self, images: Any) -> np.ndarray: ...


@runtime_checkable
class TextEmbedder(Protocol):
    """Maps prompts to embeddings (N, dim) in the same space as an image extractor's output."""

    name: str
    dim: int

    def embed_text(self, texts: Sequence[str]) -> np.ndarray: ...


# Range slack for float images: resampling and colour conversion overshoot [0, 1] slightly.
_RANGE_TOLERANCE = 1e-3


def _as_image_batch(images: Any) -> torch.Tensor:
    """Check and convert images to a float32 CPU tensor (N, 3, H, W) with values in [0, 1]."""
    tensor = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    tensor = tensor.detach()
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise DatasetError(f"Images must have shape (N, 3, H, W), got {tuple(tensor.shape)}.")
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if not tensor.is_floating_point():
        raise DatasetError(f"Images must be float in [0, 1] or uint8, got dtype {tensor.dtype}.")
    tensor = tensor.float()
    if tensor.numel():
        low, high = float(tensor.min()), float(tensor.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise DatasetError("Images contain NaN or infinite values.")
        if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
            raise DatasetError(
                f"Images must be in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
                "rescale (x + 1) / 2 for [-1, 1] images or pass uint8."
            )
    return tensor.clamp(0.0, 1.0)


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run_batched(
    images: Any,
    forward: Callable[[torch.Tensor], torch.Tensor],
    *,
    dim: int,
    batch_size: int,
    description: str,
    progress: bool,
) -> np.ndarray:
    """Apply `forward` to [0, 1] image batches and stack its (B, dim) outputs as float32 numpy."""
    batch = _as_image_batch(images)
    outputs = [np.zeros((0, dim), dtype=np.float32)]
    starts = range(0, batch.shape[0], batch_size)
    for start in tqdm(starts, desc=description, disable=not progress or len(starts) <= 1, leave=False):
        with torch.inference_mode():
            features = forward(batch[start : start + batch_size])
        features = features.reshape(features.shape[0], -1).float().cpu().numpy()
        if features.shape[1] != dim:
            raise ConfigError(
                f"{description} produced {features.shape[1]} features per image, expected {dim}: "
                "check the extractor's `dim` or its weights file."
            )
        outputs.append(features)
    return np.concatenate(outputs, axis=0)


def _resize_and_center_crop(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize the shorter side to `size`, then crop the centre `size` x `size` square."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        # antialias: downscaling generated images without it aliases fine texture into the features
        images = F.interpolate(images, size=(new_h, new_w), mode=mode, align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top : top + size, left : left + size]


def _hub_offline() -> bool:
    """Read the offline switches at call time (huggingface_hub reads them once, at import)."""
    return any(
        os.environ.get(variable, "").strip().lower() in {"1", "true", "yes", "on"}
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


# ----------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------


class ClipExtractor:
    """CLIP image and text embeddings (`CLIPModel.get_image_features` / `get_text_features`).

    Args:
        name_or_path: a hub id (e.g. ``"openai/clip-vit-large-patch14"``, the CMMD paper's
            model), a local directory saved with `save_pretrained`, or an already built
            `transformers.CLIPModel`.
        tokenizer: the tokenizer for `embed_text`; loaded from `name_or_path` when it is a
            string, optional when a model object is given (then `embed_text` needs it).
        device: where to run; default CUDA when available, else CPU.
        dtype: weights dtype when loading (float16 is fine on GPU).
        batch_size: images or prompts per forward pass.
        normalize: return L2-normalised embeddings (CMMD and CLIP score use them so).
        local_files_only: never contact the hub; default: true when HF_HUB_OFFLINE or
            TRANSFORMERS_OFFLINE is set.
        progress: show a tqdm bar over batches.

    Preprocessing is done here on tensors instead of through `CLIPProcessor`: the shorter side
    is resized to the vision tower's `image_size` (bicubic, antialiased), the centre square is
    cropped and the channels are normalised with `image_mean`/`image_std` from the model's
    `preprocessor_config.json` (the OpenAI CLIP values when that file is absent).
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike | Any,
        *,
        tokenizer: Any | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        normalize: bool = True,
        revision: str | None = None,
        local_files_only: bool | None = None,
        progress: bool = False,
    ) -> None:
        from transformers import CLIPModel
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
        offline = _hub_offline() if local_files_only is None else local_files_only
        preprocessor: dict[str, Any] = {}
        if isinstance(name_or_path, CLIPModel):
            model = name_or_path
            self.name = str(getattr(model.config, "_name_or_path", "") or "clip")
        else:
            self.name = str(name_or_path)
            model = self._load_model(self.name, dtype=dtype, revision=revision, offline=offline)
            if tokenizer is None:
                tokenizer = self._load_tokenizer(self.name, revision=revision, offline=offline)
            preprocessor = _read_preprocessor_config(self.name, revision=revision, offline=offline)

        self.device = _default_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.normalize = normalize
        self.progress = progress
        self.dim = int(model.config.projection_dim)
        self.image_size = int(model.config.vision_config.image_size)
        self.max_text_length = int(model.config.text_config.max_position_embeddings)
        mean = preprocessor.get("image_mean", OPENAI_CLIP_MEAN)
        std = preprocessor.get("image_std", OPENAI_CLIP_STD)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @staticmethod
    def _load_model(name: str, *, dtype: torch.dtype, revision: str | None, offline: bool) -> Any:
        from transformers import CLIPModel

        try:
            return CLIPModel.from_pretrained(name, dtype=dtype, revision=revision, local_files_only=offline)
        except OSError as err:
            where = "the local Hugging Face cache (offline mode is on)" if offline else "the hub or the local cache"
            raise ConfigError(
                f"Cannot load CLIP model {name!r} from {where}: {err}\nDownload it on a machine with hub "
                f"access (`hf download {name}`) and copy the cache, or pass a local directory holding "
                "its config.json, weights, tokenizer and preprocessor_config.json."
            ) from err

    @staticmethod
    def _load_tokenizer(name: str, *, revision: str | None, offline: bool) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=offline)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"CLIP model {name!r} loaded but its tokenizer did not: {err}. Save the tokenizer next to "
                "the model (`tokenizer.save_pretrained`) or pass `tokenizer=`."
            ) from err

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (N, 3, H, W) -> normalised CLIP pixel values at the model's resolution."""
        pixels = _resize_and_center_crop(images, self.image_size, mode="bicubic").clamp(0.0, 1.0)
        return (pixels - self._mean) / self._std

    def _image_forward(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(batch).to(self.device, self.model.dtype)
        return self._finish(self.model.get_image_features(pixel_values=pixels))

    def _finish(self, output: Any) -> torch.Tensor:
        # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding;
        # 4.x returned the tensor itself.
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        features = features.float()
        return F.normalize(features, dim=-1) if self.normalize else features

    def __call__(self, images: Any) -> np.ndarray:
        """Image embeddings (N, projection_dim), float32."""
        return _run_batched(
            images,
            self._image_forward,
            dim=self.dim,
            batch_size=self.batch_size,
            description=f"CLIP image features ({self.name})",
            progress=self.progress,
        )

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Prompt embeddings (N, projection_dim), float32; prompts longer than the text tower's
        context are truncated, as CLIP score implementations do."""
        if self.tokenizer is None:
            raise ConfigError(f"ClipExtractor {self.name!r} has no tokenizer: pass `tokenizer=` to embed text.")
        if isinstance(texts, str):
            raise ConfigError("embed_text takes a sequence of prompts, got a single string; wrap it in a list.")
        texts = list(texts)
        outputs = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                output = self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
            outputs.append(self._finish(output).cpu().numpy())
        return np.concatenate(outputs, axis=0)


def _read_preprocessor_config(name: str, *, revision: str | None, offline: bool) -> dict[str, Any]:
    """The model's preprocessor_config.json as a dict, or {} when it has none."""
    directory = Path(name)
    if directory.is_dir():
        file = directory / "preprocessor_config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(name, "preprocessor_config.json", revision=revision, local_files_only=offline))
        except Exception as err:  # the file is optional: any lookup failure means "use defaults"
            logger.info("No preprocessor_config.json for %s (%s); using the OpenAI CLIP mean/std.", name, err)
            return {}
    if not file.is_file():
        logger.info("No preprocessor_config.json in %s; using the OpenAI CLIP mean/std.", directory)
        return {}
    return json.loads(file.read_text())


# ----------------------------------------------------------------------------------------------
# Inception-v3 (FID)
# ----------------------------------------------------------------------------------------------


class _ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as in the TF graph), ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int], stride: int = 1, padding: Any = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # The TF graph averages only over valid pixels at the border (count_include_pad=False):
    # the main difference between FID's Inception and torchvision's.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _Mixed35(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        five = self.branch5x5_2(self.branch5x5_1(x))
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), five, double, self.branch_pool(_avg_pool_3x3(x))], dim=1)


class _Reduce35To17(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class _Mixed17(nn.Module):
    """17x17 block with 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, **row)
        self.branch7x7_3 = _ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = _ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = _ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = _ConvBN(c7, 192, **row)
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = x
        for index in range(1, 6):
            double = getattr(self, f"branch7x7dbl_{index}")(double)
        return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(_avg_pool_3x3(x))], dim=1)


class _Reduce17To8(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_2(self.branch3x3_1(x))
        seven = x
        for index in range(1, 5):
            seven = getattr(self, f"branch7x7x3_{index}")(seven)
        return torch.cat([three, seven, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class _Mixed8(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs. The last one of FID's network max-pools its pool
    branch (a quirk of the 2015 TF graph that FID implementations keep)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_1(x)
        three = torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], dim=1)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        double = torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], dim=1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), three, double, self.branch_pool(pooled)], dim=1)


class FidInceptionV3(nn.Module):
    """Inception-v3 as FID uses it, up to the 2048-d global average pool.

    Input: (N, 3, 299, 299) scaled to [-1, 1]. Output: (N, 2048). Submodule names follow the
    common PyTorch port of the TF 2015-12-05 graph, so its state dicts (pytorch-fid's
    ``pt_inception-2015-12-05-*.pth``, torch-fidelity's ``weights-inception-2015-12-05-*.pth``)
    load as they are; their classifier (``fc.*``) is not needed and is ignored.
    """

    feature_dim = 2048
    input_size = 299

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _Mixed35(192, pool_features=32)
        self.Mixed_5c = _Mixed35(256, pool_features=64)
        self.Mixed_5d = _Mixed35(288, pool_features=64)
        self.Mixed_6a = _Reduce35To17(288)
        self.Mixed_6b = _Mixed17(768, channels_7x7=128)
        self.Mixed_6c = _Mixed17(768, channels_7x7=160)
        self.Mixed_6d = _Mixed17(768, channels_7x7=160)
        self.Mixed_6e = _Mixed17(768, channels_7x7=192)
        self.Mixed_7a = _Reduce17To8(768)
        self.Mixed_7b = _Mixed8(1280, max_pool=False)
        self.Mixed_7c = _Mixed8(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{block}")(x)
        return x.mean(dim=(2, 3))


# Keys in FID weight files that the feature network does not use.
_IGNORED_PREFIXES = ("fc.", "AuxLogits.")


def load_fid_inception_state_dict(model: FidInceptionV3, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load an Inception state dict, ignoring the classifier; raise ArtifactError on a mismatch."""
    fc_weight = state_dict.get("fc.weight")
    if fc_weight is not None and fc_weight.shape[0] != 1008:
        logger.warning(
            "%s has a %d-class classifier: these look like torchvision's ImageNet Inception weights, not "
            "FID's 2015-12-05 TF weights (1008 classes); FID values will not be comparable to published ones.",
            source,
            fc_weight.shape[0],
        )
    kept = {key: value for key, value in state_dict.items() if not key.startswith(_IGNORED_PREFIXES)}
    result = model.load_state_dict(kept, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ArtifactError(
            f"{source} is not an Inception-v3 state dict in the FID layout: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all)."
        )


class InceptionExtractor:
    """FID's Inception-v3 pool features (2048-d) from a local weights file.

    `weights_path` may be:
    - a ``.safetensors`` file or a ``torch.save``-d state dict (``.pth``/``.pt``) in the layout
      of `FidInceptionV3`, e.g. pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a plain
      state dict; `safetensors.torch.save_file` converts it). Images are resized to 299x299
      bilinearly and scaled to [-1, 1], as pytorch-fid does.
    - a TorchScript archive. NVIDIA's ``inception-2015-12-05.pt`` (StyleGAN2-ADA / EDM metrics)
      is recognised by its ``return_features`` argument and fed uint8 images at their own size
      (it resizes internally); any other TorchScript module gets the same 299x299 [-1, 1] input
      as the state-dict path and must return 2048 features per image.

    These files cannot be downloaded here. Without them, FID is computed with the
    `OfflineFeatureExtractor` or CLIP features, and must be labelled as such.
    """

    name = "inception-v3-fid"
    dim = FidInceptionV3.feature_dim

    def __init__(
        self,
        weights_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 50,
        progress: bool = False,
    ) -> None:
        path = Path(weights_path)
        if not path.is_file():
            raise ConfigError(
                f"Inception weights file {str(path)!r} does not exist. FID's Inception-v3 cannot be "
                "downloaded here: provide pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or its "
                "safetensors conversion) or NVIDIA's TorchScript inception-2015-12-05.pt, or use "
                "OfflineFeatureExtractor / ClipExtractor features instead."
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
        self.weights_path = path
        self.device = _default_device(device)
        self.batch_size = batch_size
        self.progress = progress
        self.model, self.script_wants_uint8 = _load_inception(path)
        self.model = self.model.to(self.device).eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the network's input."""
        if self.script_wants_uint8:
            return (images * 255.0).round().to(torch.uint8)
        size = FidInceptionV3.input_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return 2.0 * images - 1.0

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = self.preprocess(batch).to(self.device)
        if self.script_wants_uint8:
            return self.model(inputs, return_features=True)
        return self.model(inputs)

    def __call__(self, images: Any) -> np.ndarray:
        """Pool features (N, 2048), float32."""
        return _run_batched(
            images,
            self._forward,
            dim=self.dim,
            batch_size=self.batch_size,
            description="Inception features",
            progress=self.progress,
        )


def _load_inception(path: Path) -> tuple[nn.Module, bool]:
    """Load a weights file as (module, whether it is NVIDIA-style TorchScript taking uint8)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        model = FidInceptionV3()
        load_fid_inception_state_dict(model, load_file(str(path)), str(path))
        return model, False
    try:
        # TorchScript is deprecated in torch but is the format the public FID Inception ships in.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            script = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError:
        script = None  # not TorchScript: a pickled state dict
    if script is not None:
        arguments = {argument.name for argument in script.forward.schema.arguments}
        return script, "return_features" in arguments
    try:
        state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ArtifactError(f"{path} is neither TorchScript, safetensors nor a torch state dict: {err}") from err
    if not isinstance(state_dict, dict):
        raise ArtifactError(f"{path} holds a {type(state_dict).__name__}, expected an Inception state dict.")
    model = FidInceptionV3()
    load_fid_inception_state_dict(model, state_dict, str(path))
    return model, False


# ----------------------------------------------------------------------------------------------
# Offline extractor
# ----------------------------------------------------------------------------------------------


class OfflineFeatureExtractor:
    """Wrap any `torch.nn.Module` that maps images to features, so every metric runs offline.

    Args:
        module: takes (B, 3, H, W) float images prepared as below and returns a tensor (B, D)
            (outputs with more dimensions are flattened per image).
        name: recorded in reports next to the metric, e.g. ``"procedural-encoder"``.
        dim: feature size; inferred from one forward pass on a blank image when omitted.
        image_size: resize (bilinear, antialiased) to this square size first; default: as given.
        mean, std: per-channel normalisation after resizing; default: none ([0, 1] input).
        device: where to run; default: the module's current device (it is not moved).
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        name: str = "offline",
        dim: int | None = None,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ConfigError(f"OfflineFeatureExtractor wraps a torch.nn.Module, got {type(module).__name__}.")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
        if (mean is None) != (std is None):
            raise ConfigError("Pass both `mean` and `std` for normalisation, or neither.")
        if device is None:
            parameter = next(module.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.name = name
        self.image_size = image_size
        self.batch_size = batch_size
        self.progress = progress
        self._mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.dim = int(dim) if dim is not None else self._probe_dim()

    def _probe_dim(self) -> int:
        size = self.image_size or 32
        try:
            with torch.inference_mode():
                output = self._forward(torch.zeros(1, 3, size, size))
        except Exception as err:
            raise ConfigError(
                f"Could not infer the feature size of {self.name!r} from a 1x3x{size}x{size} input ({err}); "
                "pass `dim=` (and `image_size=` if the module needs a fixed resolution)."
            ) from err
        return int(output.reshape(1, -1).shape[1])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_size is not None and images.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        if self._mean is not None:
            images = (images - self._mean) / self._std
        return images

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        output = self.module(self.preprocess(batch).to(self.device))
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"The module wrapped as {self.name!r} returned {type(output).__name__}; it must return a "
                "(B, D) tensor (wrap it to select the feature output)."
            )
        return output

    def __call__(self, images: Any) -> np.ndarray:
        """Features (N, dim), float32."""
        return _run_batched(
            images,
            self._forward,
            dim=self.dim,
            batch_size=self.batch_size,
            description=f"{self.name} features",
            progress=self.progress,
        )
