"""``aptp-generate``: images from an export, with each prompt's expert and time per stage.

    aptp-generate --artifacts exports/tiny --prompt "a red car" --output out.png
    aptp-generate --artifacts exports/tiny --prompt "a red car" --prompt "soup" --output out.png
    aptp-generate --artifacts exports/tiny --prompts-file prompts.txt --output images/out.png
    aptp-generate --artifacts exports/sd21 --memory-budget 3GiB --precision int8 --prompt "soup" --output o.png

    aptp-generate --artifacts exports/tiny --prompt "a red car" --steps 30 --scheduler euler \
                  --negative-prompt "blurry" --output out.png
    aptp-generate --show-params out.png

    aptp-generate --artifacts exports/tiny --prompt "a red car" --init-image in.png --strength 0.6 --output o.png
    aptp-generate --artifacts exports/tiny --prompt "a red car" --init-image in.png --mask mask.png --output o.png

With several prompts the images are numbered: ``out_0.png``, ``out_1.png``... and ``--grid``
also writes them as one contact sheet, ``out_grid.png``. A prompts file is UTF-8 text with one
prompt per line (blank lines are skipped). Prompt ``i`` uses seed ``--seed + i``. Every PNG
carries its generation parameters in text chunks (`aptp.runtime.images`); ``--show-params``
prints them. ``--init-image`` runs img2img (``--mask``: inpainting, white repaints; see
``docs/img2img.md``); the images are read before the export loads. Bad input (any `AptpError`) prints one line, ``aptp-generate: error: <message>``,
and exits 2. Torch-free: this module imports only the runtime.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from aptp import __version__
from aptp.readers import read_user_file
from aptp.cli import run_command
from aptp.errors import RuntimeInputError

PROG = "aptp-generate"
#: Prompts per pipeline call: a long prompts file is generated (and saved) in chunks.
CHUNK_PROMPTS = 64
#: Largest --prompts-file read (bytes).
MAX_PROMPTS_FILE_BYTES = 64 * 1024**2

logger = logging.getLogger(__name__)


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line of a UTF-8 file, blank lines skipped.

    Raises:
        RuntimeInputError: the file cannot be read, is larger than `MAX_PROMPTS_FILE_BYTES`, or
            is not UTF-8.
    """
    path = Path(path)
    data = read_user_file(path, "--prompts-file", MAX_PROMPTS_FILE_BYTES, RuntimeInputError)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise RuntimeInputError(
            f"--prompts-file {path} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} "
            f"(line {line}) cannot be decoded; re-save the file as UTF-8"
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _integer(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise RuntimeInputError(f"{flag} must be a positive integer, got {text!r}") from None


def _int_in(text: str, low: int, high: int) -> int | None:
    """`text` as an integer in ``[low, high]``, or None."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if low <= value <= high else None


def _threads(text: str) -> int:
    from .engine import MAX_THREADS

    value = _int_in(text, 1, MAX_THREADS)
    if value is None:
        raise RuntimeInputError(f"--threads must be an integer in [1, {MAX_THREADS}], got {text!r}")
    return value


def _seed(text: str, count: int) -> int:
    # Prompt i uses seed + i: the last one must still fit the 63-bit seed range.
    value = _int_in(text, 0, 2**63 - count)
    if value is None:
        raise RuntimeInputError(f"--seed must be an integer in [0, 2**63 - {count}] for {count} prompt(s), got {text!r}")
    return value


def check_output_paths(paths: Sequence[Path]) -> None:
    """Refuse, before any work, PNG paths that cannot be written: an existing directory, a
    parent that is a file, or a folder this account cannot write into (or on a read-only
    filesystem). Missing parent folders are fine: they are created.

    Raises:
        RuntimeInputError: naming the path and what is wrong.
    """
    probed: set[Path] = set()
    for path in paths:
        if path.is_dir():
            raise RuntimeInputError(f"--output {path} is a directory; give a file name ending in .png")
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise RuntimeInputError(f"--output {path}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RuntimeInputError(f"--output {path}: cannot write into {parent} (no permission, or a read-only "
                                    "filesystem)")
        if parent == path.parent and parent not in probed:
            probed.add(parent)
            # access(2) says yes to root everywhere; creating (and removing) a file of our own
            # is the real test, done now rather than after minutes of generation.
            try:
                with tempfile.NamedTemporaryFile(dir=parent, prefix=".aptp-write-check-"):
                    pass
            except OSError as err:
                raise RuntimeInputError(f"--output {path}: cannot write into {parent}: {err.strerror or err}") from None


def _expert(text: str) -> int | str:
    if text == "dense":
        return text
    try:
        return int(text)
    except ValueError:
        raise RuntimeInputError(f"--expert must be a code (an integer) or 'dense', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Generate images from an aptp export (no torch needed).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--artifacts", help="the export directory aptp-export wrote (required to generate)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    parser.add_argument("--prompts-file", help="UTF-8 text file, one prompt per line")
    parser.add_argument("--output", help="PNG path; several prompts give out_0.png, out_1.png... (required to "
                        "generate)")
    parser.add_argument("--negative-prompt", help="what the image should not show (CFG's unconditional half)")
    parser.add_argument("--grid", action="store_true", help="also write every image as one sheet, <output>_grid.png")
    parser.add_argument("--show-params", metavar="PNG", help="print the generation parameters stored in a PNG "
                        "this tool wrote, and exit")
    parser.add_argument("--seed", default="0", help="seed of the first prompt; prompt i uses seed+i (< 2**63)")
    # Parsed as text and checked by the runtime, so bad values get the runtime's messages.
    parser.add_argument("--steps", help="sampling steps, 1-150 (default: the export's)")
    parser.add_argument("--scheduler", help="sampler: ddim, euler, dpmpp_2m or pndm (PLMS) (default: the export's)")
    parser.add_argument("--guidance-scale", help="classifier-free guidance scale in [0, 100] (default: the export's)")
    parser.add_argument("--height", help="image height in pixels (default: the export's)")
    parser.add_argument("--width", help="image width in pixels (default: the export's)")
    parser.add_argument("--expert", help="run every prompt on this code, or 'dense', instead of routing")
    parser.add_argument("--init-image", metavar="IMAGE", help="img2img: start from this image (PNG, JPEG...); its "
                        "size is the default --height/--width, else it is resized")
    parser.add_argument("--strength", help="img2img: how much of the init image is repainted, in (0, 1] "
                        "(default 0.8; 1.0 with --mask)")
    parser.add_argument("--mask", metavar="IMAGE", help="inpainting: white repaints, black keeps; the init image's size")
    parser.add_argument("--mask-blur", help="inpainting: Gaussian blur radius of the mask in pixels (default 0)")
    parser.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", default=None,
                        help="intra-op threads per model, 1 to 256 (default: $OMP_NUM_THREADS, else every core)")
    parser.add_argument("--trusted-key", metavar="PUBLIC.pem",
                        help="refuse the export unless its manifest is signed by this Ed25519 public key "
                        "(aptp-export --sign; needs aptp[sign])")
    parser.add_argument("--memory-budget", metavar="SIZE",
                        help="memory the UNet sessions may take together, e.g. 3GiB, 512MiB, 2GB or bytes; they are "
                        "loaded on demand and evicted least recently used (default: unlimited)")
    parser.add_argument("--shape-sessions", type=int, default=0, metavar="N",
                        help="CPU: up to N extra sessions per UNet specialised to the shapes it runs (each holds a "
                        "copy of its weights; default 0, off: 0.97-1.02x on one thread, up to 1.11x on two, see BENCHMARKS.md)")
    parser.add_argument("--workers", default="auto", metavar="N|auto",
                        help="CPU: UNet runs at once, each with threads/N threads: expert groups side by side, "
                        "a single group's rows split between them (default auto: 2 with 2 or more threads; 1: "
                        "one group after another with every thread)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                        help="UNet precision: int8 runs the UNets aptp-export --quantize int8 wrote "
                        "(default: the export's)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the sha256 check of every file (only existence is checked)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar of the sampling steps on stderr (default: when stderr is a terminal)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


class StepBar:
    """A tqdm bar of the sampling steps, one run (expert group chunk) after another; the
    pipeline's progress callback."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = None

    def __call__(self, step: int, total: int, expert: object) -> None:
        if step == 1 or self.bar is None:
            self.close()
            self.bar = self._tqdm(total=total, desc=f"expert {expert}", unit="step", leave=False, file=sys.stderr)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _number(text: str | None, flag: str, example: str | None = None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        hint = f" (e.g. {example})" if example else ""
        raise RuntimeInputError(f"{flag} must be a number{hint}, got {text!r}") from None
    if not math.isfinite(value):
        raise RuntimeInputError(f"{flag} must be a finite number, got {text!r}")
    return value


def _image_options(args: argparse.Namespace) -> dict[str, object]:
    """The img2img keyword arguments of the flags, images read and checked now."""
    from .init_images import read_image, read_mask

    if args.init_image is None:
        for flag, value in (("--strength", args.strength), ("--mask", args.mask), ("--mask-blur", args.mask_blur)):
            if value is not None:
                raise RuntimeInputError(f"{flag} needs --init-image (the picture to start from)")
        return {}
    from .img2img import check_mask_blur, check_strength

    strength = _number(args.strength, "--strength")
    options: dict[str, object] = {"strength": None if strength is None else check_strength(strength)}
    if args.mask is not None:
        blur = _number(args.mask_blur, "--mask-blur")
        options["mask_blur"] = None if blur is None else check_mask_blur(blur)
        options["mask_image"] = read_mask(args.mask, "--mask")
    elif args.mask_blur is not None:
        raise RuntimeInputError("--mask-blur needs --mask")
    options["init_image"] = read_image(args.init_image, "--init-image")
    return options


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def show_params(path: str) -> int:
    """Print the parameters stored in the PNG at `path`, one ``key: value`` line each."""
    from .images import PARAMETER_KEYS, printable, read_png_parameters

    params = read_png_parameters(path)
    if not params:
        raise RuntimeInputError(f"{path} carries no generation parameters (no PNG text chunks)")
    for key in [*[k for k in PARAMETER_KEYS if k in params], *sorted(set(params) - set(PARAMETER_KEYS))]:
        print(f"{printable(key)}: {printable(params[key])}")
    return 0


def write_grid(path: Path, images: Sequence[tuple[object, dict[str, str]]]) -> Path:
    """One contact sheet of ``(image, parameters)`` pairs; its text chunks hold every prompt,
    seed and expert, and the parameters all images share (each image keeps its own record)."""
    from .images import contact_sheet, save_png

    params = [p for _, p in images]
    shared = {k: v for k, v in params[0].items()
              if k not in ("prompt", "seed", "expert") and all(p.get(k) == v for p in params)}
    shared["prompts"] = "\n".join(p["prompt"] for p in params)
    shared["seeds"] = " ".join(p["seed"] for p in params)
    shared["experts"] = " ".join(p["expert"] for p in params)
    return save_png(contact_sheet([image for image, _ in images]), path, parameters=shared)


def run(args: argparse.Namespace) -> list[Path] | int:
    """Generate and save the images of parsed `args`; returns the paths written."""
    from .dispatch import parse_workers
    from .images import numbered_paths
    from .pipeline import STAGES, AptpPipeline
    from .residency import parse_memory_budget

    if args.show_params is not None:
        return show_params(args.show_params)
    for flag, value in (("--artifacts", args.artifacts), ("--output", args.output)):
        if not value:
            raise RuntimeInputError(f"{flag} is required to generate (or pass --show-params PNG)")
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    if not prompts:
        raise RuntimeInputError("no prompts: pass --prompt TEXT (repeatable) or a non-empty --prompts-file")
    paths = numbered_paths(args.output, len(prompts))
    grid = Path(args.output).with_name(f"{Path(args.output).stem}_grid.png") if args.grid else None
    check_output_paths([*paths, *([grid] if grid else [])])
    edit = _image_options(args)  # read before the export loads: a bad image fails at once
    seed = _seed(args.seed, len(prompts))
    threads = None if args.threads is None else _threads(args.threads)
    parse_memory_budget(args.memory_budget, "--memory-budget")  # a bad budget fails before the export loads
    workers = parse_workers(args.workers)
    pipe = AptpPipeline.from_export(args.artifacts, verify=not args.no_verify, backend=args.backend,
                                    device=args.device, threads=threads, trusted_key=args.trusted_key,
                                    memory_budget=args.memory_budget, precision=args.precision,
                                    shape_sessions=args.shape_sessions, workers=workers)
    options = dict(
        num_inference_steps=None if args.steps is None else _integer(args.steps, "--steps"),
        height=None if args.height is None else _integer(args.height, "--height"),
        width=None if args.width is None else _integer(args.width, "--width"),
        guidance_scale=_number(args.guidance_scale, "--guidance-scale", example="7.5"),
        expert=None if args.expert is None else _expert(args.expert),
        scheduler=args.scheduler,
        negative_prompt=args.negative_prompt,
        **edit,
    )
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = StepBar() if show else None
    if bar is not None:
        options["callback"] = bar
    # Chunks bound the memory a long prompts file needs; each image depends only on its own
    # prompt and seed, so chunking changes no result.
    sheet: list[tuple[object, dict[str, str]]] = []  # (image, parameters) kept only for --grid
    for start in range(0, len(prompts), CHUNK_PROMPTS):
        try:
            results = pipe(prompts[start:start + CHUNK_PROMPTS], seeds=seed + start, **options)
        finally:
            if bar is not None:
                bar.close()
        for i, result in enumerate(results, start):
            result.save(paths[i])
            stages = "  ".join(f"{stage} {_ms(result.timings[stage])}" for stage in STAGES)
            note = "  (truncated)" if result.truncated else ""
            print(f"[{i}] expert {result.expert} on {result.provider}  seed {result.seed}  {stages}  -> {paths[i]}{note}")
            print(f"    {result.prompt}")
            if grid is not None:
                sheet.append((result.image, result.parameters()))
    if grid is not None:
        write_grid(grid, sheet)
        print(f"grid of {len(sheet)} -> {grid}")
        paths.append(grid)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aptp-generate``; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
