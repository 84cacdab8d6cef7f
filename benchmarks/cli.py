"""``aptp-bench``: latency and quality suites over an aptp export.

    aptp-bench latency --artifacts A [--backends onnxruntime,torch] [--batch-sizes 1,2,4,8]
                       [--resolutions 64,128] [--repeats N] [--warmup N] [--threads N]
                       [--output-dir R] [--e2e-batch N] [--e2e-steps N] [--no-e2e] ...
    aptp-bench --artifacts A ...              (same as `aptp-bench latency --artifacts A ...`)
    aptp-bench quality ...                    (aptp.benchmarks.quality.table.main_quality)
    aptp-bench make-synthetic --unet-config sd21 --resolution 256 --output A
    aptp-bench serve --artifacts A [--rates 0.5,1,2] [--count N] [--slo S] [--no-ray] ...
    aptp-bench gpu-check --output-dir OUT [--dry-run]   (aptp.benchmarks.gpu_check.cli)
    aptp-bench memory --artifacts A [--budgets unlimited,2x,1x] [--precisions fp32,int8] [--requests 48]

This module only dispatches: each suite's arguments and run live in its own package
(`latency/cli.py`, `memory/cli.py`, `serving/cli.py`, `gpu_check/cli.py`, `quality/table.py`,
`synthetic_cli.py`), imported only for the command given.

Bad input (any `AptpError`) prints one line, ``aptp-bench: error: <message>``, and exits 2;
Ctrl-C exits 130. torch is imported only after the arguments parse.
"""

from __future__ import annotations

import sys
from typing import Sequence

from aptp import __version__
from aptp.cli import run_command
from aptp.errors import ConfigError

from .args import PROG, Parser

__all__ = ["COMMANDS", "main"]

COMMANDS = ("latency", "quality", "make-synthetic", "serve", "gpu-check", "memory")


def _top_parser() -> Parser:
    p = Parser(prog=PROG, description="aptp benchmarks. Commands: latency (default), quality, make-synthetic, serve, "
               "gpu-check, memory; `aptp-bench COMMAND --help` for each.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("command", choices=COMMANDS)
    return p


def _quality(argv: Sequence[str]) -> int:
    try:
        from .quality.table import main_quality
    except ImportError as err:
        raise ConfigError(f"the quality suite is not available in this checkout (aptp.benchmarks.quality.table: "
                          f"{err}); update aptp or run the latency suite") from err
    return int(main_quality(list(argv)) or 0)


def _run(command: str, argv: Sequence[str]) -> int:
    # Imported here, for the command given only: a suite's imports are not every command's cost.
    if command == "quality":
        return _quality(argv)
    if command == "latency":
        from .latency.cli import main as run
    elif command == "make-synthetic":
        from .synthetic_cli import main as run
    elif command == "serve":
        from .serving.cli import main as run
    elif command == "gpu-check":
        from .gpu_check.cli import main as run
    else:
        from .memory.cli import main as run
    return run(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aptp-bench``; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-h", "--help") or not argv:
        _top_parser().parse_args(argv or ["--help"])
        return 0
    if argv[0].startswith("-"):
        command, rest = "latency", argv  # `aptp-bench --artifacts A` is the latency suite
    else:
        command, rest = argv[0], argv[1:]
        if command not in COMMANDS:
            print(f"{PROG}: error: unknown command '{command}'; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
    return run_command(PROG, lambda: _run(command, rest))


if __name__ == "__main__":
    sys.exit(main())
