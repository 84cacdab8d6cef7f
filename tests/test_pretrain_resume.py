"""aptp-train pretrain --resume: training states, exact resume, and the errors around them.

The resume test trains a tiny pipeline (32 px, batches of 2, a few steps) once uninterrupted
and once interrupted three times (inside the VAE stage, at the start of the UNet stage and
inside it), resuming each time; the two pipelines must be bitwise identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aptp.errors import ConfigError

SETTINGS = [
    "num_samples=16", "num_threads=1", "resolution=32", "checkpoint_every=2",
    "vae.max_steps=3", "vae.batch_size=2", "unet.max_steps=5", "unet.batch_size=2", "unet.warmup_steps=1",
]


def _config(*extra: str):
    from aptp.train.pretrain import load_pretrain_config

    return load_pretrain_config("tiny_teacher", [*SETTINGS, *extra])


def _cli(args: list) -> tuple[int, list[str]]:
    """Run ``aptp-train`` in-process; returns the exit code and its own stderr lines."""
    import contextlib
    import io

    from aptp.train.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, [line for line in err.getvalue().splitlines() if line.startswith("aptp-train")]


def _interrupt_at(monkeypatch, stage: str, step: int) -> None:
    """Ctrl-C during the given step (after its update, before its log line and any state)."""
    from aptp.train.pretrain_state import TrainLog

    monkeypatch.undo()  # one interruption at a time
    write = TrainLog.write

    def interrupting(self, record):
        if (record["stage"], record["step"]) == (stage, step):
            raise KeyboardInterrupt
        write(self, record)

    monkeypatch.setattr(TrainLog, "write", interrupting)


def _weights(pipeline: Path) -> dict[str, bytes]:
    return {str(p.relative_to(pipeline)): p.read_bytes() for p in sorted(pipeline.rglob("*.safetensors"))}


def _log(pipeline: Path) -> list[dict]:
    records = [json.loads(line) for line in (pipeline / "pretrain_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


@pytest.mark.slow
def test_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
    from aptp.train import pretrain
    from aptp.train.pretrain import run_pretrain
    from aptp.train.pretrain_state import STATE_DIR, latest_state

    reference = run_pretrain(_config(), tmp_path / "reference")
    assert not (reference / STATE_DIR).exists() and not list(reference.rglob("*.pt"))

    out = tmp_path / "resumed"
    # Through the CLI: Ctrl-C exits 130 and keeps the last complete state (vae step 2).
    _interrupt_at(monkeypatch, "vae", 2)
    overrides = [a for s in SETTINGS for a in ("--set", s)]
    rc, _ = _cli(["pretrain", "--output-dir", out, *overrides])
    assert rc == 130
    state = latest_state(out)
    assert (state.stage, state.step, state.done) == ("vae", 2, False)
    assert not (out / "model_index.json").exists() and [p.name for p in (out / STATE_DIR).iterdir()
                                                         if p.is_dir()] == [state.path.name]

    # Neither a fresh run nor a resume under another config may touch it.
    with pytest.raises(ConfigError, match="unfinished run: pass --resume"):
        run_pretrain(_config(), out)
    with pytest.raises(ConfigError, match=r"differs in seed \(0 -> 1\), unet.max_steps \(5 -> 6\)"):
        run_pretrain(_config("seed=1", "unet.max_steps=6"), out, resume=True)
    with pytest.raises(ConfigError, match="differs in stages"):
        run_pretrain(_config(), out, resume=True, stages=["vae"])
    rc, lines = _cli(["pretrain", "--output-dir", out, "--resume", *overrides, "--set", "unet.batch_size=4"])
    assert rc == 2 and len(lines) == 1 and "unet.batch_size (2 -> 4)" in lines[0], lines
    assert latest_state(out).path == state.path

    # Resume, interrupted again at the first UNet step: the VAE stage's end state is the latest.
    _interrupt_at(monkeypatch, "unet", 0)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(_config(), out, resume=True)
    state = latest_state(out)
    assert (state.stage, state.step, state.done) == ("vae", 3, True)

    # Resume, interrupted inside the UNet stage (state at unet step 2, with EMA and optimiser).
    _interrupt_at(monkeypatch, "unet", 3)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(_config(), out, resume=True)
    state = latest_state(out)
    assert (state.stage, state.step, state.done) == ("unet", 2, False)
    assert (state.path / "ema_unet.safetensors").is_file() and (state.path / "optimizer.pt").is_file()

    # The last resume, with another checkpoint_every (it cannot change the result), runs to the end;
    # its progress bar continues from step 2 of 5 rather than restarting.
    monkeypatch.undo()
    bars = []

    def recording_tqdm(*args, **kwargs):
        bars.append((kwargs.get("desc"), kwargs.get("initial", 0), kwargs.get("total")))
        return pretrain.tqdm.__wrapped__(*args, **kwargs, disable=True)

    recording_tqdm.__wrapped__ = pretrain.tqdm
    monkeypatch.setattr(pretrain, "tqdm", recording_tqdm)
    assert run_pretrain(_config("checkpoint_every=3"), out, resume=True) == out
    assert bars == [("pretrain unet", 2, 5)]

    resumed, uninterrupted = _weights(out), _weights(reference)
    assert sorted(resumed) == sorted(uninterrupted) and len(resumed) == 3
    assert [name for name in resumed if resumed[name] != uninterrupted[name]] == []
    # The log continues: every step once, in order, with the same losses.
    assert _log(out) == _log(reference)
    assert [(r["stage"], r["step"]) for r in _log(out)] == [("vae", s) for s in range(3)] + [("unet", s) for s in range(5)]
    assert not (out / STATE_DIR).exists() and not list(out.rglob("*.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "resumed"]


def test_resume_errors_are_one_line(tmp_path):
    # --resume with --overwrite, --resume without a state: one clear line each, exit 2.
    rc, lines = _cli(["pretrain", "--output-dir", tmp_path / "p", "--resume", "--overwrite"])
    assert rc == 2 and lines == [lines[0]] and "--resume and --overwrite exclude each other" in lines[0]
    rc, lines = _cli(["pretrain", "--output-dir", tmp_path / "p", "--resume"])
    assert rc == 2 and "cannot resume" in lines[0] and "holds no pretrain training state" in lines[0]
    assert not (tmp_path / "p").exists()
    # A folder aptp did not write is refused before anything is read from it.
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    rc, lines = _cli(["pretrain", "--output-dir", folder, "--resume"])
    assert rc == 2 and "not a pipeline written by aptp-train pretrain" in lines[0]
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]
    with pytest.raises(ConfigError, match="checkpoint_every must be >= 0"):
        _config("checkpoint_every=-1")


def test_state_interrupted_while_saving_keeps_the_previous_one(tmp_path, monkeypatch):
    from aptp.train import pretrain_state
    from aptp.train.pretrain_state import STATE_DIR, latest_state, load_modules, save_state

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    identity = {"seed": 0}
    first = save_state(tmp_path, stage="unet", step=2, done=False, identity=identity, modules={"unet": model})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_state, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_state(tmp_path, stage="unet", step=4, done=False, identity=identity, modules={"unet": model})
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / STATE_DIR).iterdir()] == [first.path.name]  # no temp left behind
    state = latest_state(tmp_path)
    assert state.path == first.path and state.step == 2
    load_modules(state, {"unet": model})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    # A complete newer state replaces it, and only then is the older one removed.
    second = save_state(tmp_path, stage="unet", step=4, done=False, identity=identity, modules={"unet": model})
    assert latest_state(tmp_path).path == second.path and not first.path.exists()


def test_overwrite_starts_an_unfinished_run_over(tmp_path, monkeypatch):
    from aptp.outputs import PIPELINE, claim_in_place
    from aptp.train.pretrain import run_pretrain
    from aptp.train.pretrain_state import latest_state, save_state

    out = tmp_path / "run"
    claim_in_place(out, PIPELINE)
    save_state(out, stage="unet", step=2, done=False, identity={"seed": 7}, modules={"unet": torch.nn.Linear(2, 2)})
    with pytest.raises(ConfigError, match="unfinished run: pass --resume to continue it or --overwrite"):
        run_pretrain(_config(), out)
    with pytest.raises(ConfigError, match=r"another config \(differs in .*seed \(7 -> 0\)"):
        run_pretrain(_config(), out, resume=True)
    assert latest_state(out).step == 2
    # --overwrite drops the old run's state at once (interrupted before the new run saved one).
    _interrupt_at(monkeypatch, "vae", 0)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(_config(), out, overwrite=True)
    assert latest_state(out) is None and PIPELINE.owns(out)
