"""Worker for tests/test_assignment_distributed.py, launched by torchrun with 2 CPU processes.

Every rank rebuilds the same global score matrix from a seed, keeps its own rows, calls
`global_balanced_assignment` through a real `accelerate.Accelerator` (gloo backend), and writes
its rows' assignment to ``<out_dir>/rank<r>.json``. Two splits are checked: equal local batches
and uneven ones (the last batch of an epoch).
"""

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator

from aptp.train.assignment import global_balanced_assignment


def global_scores(seed: int, batch: int, num_codes: int) -> torch.Tensor:
    """The global batch's scores, all prompts favouring code 0 (the test rebuilds the same)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, num_codes, generator=gen) * 0.4 - 0.2
    scores[:, 0] += 0.6
    return scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--codes", type=int, default=4)
    parser.add_argument("--uneven-first", type=int, default=9, help="rows of rank 0 in the uneven split")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    scores = global_scores(args.seed, args.batch, args.codes)

    equal_rows = scores.chunk(world)[rank]
    uneven_sizes = [args.uneven_first, args.batch - args.uneven_first]
    uneven_rows = scores.split(uneven_sizes)[rank]

    result = {
        "rank": rank,
        "world": world,
        "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None,
        "equal": global_balanced_assignment(equal_rows, accelerator).tolist(),
        "uneven": global_balanced_assignment(uneven_rows, accelerator).tolist(),
    }
    (args.out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
