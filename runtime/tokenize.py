"""Prompt checks and tokenisation with the `tokenizers` library, from an exported ``tokenizer.json``.

The exported files are the ones the models were trained with, so ``tokenizers`` reproduces
transformers' fast tokenizers exactly (normaliser, pre-tokeniser, special-token template).
The diffusion text encoder pads every prompt to its fixed length, as diffusers does; the router
pads to the batch's longest prompt, as sentence-transformers does (its mean pooling ignores
padding either way).

A prompt longer than the text encoder's ``max_length`` tokens is truncated with a warning, as
diffusers' pipelines do (``truncation=True`` at ``model_max_length``, then a logged warning
naming the cut); `TokenBatch.truncated` and ``GenerationResult.truncated`` report it. Prompts
over `MAX_PROMPT_CHARS` characters are refused outright, so a request cannot spend its time
tokenising megabytes that would be cut anyway. Tokenizer files are parsed from the bytes that
were hashed against the manifest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aptp.errors import ArtifactError, RuntimeInputError
from aptp.export.manifest import read_verified

__all__ = ["MAX_PROMPT_CHARS", "PromptTokenizer", "TokenBatch", "check_prompts", "check_text"]

logger = logging.getLogger(__name__)

#: The longest prompt accepted, in characters (CLIP's 77 tokens are a few hundred characters).
MAX_PROMPT_CHARS = 100_000
#: The longest token sequence a tokenizer may be configured for (T5 uses 512, CLIP 77).
MAX_TOKENS = 8192


def check_text(text: object, name: str, allow_blank: bool = False) -> str:
    """`text` if it is a prompt aptp can encode; `name` says which input it is in the message.
    `allow_blank` accepts empty and whitespace-only text (a negative prompt may be empty).

    Raises:
        RuntimeInputError: bytes, a non-string, no characters other than whitespace, more than
            `MAX_PROMPT_CHARS` characters, or a string that is not valid Unicode (a lone
            surrogate: what JSON's ``\\ud800`` escape or undecodable bytes on a command line give).
    """
    if isinstance(text, (bytes, bytearray)):
        raise RuntimeInputError(f"{name} is bytes, not text: decode it first (prompt.decode('utf-8'))")
    if not isinstance(text, str):
        raise RuntimeInputError(f"{name} must be a string, got {type(text).__name__}")
    if not allow_blank and not text.strip():
        what = "has 0 characters" if not text else "is only whitespace"
        raise RuntimeInputError(f"{name} {what}: every prompt needs some text to condition on")
    if len(text) > MAX_PROMPT_CHARS:
        # Longer prompts are truncated to the encoder's tokens anyway (as diffusers does);
        # this only stops a request from spending its time tokenising megabytes.
        raise RuntimeInputError(f"{name} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are "
                                "accepted (the text encoder reads only its first tokens)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        # Checked here, not in the tokenizer: a request batched with others must fail alone.
        raise RuntimeInputError(f"{name} is not valid Unicode text: it holds the lone surrogate "
                                f"U+{ord(text[err.start]):04X} at character {err.start} (undecodable bytes, or a "
                                "JSON \\u escape of half a pair); send UTF-8 text") from None
    return text


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """The prompts as a list of non-empty strings; one string is a batch of one.

    Raises:
        RuntimeInputError: an empty list, a non-string (bytes must be decoded first), or a prompt
            with no characters other than whitespace.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
        raise RuntimeInputError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise RuntimeInputError("the prompt list is empty: pass at least one prompt")
    for i, prompt in enumerate(prompts):
        check_text(prompt, f"prompt {i}")
    return prompts


@dataclass(frozen=True)
class TokenBatch:
    """Token ids and attention mask ``(B, L)`` (int64), and which prompts were truncated."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    truncated: tuple[bool, ...]


class PromptTokenizer:
    """A ``tokenizers.Tokenizer`` with the model's truncation and padding.

    Args:
        path: the ``tokenizer.json``.
        max_length: tokens per prompt, special tokens included; longer prompts are truncated.
        pad_token_id: id padded with; ``None`` reads it from the file's padding settings, else 0.
        pad_to_max_length: pad every prompt to `max_length` (the text encoder's fixed length)
            instead of to the longest prompt of the batch.
        warn_truncation: log a warning per truncated prompt (the text encoder's limit is one
            users should hear about; the router's is not).
        name: what the tokenizer is for, in log messages.
    """

    def __init__(self, path: str | os.PathLike, max_length: int, pad_token_id: int | None = None,
                 pad_to_max_length: bool = True, warn_truncation: bool = True, name: str = "tokenizer",
                 sha256: str | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.name = name
        self.max_length = int(max_length)
        self.warn_truncation = warn_truncation
        if not 1 <= self.max_length <= MAX_TOKENS:
            raise ArtifactError(f"{name} max_length must be in [1, {MAX_TOKENS}], got {max_length!r}")
        # Parsed from the bytes that were hashed (see aptp.export.manifest.read_verified).
        data = read_verified(self.path, sha256, f"{name} tokenizer")
        try:
            self.tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # tokenizers raises plain Exception for malformed files
            raise ArtifactError(f"cannot read tokenizer {self.path}: {err}; re-export") from err
        saved = self.tokenizer.padding or {}
        if pad_token_id is None:
            pad_token_id = int(saved.get("pad_id", 0))
        self.pad_token_id = int(pad_token_id)
        pad_token = self.tokenizer.id_to_token(self.pad_token_id) or saved.get("pad_token", "[PAD]")
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.enable_padding(
            pad_id=self.pad_token_id, pad_token=pad_token, length=self.max_length if pad_to_max_length else None
        )

    def __call__(self, prompts: Sequence[str]) -> TokenBatch:
        """Tokenise checked prompts (see `check_prompts`)."""
        encodings = self.tokenizer.encode_batch(list(prompts))
        truncated = tuple(bool(e.overflowing) for e in encodings)
        if self.warn_truncation:
            for i, cut in enumerate(truncated):
                if cut:
                    logger.warning("prompt %d is longer than the %s's %d tokens and was truncated: %r...",
                                   i, self.name, self.max_length, prompts[i][:60])
        return TokenBatch(
            input_ids=np.array([e.ids for e in encodings], dtype=np.int64),
            attention_mask=np.array([e.attention_mask for e in encodings], dtype=np.int64),
            truncated=truncated,
        )
