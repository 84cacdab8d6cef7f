"""What the suite knows about one export: shapes, shares, MACs ratios, routing of a prompt set, and
the static pruned baseline at a given MACs ratio."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from aptp.errors import ArtifactError

from ..synthetic import read_synthetic_info, search_mask
from .options import DENSE

logger = logging.getLogger(__name__)


@dataclass
class BenchModel:
    """What the suite knows about one export."""

    root: Path
    manifest: dict[str, Any]
    synthetic: dict[str, Any] | None
    num_codes: int
    shares: list[float]
    shape: dict[str, int]
    nominal: int
    size_multiple: int
    vae_factor: int
    dense_torch: Any = None
    layout: Any = None
    masks: Any = None
    macs_models: dict[int, Any] = field(default_factory=dict)

    def variants(self) -> list[str]:
        return [DENSE, *[f"expert_{k}" for k in range(self.num_codes)]]


def load_model(root: Path) -> BenchModel:
    from aptp.export.manifest import read_manifest

    if not root.exists():
        raise ArtifactError(f"artifacts directory {root} does not exist; pass the directory aptp-export wrote")
    if not (root / "manifest.json").is_file():
        raise ArtifactError(f"{root} has no manifest.json: pass the directory aptp-export wrote")
    manifest = read_manifest(root)
    if not manifest.get("dense"):
        raise ArtifactError(f"export {root} has no dense UNet: re-export without --no-dense (the latency ratios "
                            "are relative to it)")
    experts = manifest["experts"]
    k = len(experts)
    synthetic = read_synthetic_info(manifest)
    raw = [e.get("share") for e in experts]
    if synthetic:
        shares = [float(s) for s in synthetic["shares"]]
    elif all(s is not None for s in raw) and sum(raw) > 0:
        shares = [float(s) / sum(raw) for s in raw]
    else:
        shares = [1.0 / k] * k
    text_length = int(manifest["tokenizer"]["max_length"])
    hidden = int(manifest["text_encoder"]["hidden_size"])
    shape = {"channels": int(manifest["latent"]["channels"]), "text_length": text_length, "hidden": hidden}
    image = manifest["image"]
    return BenchModel(root=root, manifest=manifest, synthetic=synthetic, num_codes=k, shares=shares, shape=shape,
                      nominal=int(image["height"]), size_multiple=int(image.get("size_multiple") or 8),
                      vae_factor=int(manifest["vae"]["scale_factor"]))


def load_torch(model: BenchModel) -> None:
    """Dense torch UNet, gate layout and the experts' hard masks (from their arch specs)."""
    import torch

    from aptp.train.gates import GateLayout
    from aptp.train.models import load_components
    from aptp.train.slicing import ArchSpec

    if model.dense_torch is not None:
        return
    comps = load_components(model.manifest["base_model"])
    model.dense_torch = comps.unet.eval()
    specs = [ArchSpec.load(model.root / e["arch_spec"]) for e in model.manifest["experts"]]
    model.layout = GateLayout.from_unet(model.dense_torch, ff_groups=specs[0].ff_groups, depth=specs[0].depth)
    masks = torch.zeros(model.num_codes, model.layout.num_gates, dtype=torch.bool)
    for code, spec in enumerate(specs):
        for site, kept in zip(model.layout.sites, spec.kept_units()):
            masks[code, [site.offset + u for u in kept]] = True
    model.masks = masks


def macs_ratios(model: BenchModel, resolution: int, extra: Mapping[str, Any]) -> dict[str, float]:
    """MACs ratio of every variant at `resolution` (analytic, MacsModel), or the manifest's."""
    if model.dense_torch is None:
        ratios = {DENSE: 1.0, **{f"expert_{e['code']}": float(e["macs_ratio"]) for e in model.manifest["experts"]}}
        ratios.update({name: float(v["ratio"]) for name, v in extra.items() if v.get("ratio") is not None})
        return ratios
    from aptp.train.macs import DeployShape, MacsModel

    latent = resolution // model.vae_factor
    if latent not in model.macs_models:
        model.macs_models[latent] = MacsModel(model.dense_torch, model.layout,
                                              DeployShape(latent, latent, model.shape["text_length"]))
    macs = model.macs_models[latent]
    values = macs.ratio(model.masks.float()).tolist()
    ratios = {DENSE: 1.0, **{f"expert_{k}": float(v) for k, v in enumerate(values)}}
    for name, v in extra.items():
        if v.get("mask") is not None:
            ratios[name] = float(macs.ratio(v["mask"].float().unsqueeze(0))[0])
    return ratios


def synthetic_assignment(prompts: Sequence[str], shares: Sequence[float]) -> np.ndarray:
    """Deterministic codes for `prompts` in proportion to `shares` (largest remainder), placed
    by a hash of each prompt so the mix does not depend on the order of the prompt list."""
    n, k = len(prompts), len(shares)
    total = float(sum(shares))
    exact = [n * float(s) / total for s in shares]
    counts = [int(np.floor(x)) for x in exact]
    for i in sorted(range(k), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    order = sorted(range(n), key=lambda i: hashlib.sha256(prompts[i].encode()).hexdigest())
    codes = np.empty(n, dtype=np.int64)
    start = 0
    for code, count in enumerate(counts):
        codes[order[start:start + count]] = code
        start += count
    return codes


def route_prompts(model: BenchModel, prompts: Sequence[str], threads: int) -> tuple[np.ndarray, str]:
    if model.synthetic:
        return synthetic_assignment(prompts, model.shares), "synthetic (by shares)"
    from aptp.runtime.artifacts import load_artifacts
    from aptp.runtime.pipeline import AptpPipeline

    pipe = AptpPipeline(load_artifacts(model.root, verify=False), backend="onnxruntime", threads=threads)
    try:
        return np.asarray(pipe.route(list(prompts)), dtype=np.int64), "router (argmax)"
    finally:
        pipe.close()


def static_baseline(model: BenchModel, target: float, cache: str | os.PathLike | None, out: Path) -> dict[str, Any]:
    """Slice the dense UNet by one uniform mask at `target` MACs and export it at the export's
    nominal size, cached by mask under `cache` (default: ``out/static``)."""
    directory = Path(cache).expanduser().absolute() if cache else out / "static"
    directory.mkdir(parents=True, exist_ok=True)
    nominal_latent = model.nominal // model.vae_factor
    from aptp.export.onnx_configs import UNetOnnxConfig
    from aptp.export.onnx_export import export_and_validate
    from aptp.train.macs import DeployShape, MacsModel
    from aptp.train.slicing import slice_unet

    shape = DeployShape(nominal_latent, nominal_latent, model.shape["text_length"])
    macs = model.macs_models.get(nominal_latent) or MacsModel(model.dense_torch, model.layout, shape)
    model.macs_models[nominal_latent] = macs
    search = search_mask(macs, model.layout, target, profile=None, seed=0)
    dense_sha = str(model.manifest.get("files", {}).get(model.manifest["dense"]["unet"], model.root))
    digest = hashlib.sha256(search.mask.numpy().tobytes() + dense_sha.encode()).hexdigest()[:16]
    target_dir = directory / f"static_{digest}"
    onnx_path = target_dir / "unet.onnx"
    if not onnx_path.is_file():
        unet, _ = slice_unet(model.dense_torch, model.layout, search.mask)
        logger.info("exporting the static baseline (MACs ratio %.4f for target %.4f) to %s", search.ratio, target,
                    target_dir)
        staging = Path(tempfile.mkdtemp(prefix=".static-", dir=directory))
        config = UNetOnnxConfig.from_unet(unet, nominal_latent, nominal_latent, model.shape["text_length"],
                                          batch=2, precision=model.manifest.get("precision", "fp32"))
        graph = export_and_validate(unet, config, staging / "unet.onnx")
        del graph, unet
        (staging / "mask.json").write_text(json.dumps({"target": target, "ratio": search.ratio,
                                                       "mask": search.mask.int().tolist()}))
        if target_dir.exists():
            import shutil

            shutil.rmtree(target_dir)
        os.replace(staging, target_dir)
    else:
        logger.info("reusing the static baseline in %s", target_dir)
    return {"onnx": onnx_path, "mask": search.mask, "ratio": search.ratio,
            "target": float(target), "dir": str(target_dir)}
