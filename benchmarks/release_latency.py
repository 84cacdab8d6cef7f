"""CPU latency of imported release experts against their MACs: the second half of the rehearsal.

    python -m aptp.benchmarks.release_latency --checkpoint CKPT [--export 7,0] [--latent 32] [--repeats 3]

For every expert of an imported checkpoint (`aptp-import`, e.g. the one `release_rehearsal`
writes), one PyTorch fp32 UNet call at UNet batch 2 (one prompt with classifier-free guidance)
is counted (``FlopCounterMode``, MACs = FLOPs / 2, attention included through the plain
processor) and timed; the experts named by ``--export`` are also exported to fp16 ONNX with
aptp's exporter (time and file size) and timed in onnxruntime on the CPU. Prints JSON; every
ratio is against the largest expert measured in the same run. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _inputs(unet: Any, latent: int, text_length: int) -> tuple[Any, Any, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, latent, latent, generator=generator)
    states = torch.randn(2, text_length, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([500.0, 500.0]), states


def _torch_row(unet: Any, latent: int, text_length: int, repeats: int) -> dict[str, float]:
    import torch
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    sample, timestep, states = _inputs(unet, latent, text_length)
    unet.set_attn_processor(AttnProcessor())  # the default SDPA processor is not counted on CPU
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            unet(sample, timestep, states)
        times = []
        for _ in range(repeats):
            clock = time.perf_counter()
            unet(sample, timestep, states)
            times.append(time.perf_counter() - clock)
    return {"gmacs": counter.get_total_flops() / 2e9, "torch_s": statistics.median(times)}


def _onnx_row(unet: Any, latent: int, text_length: int, repeats: int, threads: int) -> dict[str, float]:
    import numpy as np
    import onnxruntime as ort

    from aptp.export.onnx_configs import UNetOnnxConfig
    from aptp.export.onnx_export import export_onnx

    config = UNetOnnxConfig.from_unet(unet, latent, latent, text_length, batch=2, precision="fp16")
    with tempfile.TemporaryDirectory(prefix="aptp-release-latency-") as folder:
        clock = time.perf_counter()
        path, data = export_onnx(unet, config, Path(folder) / "unet.onnx")
        export_s = time.perf_counter() - clock
        size = path.stat().st_size + (data.stat().st_size if data else 0)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sample, timestep, states = _inputs(unet, latent, text_length)
        feed = {"sample": sample.numpy().astype(np.float16), "timestep": timestep.numpy().astype(np.float32),
                "encoder_hidden_states": states.numpy().astype(np.float16)}
        session.run(None, feed)
        times = []
        for _ in range(repeats):
            clock = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - clock)
    return {"export_s": export_s, "fp16_mib": size / 2**20, "onnx_fp16_s": statistics.median(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="an aptp-import checkpoint")
    parser.add_argument("--export", default="", help="codes to export to fp16 ONNX and time, e.g. 7,0")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32: 256 px for SD 2.1)")
    parser.add_argument("--text-length", type=int, default=77)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from aptp.train.checkpoint import CheckpointInfo, expert_dir
    from aptp.train.experts import load_expert

    torch.set_num_threads(args.threads)
    info = CheckpointInfo.load(args.checkpoint)
    exported = {int(c) for c in args.export.split(",") if c.strip()}
    rows = []
    for code in range(info.num_codes):
        unet = load_expert(expert_dir(args.checkpoint, code))
        row: dict[str, Any] = {"code": code, **_torch_row(unet, args.latent, args.text_length, args.repeats)}
        if code in exported:
            row.update(_onnx_row(unet, args.latent, args.text_length, args.repeats, args.threads))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del unet
    top = max(rows, key=lambda r: r["gmacs"])
    big = [r for r in rows if "onnx_fp16_s" in r]
    top_onnx = max(big, key=lambda r: r["gmacs"]) if big else None
    for row in rows:
        row["macs_ratio"] = row["gmacs"] / top["gmacs"]
        row["torch_ratio"] = row["torch_s"] / top["torch_s"]
        if top_onnx is not None and "onnx_fp16_s" in row:
            row["onnx_ratio"] = row["onnx_fp16_s"] / top_onnx["onnx_fp16_s"]
            row["onnx_macs_ratio"] = row["gmacs"] / top_onnx["gmacs"]
    print(json.dumps({"checkpoint": str(args.checkpoint), "latent": args.latent, "threads": args.threads,
                      "repeats": args.repeats, "experts": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
