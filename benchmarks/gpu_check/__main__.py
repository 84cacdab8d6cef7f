"""`python -m aptp.benchmarks.gpu_check ...`: what `benchmarks/gpu_check/run.sh` runs."""

import sys

from aptp.cli import run_command

from .cli import main

sys.exit(run_command("aptp-bench gpu-check", lambda: main(sys.argv[1:])))
