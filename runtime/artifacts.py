"""Read an export directory into typed, validated records, without torch.

`load_artifacts` verifies the manifest first (format, version, the sha256 of every listed
file: `aptp.export.manifest.read_manifest`, which is torch-free) and then checks every entry
the runtime uses, so a malformed manifest fails here with the key that is wrong rather than
deep inside a model call. Paths in the records are absolute.

Nothing from the manifest is trusted beyond what it can break: every file it names must stay
inside the export (no absolute path, no ``..``, no symlink leading out), every number must lie
in a sane range (`LIMITS`), and the engines hash each file again when they actually read it
(`ExportArtifacts.sha256`), so a file swapped after this check is refused at load.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aptp.errors import ArtifactError
from aptp.export.manifest import MANIFEST_FILE, contained_path, read_manifest

from .scheduler import SchedulerTable

__all__ = [
    "DENSE",
    "LIMITS",
    "ExportArtifacts",
    "ModelFile",
    "TokenizerFile",
    "load_artifacts",
]

logger = logging.getLogger(__name__)

#: The model key of the dense (unpruned) UNet; experts are keyed by their integer code.
DENSE = "dense"

#: ``(low, high)``, both inclusive, for the manifest's numbers. Wide enough for any real
#: export (SD 1.x/2.x/XL, SD3-sized latents, T5-length text), narrow enough that a tampered
#: value fails here instead of exhausting memory or producing garbage downstream.
LIMITS: dict[str, tuple[float, float]] = {
    "num_codes": (1, 1024),
    "image_size": (8, 8192),             # pixels, each side
    "size_multiple": (1, 512),
    "latent_channels": (1, 64),
    "latent_size": (1, 1024),            # latent pixels, each side
    "vae_scaling_factor": (1e-4, 1e4),   # SD: 0.18215, SD3: 1.5305
    "vae_scale_factor": (1, 64),         # SD: 8
    "max_length": (1, 8192),             # tokens (CLIP 77, T5 512, MiniLM 256)
    "token_id": (0, 2**31 - 1),
    "hidden_size": (1, 65536),
    "guidance_scale": (0.0, 100.0),
    "max_batch": (1, 1024),
    "macs_ratio": (0.0, 2.0),
    "share": (0.0, 1.0),
    "max_abs_error": (0.0, 1e6),
    "scheduler_value": (-1e6, 1e6),      # every per-step table entry and init_noise_sigma
}


@dataclass(frozen=True)
class ModelFile:
    """One exported graph: its ONNX file, an optional TensorRT plan, and what the export
    recorded about it (``macs_ratio``/``share`` only for UNets)."""

    onnx: Path
    max_abs_error: float | None = None
    tensorrt: Path | None = None
    macs_ratio: float | None = None
    share: float | None = None
    external_data: Path | None = None
    int8: "ModelFile | None" = None  # the int8 version `aptp-export --quantize int8` wrote (UNets only)
    cpu_graph: "ModelFile | None" = None  # the graph `aptp-export --cpu-graphs` optimised for CPU sessions


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
    #: The VAE encoder's posterior graph (img2img, inpainting); ``None`` for an export made before it.
    vae_encoder: ModelFile | None = None

    def unet(self, key: int | str) -> ModelFile:
        """The UNet of expert `key` (an int code) or of the dense model (``"dense"``)."""
        if key == DENSE:
            if self.dense is None:
                raise ArtifactError(f"export {self.root} has no dense UNet (it was exported without one)")
            return self.dense
        if key not in self.experts:
            raise ArtifactError(f"export {self.root} has no expert {key!r}; codes: {sorted(self.experts)}")
        return self.experts[key]

    def sha256(self, path: str | os.PathLike) -> str | None:
        """The manifest's sha256 of `path` (an absolute path of a record), for checking the bytes
        when the file is read; ``None`` for a path the manifest does not hash."""
        try:
            rel = Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return None
        return self.manifest.get("files", {}).get(rel)

    def external_weights(self, graph: str | os.PathLike) -> list[tuple[Path, str | None]]:
        """``[(path, sha256)]`` of the external weight file of the ONNX `graph`, if it has one."""
        models = [self.text_encoder, self.router_encoder, self.router_head, self.vae_decoder,
                  *([self.vae_encoder] if self.vae_encoder is not None else []),
                  *self.experts.values(), *([self.dense] if self.dense is not None else [])]
        models += [alt for m in models for alt in (m.int8, m.cpu_graph) if alt is not None]
        return [(m.external_data, self.sha256(m.external_data)) for m in models
                if m.onnx == Path(graph) and m.external_data is not None]

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
                optional: bool = False, limit: str | None = None) -> int | None:
        if optional and node.get(key) is None:
            return None
        value = self.node(node, key, path)
        low, high = LIMITS[limit] if limit else (minimum, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bounds = f"in [{int(low)}, {int(high)}]" if high is not None else f">= {low}"
            raise self.fail(_join(path, key), f"must be an integer {bounds}, got {value!r}")
        return value

    def number(self, node: Mapping[str, Any], key: str, path: str = "", optional: bool = False,
               positive: bool = False, limit: str | None = None) -> float | None:
        if optional and node.get(key) is None:
            return None
        value = self.node(node, key, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(_join(path, key), f"must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise self.fail(_join(path, key), f"must be > 0, got {value!r}")
        if positive and abs(value) < sys.float_info.min:
            raise self.fail(_join(path, key), f"must be a normal float, got the denormal {value!r}")
        if limit is not None:
            low, high = LIMITS[limit]
            if not low <= value <= high:
                raise self.fail(_join(path, key), f"must be in [{low:g}, {high:g}], got {value!r}")
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
        return contained_path(self.root, rel, _join(path, key))

    def model(self, node: Mapping[str, Any], path: str, file_key: str = "file") -> ModelFile:
        int8 = node.get("int8") if isinstance(node, Mapping) else None
        cpu_graph = node.get("cpu_graph") if isinstance(node, Mapping) else None
        return ModelFile(
            onnx=self.file(node, file_key, path),
            max_abs_error=self.number(node, "max_abs_error", path, optional=True, limit="max_abs_error"),
            tensorrt=self.file(node, "tensorrt", path, optional=True),
            macs_ratio=self.number(node, "macs_ratio", path, optional=True, positive=True, limit="macs_ratio"),
            share=self.number(node, "share", path, optional=True, limit="share"),
            external_data=self.file(node, "external_data", path, optional=True),
            int8=None if int8 is None else self.int8(node, path),
            cpu_graph=None if cpu_graph is None else self.cpu_graph(node, path),
        )

    def alternate(self, node: Mapping[str, Any], name: str, path: str) -> tuple[ModelFile, Mapping[str, Any]]:
        """Another graph of a UNet listed under `name` in its entry (``int8``, ``cpu_graph``):
        its file, hashed; its recorded size and sha256 must be those of the file."""
        where = _join(path, name)
        entry = self.section(node, name, path)
        model = self.model(entry, where, "unet")
        self.integer(entry, "bytes", where, optional=True)
        sha = entry.get("sha256")
        if sha is not None and sha != self.manifest["files"].get(entry["unet"]):
            raise self.fail(_join(where, "sha256"), "differs from the hash of its file in the files table")
        return model, entry

    def cpu_graph(self, node: Mapping[str, Any], path: str) -> ModelFile:
        """The CPU graph of a UNet (`aptp.export.cpu_graphs`), as `alternate` checks it, with
        the difference to the exported graph it was checked at."""
        model, entry = self.alternate(node, "cpu_graph", path)
        self.number(entry, "max_abs_diff", _join(path, "cpu_graph"), optional=True, limit="max_abs_error")
        return model

    def int8(self, node: Mapping[str, Any], path: str) -> ModelFile:
        """The int8 UNet beside an fp32 one (`aptp.export.quantize`), as `alternate` checks it,
        with finite errors."""
        model, entry = self.alternate(node, "int8", path)
        where = _join(path, "int8")
        error = entry.get("error")
        if error is not None:
            if not isinstance(error, Mapping):
                raise self.fail(_join(where, "error"), f"must be a JSON object, got {type(error).__name__}")
            for key in ("latents_mean_abs", "pixels_mean_abs"):
                self.number(error, key, _join(where, "error"), optional=True)
        return model


def _check_table_bounds(r: _Reader, table: SchedulerTable) -> None:
    """Finite is not enough: a coefficient of 1e300 overflows float32 latents to inf/NaN."""
    low, high = LIMITS["scheduler_value"]
    if not 0 < table.init_noise_sigma <= high:
        raise r.fail("scheduler.init_noise_sigma", f"must be in (0, {high:g}], got {table.init_noise_sigma!r}")
    for key in ("timesteps", "input_scale", "coef_sample", "coef_model", "coef_prev_sample", "coef_prev_model",
                "coef_older_models"):
        values = getattr(table, key).reshape(-1)  # PLMS's older weights: row-major (call, k)
        outside = (values < low) | (values > high)
        if outside.any():
            i = int(outside.argmax())
            raise r.fail(f"scheduler.{key}[{i}]", f"is {float(values[i])!r}, outside [{low:g}, {high:g}]")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def load_artifacts(root: str | os.PathLike, verify: bool = True, trusted_key: Any = None) -> ExportArtifacts:
    """Verify and read the export at `root` (what ``aptp-export`` wrote).

    Args:
        root: the export directory.
        verify: recompute every file's sha256 now (default). ``False`` only checks that the
            files exist; either way the engines hash each file again when they read it.
        trusted_key: an Ed25519 public key (PEM file path, PEM or raw bytes, or key object):
            the manifest must be signed by it (``aptp-export --sign``; needs ``cryptography``).

    Raises:
        ArtifactError: no manifest, another format version, a missing or tampered file, a path
            leading out of the export, a value outside `LIMITS`, an entry the runtime needs that
            is missing or malformed, or (with `trusted_key`) a missing or invalid signature.
        ConfigError: `trusted_key` cannot be read, or ``cryptography`` is not installed.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise ArtifactError(f"export directory {root} {what}; pass the directory aptp-export wrote")
    manifest = read_manifest(root, verify=verify, trusted_key=trusted_key)
    r = _Reader(root, manifest)

    num_codes = r.integer(manifest, "num_codes", limit="num_codes")
    precision = r.node(manifest, "precision", "")
    if precision not in ("fp32", "fp16"):
        raise r.fail("precision", f"must be 'fp32' or 'fp16', got {precision!r}")
    image = r.section(manifest, "image")
    latent = r.section(manifest, "latent")
    vae = r.section(manifest, "vae")

    tok = r.section(manifest, "tokenizer")
    tokenizer = TokenizerFile(
        path=r.file(tok, "file", "tokenizer"),
        max_length=r.integer(tok, "max_length", "tokenizer", limit="max_length"),
        pad_token_id=r.integer(tok, "pad_token_id", "tokenizer", optional=True, limit="token_id"),
    )
    text = r.section(manifest, "text_encoder")

    router = r.section(manifest, "router")
    encoder = r.section(router, "encoder", "router")
    router_tokenizer = TokenizerFile(
        path=r.file(encoder, "tokenizer", "router.encoder"),
        max_length=r.integer(encoder, "max_length", "router.encoder", limit="max_length"),
        pad_token_id=r.integer(encoder, "pad_token_id", "router.encoder", optional=True, limit="token_id"),
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
    _check_table_bounds(r, table)
    artifacts = ExportArtifacts(
        root=root,
        manifest=manifest,
        base_model=str(manifest.get("base_model", "")),
        num_codes=num_codes,
        precision=precision,
        image_height=r.integer(image, "height", "image", limit="image_size"),
        image_width=r.integer(image, "width", "image", limit="image_size"),
        min_size=r.integer(image, "min_size", "image", optional=True, limit="image_size"),
        max_size=r.integer(image, "max_size", "image", optional=True, limit="image_size"),
        size_multiple=r.integer(image, "size_multiple", "image", optional=True, limit="size_multiple")
                      or r.integer(vae, "scale_factor", "vae", limit="vae_scale_factor"),
        latent_channels=r.integer(latent, "channels", "latent", limit="latent_channels"),
        latent_height=r.integer(latent, "height", "latent", limit="latent_size"),
        latent_width=r.integer(latent, "width", "latent", limit="latent_size"),
        vae_scaling_factor=r.number(vae, "scaling_factor", "vae", positive=True, limit="vae_scaling_factor"),
        vae_scale_factor=r.integer(vae, "scale_factor", "vae", limit="vae_scale_factor"),
        tokenizer=tokenizer,
        text_encoder=r.model(text, "text_encoder"),
        text_hidden_size=r.integer(text, "hidden_size", "text_encoder", limit="hidden_size"),
        router_tokenizer=router_tokenizer,
        router_encoder=r.model(encoder, "router.encoder"),
        router_head=r.model(r.section(router, "head", "router"), "router.head"),
        experts=experts,
        dense=dense,
        vae_decoder=r.model(r.section(manifest, "vae_decoder"), "vae_decoder"),
        scheduler=table,
        guidance_scale=r.number(manifest, "guidance_scale", limit="guidance_scale"),
        max_batch=r.integer(manifest, "max_batch", limit="max_batch"),
        vae_encoder=(r.model(r.section(manifest, "vae_encoder"), "vae_encoder")
                     if manifest.get("vae_encoder") is not None else None),
    )
    if artifacts.min_size is not None and artifacts.max_size is not None and artifacts.min_size > artifacts.max_size:
        raise r.fail("image.min_size", f"is {artifacts.min_size}, above image.max_size={artifacts.max_size}")
    for side in ("height", "width"):
        latent_side = getattr(artifacts, f"latent_{side}")
        if latent_side * artifacts.vae_scale_factor != getattr(artifacts, f"image_{side}"):
            raise r.fail(f"latent.{side}", f"is {latent_side}: times vae.scale_factor={artifacts.vae_scale_factor} "
                         f"it must equal image.{side}={getattr(artifacts, f'image_{side}')}")
    missing = sorted(set(range(num_codes)) - set(experts))
    if missing:
        # A code without an expert cannot serve the prompts routed to it.
        raise r.fail("experts", f"has no entry for codes {missing} of num_codes={num_codes}")
    logger.info("loaded export %s: %d experts%s, %s, %d-step %s sampler", root, len(experts),
                " + dense" if dense else "", precision, table.num_steps, table.name)
    return artifacts
