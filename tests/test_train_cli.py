"""`aptp-train` end to end on the tiny preset: prune -> route -> finetune, exact resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aptp.train.cli import main

# Small enough for CI's 2 cores, long enough to pass the router warm-up and save two states.
FAST = [
    "--set", "prune.router_warmup_steps=2", "--set", "prune.batch_size=4", "--set", "prune.checkpoint_every=3",
    "--set", "data.num_samples=32", "--set", "finetune.batch_size=4", "--set", "prune.learning_rate=1.0",
]


def prune(output: Path, steps: int, *extra: str) -> int:
    return main(["prune", "--config", "tiny", "--output-dir", str(output), "--max-steps", str(steps), *FAST, *extra])


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prune") / "run"
    assert prune(out, 8) == 0
    return out


def test_prune_writes_codes_router_macs_and_experts(pruned):
    info = json.loads((pruned / "checkpoint.json").read_text())
    k = info["num_codes"]
    assert k == 4 and len(info["code_macs_ratio"]) == k and len(info["code_share"]) == k
    assert all(0 < r <= 1 for r in info["code_macs_ratio"])
    assert min(info["code_macs_ratio"]) < 1.0, "8 steps at a large rate should have pruned something"
    codes = load_file(str(pruned / "codes.safetensors"))
    assert codes["logits"].shape[0] == k and codes["hard_masks"].shape == codes["logits"].shape
    assert (pruned / "router_head" / "config.json").is_file()
    for i in range(k):
        spec = json.loads((pruned / "experts" / f"expert_{i}" / "arch_spec.json").read_text())
        assert spec["sites"] and all(s["kept_units"] for s in spec["sites"] if s["kind"] != "depth")
    log = [json.loads(line) for line in (pruned / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(8))
    assert {"code_macs_ratio", "code_share", "contrastive", "assignment"} <= set(log[-1])
    assert {"denoise", "resource", "distill_output", "distill_blocks"} <= set(log[-1])


def test_route_then_finetune(pruned, tmp_path, capsys):
    routing = tmp_path / "routing.json"
    assert main(["route", "--checkpoint", str(pruned), "--output", str(routing)]) == 0
    data = json.loads(routing.read_text())
    assert data["num_prompts"] == 32 and sum(data["counts"]) == 32
    assert len(data["assignments"]) == 32
    expected = sum(s * r for s, r in zip(data["share"], data["code_macs_ratio"]))
    assert abs(expected - data["expected_macs_ratio"]) < 1e-9
    expert = max(range(4), key=lambda k: data["counts"][k])
    before = load_file(str(pruned / "experts" / f"expert_{expert}" / "diffusion_pytorch_model.safetensors"))
    assert main(["finetune", "--checkpoint", str(pruned), "--expert", str(expert), "--max-steps", "2"]) == 0
    after_dir = pruned / "experts" / f"expert_{expert}"
    after = load_file(str(after_dir / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[n], after[n]) for n in before), "fine-tuning changed no weight"
    assert json.loads((after_dir / "expert.json").read_text())["finetuned"] is True
    from aptp.train.experts import load_expert

    load_expert(after_dir)  # rebuilds from base config + arch spec + weights


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "aptp.train.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


@contextmanager
def torch_threads(count: int):
    """Run in-process work on as many threads as `_run_cli`'s subprocess: with another count the
    CPU kernels may reduce in another order, and exact comparisons fail for that reason alone
    (they did on a 2-core AMD EPYC machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_killed_prune_resumes_to_the_same_result(tmp_path):
    steps = "12"
    whole = tmp_path / "whole"
    with torch_threads(1):
        assert prune(whole, int(steps)) == 0

    killed = tmp_path / "killed"
    proc = _run_cli(["prune", "--config", "tiny", "--output-dir", str(killed), "--max-steps", steps, *FAST])
    deadline = time.time() + 240
    while not (killed / "state" / "step_5" / "COMPLETE").exists():
        assert proc.poll() is None, f"prune exited before its checkpoint: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoint.json").exists(), "the run finished before it was killed: nothing was resumed"

    with torch_threads(1):
        assert prune(killed, int(steps), "--resume") == 0
    a, b = load_file(str(whole / "codes.safetensors")), load_file(str(killed / "codes.safetensors"))
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["hard_masks"], b["hard_masks"])
    ha = load_file(str(whole / "router_head" / "diffusion_pytorch_model.safetensors"))
    hb = load_file(str(killed / "router_head" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ha[n], hb[n]) for n in ha)
    steps_logged = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(int(steps)))


def test_resume_refuses_a_changed_budget(pruned, tmp_path, capsys):
    assert prune(tmp_path / "r", 4) == 0
    assert prune(tmp_path / "r", 6, "--resume", "--set", "budget.target=0.3") == 2
    assert "different config" in capsys.readouterr().err


def test_resuming_a_finished_run_changes_nothing(pruned):
    before = (pruned / "codes.safetensors").read_bytes()
    assert prune(pruned, 8, "--resume") == 0
    assert (pruned / "codes.safetensors").read_bytes() == before


def test_existing_run_is_not_overwritten(pruned, capsys):
    before = (pruned / "checkpoint.json").read_text()
    assert prune(pruned, 2) == 2
    assert "--resume" in capsys.readouterr().err
    assert (pruned / "checkpoint.json").read_text() == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("router.encoder=no-such-encoder-xyz", "no-such-encoder-xyz"),
        ("data.format=jsonl", "data.path is required"),
    ],
)
def test_bad_training_input_is_one_clear_line(tmp_path, capsys, override, message):
    assert prune(tmp_path / "bad", 2, "--set", override) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_dataset_is_refused(tmp_path, capsys):
    data = tmp_path / "captions.jsonl"
    data.write_bytes(b"\xff\xfe not utf-8\n{\"image\": \"missing.png\", \"text\": \"a cat\"}\n")
    code = prune(tmp_path / "bad", 2, "--set", "data.format=jsonl", "--set", f"data.path={data}")
    err = capsys.readouterr().err
    assert code == 2 and "no usable samples" in err and "Traceback" not in err


def test_warmup_never_swallows_a_short_run():
    from aptp.train.prune import effective_warmup

    assert effective_warmup(20, 200) == 20
    assert effective_warmup(20, 20) == 2
    assert effective_warmup(500, 5) == 0


class _RunsACommand:
    def __reduce__(self):
        return (os.system, ("touch pickle-was-executed",))


def test_resume_from_a_state_holding_a_hostile_pickle_is_one_line(tmp_path, capsys, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "r"
    assert prune(run, 4) == 0
    states = sorted((run / "state").glob("step_*/random_states_*.pkl"))
    assert states, "the run saved no random state: nothing to tamper with"
    states[-1].write_bytes(pickle.dumps(_RunsACommand()))
    capsys.readouterr()
    assert prune(run, 6, "--resume") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "is not a plain training state (it was refused, not executed" in err[0], err
    assert not (tmp_path / "pickle-was-executed").exists()
