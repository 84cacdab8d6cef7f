"""``aptp-export``: a training checkpoint -> ONNX (and TensorRT) artifacts with a manifest.

    aptp-export --checkpoint runs/tiny --output artifacts/tiny [--overwrite] [--precision fp32|fp16]
                [--resolution PX] [--min-resolution PX] [--max-resolution PX] [--max-batch N]
                [--scheduler ddim|euler|dpmpp_2m|pndm] [--steps N] [--tensorrt] [--pipeline-dirs]
                [--no-dense] [--sign KEYFILE] [--quantize int8] [--cpu-graphs]

Bad input (any `AptpError`) prints one line, ``aptp-export: error: <message>``, and exits 2;
anything else is a bug and keeps its traceback. Ctrl-C exits 130 and leaves the output as it
was (the export is staged and renamed into place only when complete). torch and diffusers are
imported only after the arguments parse.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from aptp import __version__
from aptp.cli import positive_int, run_command

PROG = "aptp-export"

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export an aptp pruning checkpoint: one ONNX UNet per expert (+ dense), router, text "
        "encoder, VAE decoder, scheduler tables and a manifest; TensorRT engines where available.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR",
                        help="checkpoint directory written by aptp-train prune (or finetune)")
    parser.add_argument("--output", type=Path, required=True, metavar="DIR",
                        help="export directory to write: a new path, an empty directory, or a previous aptp "
                        "export with --overwrite (never a folder holding anything else)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous aptp export at --output (only once the new one is complete)")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                        help="weights and activations of the UNets, text encoder and VAE decoder (default: fp32; "
                        "the router stays fp32)")
    parser.add_argument("--resolution", type=positive_int, metavar="PX",
                        help="nominal image size in pixels (default: the checkpoint's)")
    parser.add_argument("--min-resolution", type=positive_int, metavar="PX",
                        help="smallest image size the runtime may ask for (default: --resolution)")
    parser.add_argument("--max-resolution", type=positive_int, metavar="PX",
                        help="largest image size the runtime may ask for (default: --resolution)")
    parser.add_argument("--max-batch", type=positive_int, default=4, metavar="N",
                        help="prompts per UNet call; TensorRT profiles cover 2N for guidance (default: 4)")
    parser.add_argument("--scheduler", default="ddim", metavar="NAME",
                        help="sampler whose coefficient table is stored: ddim, euler, dpmpp_2m or pndm (default: ddim)")
    parser.add_argument("--steps", type=positive_int, default=50, metavar="N",
                        help="inference steps of the stored scheduler table (default: 50)")
    parser.add_argument("--tensorrt", action="store_true",
                        help="also build fp16 TensorRT engines (needs the tensorrt package and a GPU; "
                        "otherwise warns and exports ONNX only)")
    parser.add_argument("--pipeline-dirs", action="store_true",
                        help="also write diffusers OnnxStableDiffusionPipeline directories under pipelines/")
    parser.add_argument("--no-dense", dest="dense", action="store_false",
                        help="do not export the unpruned UNet")
    parser.add_argument("--inline-unet-weights", dest="unet_external_data", action="store_false",
                        help="keep small UNets' weights inside the .onnx graph (default: a .data file beside it, "
                        "which onnxruntime holds once in memory instead of about twice)")
    parser.add_argument("--sign", type=Path, metavar="KEYFILE",
                        help="sign the manifest with this Ed25519 private key (PEM; make one with "
                        "'python -m aptp.export.signing generate-key KEYFILE'; needs aptp[sign])")
    parser.add_argument("--quantize", choices=("int8",),
                        help="also write an int8 version of every UNet (onnxruntime static QDQ, calibrated on sampling "
                        "runs of the checkpoint's prompts) with its error against fp32; the runtime picks it with "
                        "--precision int8")
    parser.add_argument("--cpu-graphs", action="store_true",
                        help="also write every UNet optimised for CPU sessions (onnxruntime's extended level, checked "
                        "against the exported graph); the runtime loads them on CPU, a session in about half the time")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aptp-export``; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_command(PROG, lambda: _export(args), interrupted=f"interrupted; {args.output} was left as it was")


def _export(args: argparse.Namespace) -> None:
    from .exporter import ExportOptions, export_checkpoint

    options = ExportOptions(
        precision=args.precision, resolution=args.resolution, min_resolution=args.min_resolution,
        max_resolution=args.max_resolution, max_batch=args.max_batch, scheduler=args.scheduler,
        steps=args.steps, tensorrt=args.tensorrt, pipeline_dirs=args.pipeline_dirs, dense=args.dense,
        unet_external_data=args.unet_external_data, signing_key=args.sign,
    )
    if args.quantize and args.precision != "fp32":
        from aptp.errors import ConfigError

        raise ConfigError(f"--quantize {args.quantize} starts from fp32 weights; drop --precision {args.precision}")
    manifest = export_checkpoint(args.checkpoint, args.output, options, overwrite=args.overwrite)
    if args.quantize:
        from .quantize import quantize_export

        manifest = quantize_export(args.output, args.quantize, signing_key=args.sign)
    if args.cpu_graphs:
        from .cpu_graphs import optimize_export

        manifest = optimize_export(args.output, signing_key=args.sign)
    experts = manifest["experts"]
    print(f"exported {len(experts)} experts to {args.output}")
    for entry in experts:
        share = "n/a" if entry["share"] is None else f"{entry['share']:.1%}"
        print(f"  expert {entry['code']}: MACs ratio {entry['macs_ratio']:.3f}, prompt share {share}, "
              f"ONNX max abs error {entry['max_abs_error']:.2g}")
        if entry.get("int8"):
            q = entry["int8"]
            print(f"    int8 ({q['method']}): {q['bytes'] / entry['bytes']:.2f}x the fp32 bytes, pixel error "
                  f"{q['error']['pixels_mean_abs']:.2f} mean / {q['error']['pixels_max_abs']} max (0-255), "
                  f"ops {q['quantized_ops']}")
        if entry.get("cpu_graph"):
            c = entry["cpu_graph"]
            print(f"    CPU graph: {c['nodes'][0]} -> {c['nodes'][1]} nodes, max abs difference {c['max_abs_diff']:.2g}")


if __name__ == "__main__":
    sys.exit(main())
