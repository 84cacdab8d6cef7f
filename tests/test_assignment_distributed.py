"""The balanced assignment is solved on the global batch: 2 gloo processes == 1 process."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from aptp.train.assignment import balanced_assignment, global_balanced_assignment

HERE = Path(__file__).parent
WORKER = HERE / "_dist_sinkhorn_worker.py"
_spec = importlib.util.spec_from_file_location("_dist_sinkhorn_worker", WORKER)
_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_worker)
global_scores = _worker.global_scores

SEED, BATCH, CODES, UNEVEN_FIRST = 3, 16, 4, 9


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeAccelerator:
    """In-process stand-in for rank `process_index` of a group whose ranks hold `all_scores`."""

    def __init__(self, process_index, all_scores):
        self.process_index, self.num_processes, self.all_scores = process_index, len(all_scores), all_scores
        self.padded = max(s.shape[0] for s in all_scores)

    def gather(self, tensor):
        if tensor.dim() == 1 and tensor.dtype == torch.long:  # the batch sizes
            return torch.tensor([s.shape[0] for s in self.all_scores])
        pad = lambda s: torch.cat([s, s.new_zeros(tensor.shape[0] - s.shape[0], *s.shape[1:])])  # noqa: E731
        return torch.cat([pad(s) for s in self.all_scores])

    def pad_across_processes(self, tensor, dim=0):
        return torch.cat([tensor, tensor.new_zeros(self.padded - tensor.shape[0], *tensor.shape[1:])])


def test_global_assignment_slices_the_global_solution_in_process():
    scores = global_scores(SEED, BATCH, CODES)
    expected = balanced_assignment(scores)
    for sizes in ([8, 8], [UNEVEN_FIRST, BATCH - UNEVEN_FIRST], [5, 5, 6]):
        parts = scores.split(sizes)
        got = [global_balanced_assignment(parts[r], FakeAccelerator(r, parts)) for r in range(len(parts))]
        assert torch.equal(torch.cat(got), expected), sizes
    # Solving per process instead would differ: the local problems are not the global one.
    local = torch.cat([balanced_assignment(p) for p in scores.split([8, 8])])
    assert not torch.equal(local, expected)


def test_two_gloo_processes_match_one_process(tmp_path):
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(WORKER), str(tmp_path),
        "--seed", str(SEED), "--batch", str(BATCH), "--codes", str(CODES), "--uneven-first", str(UNEVEN_FIRST),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["backend"] == "gloo"
    assert [len(r["equal"]) for r in ranks] == [8, 8]
    assert [len(r["uneven"]) for r in ranks] == [UNEVEN_FIRST, BATCH - UNEVEN_FIRST]

    expected = balanced_assignment(global_scores(SEED, BATCH, CODES)).tolist()
    assert ranks[0]["equal"] + ranks[1]["equal"] == expected
    assert ranks[0]["uneven"] + ranks[1]["uneven"] == expected
    assert len(set(expected)) == CODES  # the global solution really balances the codes
