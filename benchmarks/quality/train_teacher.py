"""Train the offline tiny teacher pipeline and write it where `resolve_pretrained("tiny")` finds it.

    python -m aptp.benchmarks.quality.train_teacher                      # both stages -> train/assets/tiny-sd
    python -m aptp.benchmarks.quality.train_teacher --stages vae --output /tmp/vae
    python -m aptp.benchmarks.quality.train_teacher --stages unet --init-from /tmp/vae
    python -m aptp.benchmarks.quality.train_teacher --set unet.max_steps=3000

The recipe is `train/presets/tiny_teacher.yaml` (see `aptp.train.pretrain`). After training, a
grid of samples is written next to the pipeline (``samples.png``) to look at before committing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aptp.errors import AptpError
from aptp.train.models import TINY_WEIGHTS


def save_sample_grid(pipeline: Path, path: Path, num_prompts: int = 32, seed: int = 0, steps: int = 20,
                     guidance: float = 4.0) -> Path:
    """Sample the first held-out procedural prompts (seed 1) with the dense UNet, next to their renderings."""
    import torch

    from aptp.train.data import ProceduralCaptions
    from aptp.train.models import load_components

    from .sampling import generate_images, save_grid

    components = load_components(str(pipeline))
    dataset = ProceduralCaptions(num_prompts, 64, seed=1)
    prompts = [dataset.caption(i) for i in range(num_prompts)]
    images = generate_images(components, prompts, components.unet, seed=seed, steps=steps, guidance=guidance)
    real = torch.stack([dataset[i]["pixel_values"] for i in range(num_prompts)]) * 0.5 + 0.5
    # Rows alternate: 8 generated images, then the 8 renderings of the same prompts.
    pairs = torch.cat([torch.cat([images[i : i + 8], real[i : i + 8]]) for i in range(0, num_prompts, 8)])
    return save_grid(pairs, path, captions=prompts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny_teacher", help="preset name or YAML path (default: tiny_teacher)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. unet.max_steps=100 (repeatable)")
    parser.add_argument("--output", type=Path, default=TINY_WEIGHTS, help=f"pipeline directory (default: {TINY_WEIGHTS})")
    parser.add_argument("--init-from", type=Path, default=None, help="start from this pipeline instead of a random one")
    parser.add_argument("--stages", nargs="+", default=["vae", "unet"], choices=["vae", "unet"])
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    parser.add_argument("--no-samples", action="store_true", help="skip the sample grid")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from aptp.train.pretrain import load_pretrain_config, run_pretrain

    try:
        config = load_pretrain_config(args.config, args.overrides)
        output = run_pretrain(config, args.output, init_from=args.init_from, stages=args.stages, overwrite=args.overwrite,
                             resume=args.resume)
        if not args.no_samples:
            save_sample_grid(output, output / "samples.png")
    except AptpError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"trained pipeline -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
