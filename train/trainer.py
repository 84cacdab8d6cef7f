"""The three training commands behind `aptp-train`."""

from .finetune import run_finetune
from .prune import run_prune
from .route import run_route

__all__ = ["run_finetune", "run_prune", "run_route"]
