"""The open-loop load generator and `aptp-bench serve`'s plumbing (no timing is asserted)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from aptp.benchmarks.serving.loadgen import highest_sustained, poisson_arrivals, run_open_loop, summarize_load


def test_poisson_arrivals_are_seeded_and_bounded():
    a = poisson_arrivals(4.0, 200, seed=3, max_seconds=10.0)
    assert np.array_equal(a, poisson_arrivals(4.0, 200, seed=3, max_seconds=10.0))
    assert not np.array_equal(a, poisson_arrivals(4.0, 200, seed=4, max_seconds=10.0))
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0) and a[-1] < 10.0 and len(a) <= 200
    assert 20 < len(a) < 60  # about rate x time = 40 arrivals within 10 s
    assert len(poisson_arrivals(100.0, 5, seed=0, max_seconds=10.0)) == 5
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, 5, seed=0, max_seconds=1.0)


def _fake_server(service_s: float, batch: int):
    """Futures that resolve after `service_s`; requests 2 and 8 fail, request 5 never answers, request 7 is refused."""
    timers = []

    def send(i: int) -> Future:
        future: Future = Future()
        if i == 5:
            return future
        if i == 7:
            raise RuntimeError("queue full")

        def finish():
            if i % 3 == 2:
                future.set_exception(ValueError("boom"))
            else:
                future.set_result({"expert": i % 2, "batch_size": batch})
        timer = threading.Timer(service_s, finish)
        timers.append(timer)
        timer.start()
        return future
    return send, timers


def test_open_loop_records_every_outcome_and_never_waits_past_the_drain():
    send, timers = _fake_server(0.05, batch=2)
    arrivals = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08]
    clock = time.monotonic()
    outcomes = run_open_loop(send, arrivals, drain_s=0.5)
    assert time.monotonic() - clock < 5.0
    for timer in timers:
        timer.join()
    assert [o.index for o in outcomes] == list(range(9))
    assert outcomes[5].error == "timeout" and outcomes[7].error.startswith("RuntimeError")
    assert outcomes[2].error.startswith("ValueError") and outcomes[0].ok and outcomes[0].latency >= 0.05
    # open loop: sends follow the schedule, not the answers
    assert all(o.sent - o.scheduled < 0.5 for o in outcomes)
    stats = summarize_load(outcomes, rate=100.0, slo_s=10.0)
    assert stats["requests"] == 9 and stats["completed"] == 5
    assert stats["errors"] == {"timeout": 1, "RuntimeError": 1, "ValueError": 2}
    assert not stats["sustained"]
    assert stats["mean_batch"] == pytest.approx(2.0)
    assert {k: v["requests"] for k, v in stats["batches"].items()} == {"0": 3, "1": 2}


def test_highest_sustained_stops_at_the_first_failure():
    runs = [{"offered_rate": r, "sustained": s} for r, s in [(2.0, False), (0.5, True), (1.0, True), (4.0, True)]]
    assert highest_sustained(runs) == 1.0
    assert highest_sustained([{"offered_rate": 1.0, "sustained": False}]) is None


def test_bench_serve_bad_input_is_one_line_exit_2(capsys, tmp_path):
    from aptp.benchmarks.cli import main

    assert main(["serve", "--artifacts", str(tmp_path / "none")]) == 2
    with pytest.raises(SystemExit) as info:  # argparse's usage error, one line too
        main(["serve", "--artifacts", str(tmp_path), "--rates", "1,-2"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("aptp-bench serve: error:") or
                                   line.startswith("aptp-bench: error:") for line in lines)


def test_the_local_mode_run_serves_the_same_images_and_reports_its_overhead(tmp_path_factory):
    """`aptp-bench serve`'s local-mode run against the tiny export: aptp-serve's default server in
    this process, loopback only, stopped afterwards (its port is free again)."""
    import socket

    pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'aptp[local]')")
    from aptp.benchmarks.serving.local_run import run_local_http
    from runtime_fixtures import FOOD_PROMPTS, VEHICLE_PROMPTS, tiny_export

    export = tiny_export(tmp_path_factory.mktemp("runtime"))
    prompts = [*VEHICLE_PROMPTS, *FOOD_PROMPTS]
    result = run_local_http(export, {"prompts": prompts, "seeds": list(range(100, 100 + len(prompts))),
                                     "codes": None, "rates": [4.0], "count": 3, "max_seconds": 5.0, "drain_s": 120.0,
                                     "slo_s": 60.0, "seed": 0, "max_wait_s": 0.02, "threads": 1,
                                     "overhead_requests": 2})
    assert result["url"].startswith("http://127.0.0.1:")
    assert result["identity"]["identical_images"] == result["identity"]["requests"] == 2
    assert result["identity"]["same_expert"] == 2
    over = result["overhead"]
    assert len(over["http_s"]) == len(over["direct_s"]) == 2 and over["overhead_ratio"] > 0
    assert [(r["server"], r["variant"]) for r in result["runs"]] == [("local", "routed"), ("local", "dense")]
    assert all(r["completed"] == r["requests"] == 3 for r in result["runs"])
    port = int(result["url"].rsplit(":", 1)[1])
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))  # nothing listens there any more: the server was stopped
