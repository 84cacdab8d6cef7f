"""The argument pieces every `aptp-bench` suite's parser shares: a parser whose usage errors are one
line, comma-separated list types, logging set-up and the check that an export folder exists."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from aptp.errors import ConfigError

__all__ = ["PROG", "Parser", "check_artifacts", "float_list", "int_list", "name_list", "setup_logging"]

PROG = "aptp-bench"


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line too (the usage text goes to --help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_list(text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4]; anything but comma-separated positive integers is a usage error."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got '{text}'") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got '{text}'")
    return values


def float_list(text: str) -> list[float]:
    """`0.5,1,2` -> [0.5, 1.0, 2.0]; anything but comma-separated positive numbers is a usage error."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got '{text}'") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got '{text}'")
    return values


def name_list(text: str) -> list[str]:
    """`onnxruntime, torch` -> ['onnxruntime', 'torch'] (empty items dropped)."""
    return [v for v in text.replace(" ", "").split(",") if v]


def setup_logging(verbose: bool) -> None:
    """INFO (DEBUG with -v) to stderr, with time, level and logger name."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def check_artifacts(artifacts: Path) -> None:
    """A missing export folder is one line, before anything heavy is imported."""
    if not artifacts.exists():
        raise ConfigError(f"--artifacts {artifacts} does not exist; pass the directory aptp-export wrote")
