"""Read an export directory into typed, validated records, without torch.

`load_artifacts` verifies the manifest first (format, version, the sha256 of every listed
file: `aptp.export.manifest.read_manifest`, which is torch-free) and then checks every entry
the runtime uses, so a malformed manifest fails here with the key that is wrong rather than
deep inside a model call. Paths in the records are absolute.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aptp.errors import ArtifactError
from aptp.export.manifest import MANIFEST_FILE, read_manifest

from .scheduler import SchedulerTable

__all__ = [
    "DENSE",
    "ExportArtifacts",
    "ModelFile",
    "TokenizerFile",
    "load_artifacts",
]

logger = logging.getLogger(__name__)

#: The model key of the dense (unpruned) UNet; experts are keyed by their integer code.
DENSE = "dense"


@dataclass(frozen=True)
class ModelFile:
    """One exported graph: its ONNX file, an optional TensorRT plan, and what the export
    recorded about it (``macs_ratio``/``share`` only for UNets)."""

    onnx: Path
    max_abs_error: float | None = None
    tensorrt: Path | None = None
    macs_ratio: float | None = None
    share: float | None = None


@dataclass(frozen=True)
class TokenizerFile:
    """A ``tokenizer.json`` and how to pad and truncate for its model."""

    path: Path
    max_length: int
    pad_token_id: int | None = None


@dataclass(frozen=True)
class ExportArtifacts:
    """Everything the runtime reads from one export directory.

    ``experts`` maps each code to its UNet; ``dense`` is the unpruned UNet or ``None`` when the
    export left it out. ``image``/``latent`` sizes are the export's nominal ones.
    """

    root: Path
    manifest: dict[str, Any]
    base_model: str
    num_codes: int
    precision: str
    image_height: int
    image_width: int
    min_size: int | None
    max_size: int | None
    size_multiple: int
    latent_channels: int
    latent_height: int
    latent_width: int
    vae_scaling_factor: float
    vae_scale_factor: int
    tokenizer: TokenizerFile
    text_encoder: ModelFile
    text_hidden_size: int
    router_tokenizer: TokenizerFile
    router_encoder: ModelFile
    router_head: ModelFile
    experts: dict[int, ModelFile]
    dense: ModelFile | None
    vae_decoder: ModelFile
    scheduler: SchedulerTable
    guidance_scale: float
    max_batch: int

    def unet(self, key: int | str) -> ModelFile:
        """The UNet of expert `key` (an int code) or of the dense model (``"dense"``)."""
        if key == DENSE:
            if self.dense is None:
                raise ArtifactError(f"export {self.root} has no dense UNet (it was exported without one)")
            return self.dense
        if key not in self.experts:
            raise ArtifactError(f"export {self.root} has no expert {key!r}; codes: {sorted(self.experts)}")
        return self.experts[key]

    @property
    def model_keys(self) -> list[int | str]:
        """Every UNet of the export: the expert codes, then ``"dense"`` when present."""
        return [*sorted(self.experts), *([DENSE] if self.dense is not None else [])]


class _Reader:
    """Typed access to the manifest's entries; every error names the key path and the file."""

    def __init__(self, root: Path, manifest: Mapping[str, Any]):
        self.root = root
        self.where = root / MANIFEST_FILE
        self.manifest = manifest

    def fail(self, key: str, what: str) -> ArtifactError:
        return ArtifactError(f"{self.where}: {key} {what}; re-export with aptp-export")

    def node(self, node: Mapping[str, Any], key: str, path: str) -> Any:
        if not isinstance(node, Mapping) or key not in node:
            raise self.fail(f"{path}.{key}" if path else key, "is missing")
        return node[key]

    def section(self, node: Mapping[str, Any], key: str, path: str = "") -> Mapping[str, Any]:
        value = self.node(node, key, path)
        if not isinstance(value, Mapping):
            raise self.fail(_join(path, key), f"must be a JSON object, got {type(value).__name__}")
        return value

    def integer(self, node: Mapping[str, Any], key: str, path: str = "", minimum: int = 1,
                optional: bool = False) -> int | None:
        if optional and node.get(key) is None:
            return None
        value = self.node(node, key, path)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(_join(path, key), f"must be an integer >= {minimum}, got {value!r}")
        return value

    def number(self, node: Mapping[str, Any], key: str, path: str = "", optional: bool = False,
               positive: bool = False) -> float | None:
        if optional and node.get(key) is None:
            return None
        value = self.node(node, key, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(_join(path, key), f"must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise self.fail(_join(path, key), f"must be > 0, got {value!r}")
        return float(value)

    def file(self, node: Mapping[str, Any], key: str, path: str = "", optional: bool = False) -> Path | None:
        if optional and node.get(key) is None:
            return None
        rel = self.node(node, key, path)
        if not isinstance(rel, str) or not rel:
            raise self.fail(_join(path, key), f"must be a relative file path, got {rel!r}")
        # read_manifest has checked every hashed file; a path outside that table is refused there.
        if rel not in self.manifest.get("files", {}):
            raise self.fail(_join(path, key), f"names {rel!r}, which the manifest does not hash")
        return self.root / rel

    def model(self, node: Mapping[str, Any], path: str, file_key: str = "file") -> ModelFile:
        return ModelFile(
            onnx=self.file(node, file_key, path),
            max_abs_error=self.number(node, "max_abs_error", path, optional=True),
            tensorrt=self.file(node, "tensorrt", path, optional=True),
            macs_ratio=self.number(node, "macs_ratio", path, optional=True),
            share=self.number(node, "share", path, optional=True),
        )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def load_artifacts(root: str | os.PathLike, verify: bool = True) -> ExportArtifacts:
    """Verify and read the export at `root` (what ``aptp-export`` wrote).

    Args:
        root: the export directory.
        verify: recompute every file's sha256 (default). ``False`` only checks that the files
            exist: for listings, never for serving.

    Raises:
        ArtifactError: no manifest, another format version, a missing or tampered file, or an
            entry the runtime needs that is missing or malformed.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ArtifactError(f"export directory {root} does not exist; pass the directory aptp-export wrote")
    manifest = read_manifest(root, verify=verify)
    r = _Reader(root, manifest)

    num_codes = r.integer(manifest, "num_codes")
    precision = r.node(manifest, "precision", "")
    if precision not in ("fp32", "fp16"):
        raise r.fail("precision", f"must be 'fp32' or 'fp16', got {precision!r}")
    image = r.section(manifest, "image")
    latent = r.section(manifest, "latent")
    vae = r.section(manifest, "vae")

    tok = r.section(manifest, "tokenizer")
    tokenizer = TokenizerFile(
        path=r.file(tok, "file", "tokenizer"),
        max_length=r.integer(tok, "max_length", "tokenizer"),
        pad_token_id=r.integer(tok, "pad_token_id", "tokenizer", minimum=0, optional=True),
    )
    text = r.section(manifest, "text_encoder")

    router = r.section(manifest, "router")
    encoder = r.section(router, "encoder", "router")
    router_tokenizer = TokenizerFile(
        path=r.file(encoder, "tokenizer", "router.encoder"),
        max_length=r.integer(encoder, "max_length", "router.encoder"),
        pad_token_id=r.integer(encoder, "pad_token_id", "router.encoder", minimum=0, optional=True),
    )

    entries = r.node(manifest, "experts", "")
    if not isinstance(entries, list) or not entries:
        raise r.fail("experts", "must be a non-empty list")
    experts: dict[int, ModelFile] = {}
    for n, entry in enumerate(entries):
        code = r.integer(entry, "code", f"experts[{n}]", minimum=0)
        if code >= num_codes or code in experts:
            raise r.fail(f"experts[{n}].code", f"is {code}: codes must be distinct and below num_codes={num_codes}")
        experts[code] = r.model(entry, f"experts[{n}]", file_key="unet")
    dense_entry = manifest.get("dense")
    dense = r.model(dense_entry, "dense", file_key="unet") if dense_entry is not None else None

    table = SchedulerTable.from_dict(r.node(manifest, "scheduler", ""), source=f"{r.where}: scheduler")
    artifacts = ExportArtifacts(
        root=root,
        manifest=manifest,
        base_model=str(manifest.get("base_model", "")),
        num_codes=num_codes,
        precision=precision,
        image_height=r.integer(image, "height", "image"),
        image_width=r.integer(image, "width", "image"),
        min_size=r.integer(image, "min_size", "image", optional=True),
        max_size=r.integer(image, "max_size", "image", optional=True),
        size_multiple=r.integer(image, "size_multiple", "image", optional=True) or r.integer(vae, "scale_factor", "vae"),
        latent_channels=r.integer(latent, "channels", "latent"),
        latent_height=r.integer(latent, "height", "latent"),
        latent_width=r.integer(latent, "width", "latent"),
        vae_scaling_factor=r.number(vae, "scaling_factor", "vae", positive=True),
        vae_scale_factor=r.integer(vae, "scale_factor", "vae"),
        tokenizer=tokenizer,
        text_encoder=r.model(text, "text_encoder"),
        text_hidden_size=r.integer(text, "hidden_size", "text_encoder"),
        router_tokenizer=router_tokenizer,
        router_encoder=r.model(encoder, "router.encoder"),
        router_head=r.model(r.section(router, "head", "router"), "router.head"),
        experts=experts,
        dense=dense,
        vae_decoder=r.model(r.section(manifest, "vae_decoder"), "vae_decoder"),
        scheduler=table,
        guidance_scale=r.number(manifest, "guidance_scale"),
        max_batch=r.integer(manifest, "max_batch"),
    )
    missing = sorted(set(range(num_codes)) - set(experts))
    if missing:
        # A code without an expert cannot serve the prompts routed to it.
        raise r.fail("experts", f"has no entry for codes {missing} of num_codes={num_codes}")
    logger.info("loaded export %s: %d experts%s, %s, %d-step %s sampler", root, len(experts),
                " + dense" if dense else "", precision, table.num_steps, table.name)
    return artifacts
