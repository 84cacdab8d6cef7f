"""Flags a hostile-input run found ending in a traceback (or leaving files behind) are one line
and exit 2, before anything is written."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("argv, message", [
    (["--budgets", "nanx"], "a budget multiple must be a number in (0, 1e+06], got 'nanx'"),
    (["--budgets", "infx"], "a budget multiple must be a number in (0, 1e+06], got 'infx'"),
    (["--max-wait-s", "-1"], "--max-wait-s must be in [0, 3600] seconds, got -1.0"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number in [0, 100], got nan"),
])
def test_memory_suite_flags_are_one_line(tmp_path, capsys, argv, message):
    from aptp.benchmarks.cli import main

    assert main(["memory", "--artifacts", str(tmp_path), "--output-dir", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("replicas", [str(10**30), "0=5000", "0"])
def test_serve_replica_counts_are_bounded(tmp_path, capsys, replicas):
    from aptp.runtime.serve_cli import main

    assert main(["--ray", "--artifacts", str(tmp_path), "--replicas", replicas]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--replicas counts must be between 1 and 1024" in err[0], err


def test_a_text_length_past_the_encoder_is_one_line(tmp_path, capsys):
    from aptp.train.cli import main

    out = tmp_path / "run"
    assert main(["prune", "--config", "tiny", "--output-dir", str(out), "--max-steps", "1",
                 "--set", "model.text_length=100000"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and "model.text_length 100000 is longer than the text encoder reads (32 tokens" in err[0]


def test_a_refused_pretrain_leaves_no_folder(tmp_path, capsys):
    from aptp.train.cli import main

    out = tmp_path / "pipeline"
    assert main(["pretrain", "--output-dir", str(out), "--init-from", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers must be an integer in [1, 64] or 'auto'"),
    (["--workers", "many"], "--workers must be an integer in [1, 64] or 'auto'"),
    (["--ray", "--workers", "2"], "--workers only apply to the local mode"),
])
def test_serve_workers_are_checked_before_anything_starts(tmp_path, capsys, argv, message):
    from aptp.runtime.serve_cli import main

    assert main(["--artifacts", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("argv, message", [
    (["--e2e-workers", "0"], "expected comma-separated positive integers, got '0'"),
    (["--e2e-workers", "65"], "--e2e-workers must be integers in [1, 64], got [65]"),
    (["--calls-in-a-row", "0"], "expected a positive integer, got 0"),
])
def test_latency_suite_dispatch_flags_are_one_line(tmp_path, capsys, argv, message):
    from aptp.benchmarks.cli import main

    try:
        code = main(["latency", "--artifacts", str(tmp_path), "--output-dir", str(tmp_path / "out"), *argv])
    except SystemExit as exit_:  # argparse's own type errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(message in line for line in err), err
    assert not (tmp_path / "out").exists()
