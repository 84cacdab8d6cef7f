"""The exported router: prompt -> sentence embedding -> scores over the K codes -> argmax.

The encoder graph holds the sentence encoder with its pooling and L2 normalisation; the head
graph holds the trained head and the group-weighted cosine to every code, so routing here is
two graph calls and an argmax (DESIGN 1.2: inference assignment is plain argmax).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from aptp.errors import ArtifactError

from .engine import Engine
from .tokenize import PromptTokenizer, TokenBatch

__all__ = ["Router"]

logger = logging.getLogger(__name__)


class Router:
    """Routes prompts to expert codes.

    Args:
        tokenizer: the router encoder's tokenizer (pads to the batch's longest prompt).
        encoder: ``input_ids, attention_mask -> sentence_embedding``.
        head: ``sentence_embedding -> scores`` (B, K).
        num_codes: K, checked against the head's output.
    """

    def __init__(self, tokenizer: PromptTokenizer, encoder: Engine, head: Engine, num_codes: int):
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.head = head
        self.num_codes = int(num_codes)

    def tokenize(self, prompts: Sequence[str]) -> TokenBatch:
        """The encoder's tokens for checked prompts (padded to the longest)."""
        return self.tokenizer(prompts)

    def embed(self, tokens: TokenBatch) -> np.ndarray:
        """Sentence embeddings ``(B, E)`` float32."""
        out = self.encoder.infer({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
        return np.asarray(out["sentence_embedding"], dtype=np.float32)

    def scores(self, prompts: Sequence[str] | TokenBatch) -> np.ndarray:
        """Similarity of each prompt to each code, ``(B, K)`` float32."""
        tokens = prompts if isinstance(prompts, TokenBatch) else self.tokenize(prompts)
        batch = tokens.input_ids.shape[0]
        scores = np.asarray(self.head.infer({"sentence_embedding": self.embed(tokens)})["scores"], np.float32)
        if scores.shape != (batch, self.num_codes):
            raise ArtifactError(f"router head {self.head.path} returned scores of shape {scores.shape}, "
                                f"expected ({batch}, {self.num_codes}); re-export")
        return scores

    def route(self, prompts: Sequence[str] | TokenBatch) -> np.ndarray:
        """The code of each prompt, ``(B,)`` int64: the argmax of `scores` (first on ties)."""
        codes = np.argmax(self.scores(prompts), axis=1).astype(np.int64)
        logger.debug("routed %d prompts: %s", len(codes), codes.tolist())
        return codes
