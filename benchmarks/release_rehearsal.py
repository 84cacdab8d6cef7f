"""Full-size rehearsal of `aptp-import`: a synthetic release at the real SD 2.1 shape, imported.

    python -m aptp.benchmarks.release_rehearsal --workdir /big/disk/rehearsal [--codes 8] [--shape sd21|tiny]

Writes (once) a base folder with a random-weight UNet of the chosen shape and the configs the
importer reads, a random MPNet-shaped encoder (768-d for sd21), and a set of K experts in exactly
the authors' layout (`aptp.train.release.synthetic`), with codes spread over compute levels; then
runs the full import (every expert, strict checks) and prints time, peak resident memory and
per-expert MACs ratio, parameters and file size as JSON. Not run by the tests: at the SD 2.1
shape it writes about K x 2-3 GiB and needs about 10 GiB of memory. ``--shape tiny`` runs the same
path in seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path


def _base(workdir: Path, shape: str):
    """A base pipeline folder (UNet weights + VAE/tokenizer configs) and the UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from aptp.train.models import resolve_pretrained
    from aptp.train.release.synthetic import SD21_UNET_CONFIG

    base = workdir / f"base-{shape}"
    tiny = Path(resolve_pretrained("tiny"))
    if not (base / "unet" / "config.json").is_file():
        if shape == "tiny":
            shutil.copytree(tiny, base)
        else:
            torch.manual_seed(0)
            unet = UNet2DConditionModel.from_config(SD21_UNET_CONFIG)
            unet.save_pretrained(str(base / "unet"))
            (base / "vae").mkdir(parents=True, exist_ok=True)
            (base / "vae" / "config.json").write_text(json.dumps(
                {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 4,
                 "scaling_factor": 0.18215}))
            shutil.copytree(tiny / "tokenizer", base / "tokenizer")
            config = json.loads((base / "tokenizer" / "tokenizer_config.json").read_text())
            config["model_max_length"] = 77  # SD 2.1's text length (the MACs of cross-attention use it)
            (base / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    return base, UNet2DConditionModel.from_pretrained(str(base), subfolder="unet").eval()


def _spread_codes(layout, k: int):
    """Codes keeping from all to about half of every group (e.g. 0.85 and 0.66 of dense MACs)."""
    import torch

    from aptp.train.release.synthetic import code_vectors

    codes = code_vectors(layout, k, seed=0)
    generator = torch.Generator().manual_seed(1)
    for code in range(2, k):
        keep = 1.0 - 0.5 * code / k
        noise = torch.rand(codes.shape[1], generator=generator)
        codes[code] = torch.where(noise < keep, 0.75, 0.25)
        start = 0
        for width in layout.width_groups:  # at least one unit per group
            codes[code, start] = 0.75
            start += width
    return codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--codes", type=int, default=8)
    parser.add_argument("--shape", choices=("sd21", "tiny"), default="sd21")
    args = parser.parse_args(argv)

    from aptp.train.release.importer import import_release
    from aptp.train.release.layout import AuthorsLayout
    from aptp.train.release.synthetic import write_mpnet, write_release

    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, unet = _base(args.workdir, args.shape)
    hidden = 768 if args.shape == "sd21" else 32
    mpnet = args.workdir / f"mpnet-{hidden}"
    if not (mpnet / "config.json").is_file():
        write_mpnet(mpnet, hidden=hidden)
    release = args.workdir / f"set-{args.shape}-k{args.codes}"
    if not (release / "quantizer").is_dir():
        layout = AuthorsLayout(unet)
        write_release(release, unet, hidden, num_codes=args.codes, codes=_spread_codes(layout, args.codes))
    del unet
    written = time.perf_counter()
    output = args.workdir / f"ckpt-{args.shape}-k{args.codes}"
    report = import_release(release, base, mpnet, output, overwrite=True)
    done = time.perf_counter()
    print(json.dumps({
        "shape": args.shape, "codes": args.codes, "dim": report.dim, "write_s": round(written - started, 1),
        "import_s": round(done - written, 1), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                    / 2**20, 2),
        "dense_gmacs": round(report.dense_macs / 1e9, 2), "dense_params_m": round(report.dense_params / 1e6, 1),
        "experts": [{"code": e.code, "macs_ratio": round(e.macs_ratio, 4), "params_m": round(e.params / 1e6, 1),
                     "file_mib": round(e.release_bytes / 2**20, 1)} for e in report.experts],
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
