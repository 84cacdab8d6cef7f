"""The Ray Serve app (aptp.runtime.ray_serve) over HTTP, and its request contract.

The HTTP contract and the replica plan are checked without Ray. The Ray tests start Ray once
for the module, in `_ray_serve_worker.py` run inside a fresh network namespace with only
loopback (``unshare -n`` + ``ip link set lo up``): single node, 2 CPUs, no dashboard, usage
stats off, temp dir under the pytest run's tmp path, bounded request loops. The worker writes
every response; the tests here compare them with in-process `AptpPipeline` results and check
that no process Ray started outlives it. They skip, naming what is missing, without Ray Serve
(``pip install 'aptp[serve]'``) or without permission to create a network namespace.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from aptp.errors import ConfigError
from aptp.runtime.serve_http import HttpError, parse_request, response_format
from runtime_fixtures import FOOD_PROMPTS, VEHICLE_PROMPTS, tiny_export

WORKER = Path(__file__).with_name("_ray_serve_worker.py")
WORKER_TIMEOUT_S = 420
PROMPTS = [*VEHICLE_PROMPTS, *FOOD_PROMPTS, "a blue bicycle", "a hamburger with fries", "a green apple",
           "a motorbike at night", "a cup of coffee", "a bus in the rain", "a bowl of ramen", "a sailing boat",
           "a pizza with olives", "a logo"]
assert len(PROMPTS) == 16


# ---- without Ray --------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, message", [
    (b"{prompt: 1", 400, "not valid JSON"),
    (b"[]", 400, "JSON object"),
    (b"", 400, "empty request body"),
    (b'{"prompt": "a", "sed": 1}', 400, "unknown field"),
    (b'{"seed": 1}', 400, "missing field 'prompt'"),
    (b'{"prompt": 3}', 400, "must be a string"),
    (b'{"prompt": " "}', 400, "is empty"),
    (b'{"prompt": "\xff"}', 400, "not UTF-8"),
    (b'{"prompt": "' + b"a" * 70000 + b'"}', 413, "limit"),
    (b'{"prompt": "a red \\ud800 car"}', 400, "lone surrogate U\\+D800"),
    (b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", 400, "number aptp cannot read"),
    (b"[" * 30000 + b"]" * 30000, 400, "nests JSON arrays or objects too deeply"),
    (b'{"prompt": "a", "seed": {"x": ' + b"[" * 20000 + b"]" * 20000 + b"}}", 400, "too deeply"),
])
def test_malformed_bodies_get_one_clear_4xx(body, status, message):
    with pytest.raises(HttpError, match=message) as info:
        parse_request(body)
    assert info.value.status == status and "\n" not in str(info.value)


def test_request_fields_and_format():
    parsed = parse_request(b'{"prompt": "a red car", "seed": 3, "steps": 4, "guidance_scale": 2.0}')
    assert (parsed.prompt, parsed.seed, parsed.steps, parsed.guidance_scale) == ("a red car", 3, 4, 2.0)
    assert response_format({}, None) == "png"
    assert response_format({}, "application/json") == "json"
    assert response_format({"format": "png"}, "application/json") == "png"
    with pytest.raises(HttpError, match="format must be one of"):
        response_format({"format": "xml"}, None)


def test_replicas_follow_prompt_shares():
    from aptp.runtime.ray_serve import replica_counts

    assert replica_counts([0.5, 0.25, 0.25], 3) == [1, 1, 1]
    assert replica_counts([0.7, 0.2, 0.1], 8) == [5, 2, 1]
    assert sum(replica_counts([0.4, 0.35, 0.25], 9)) == 9
    with pytest.raises(ConfigError, match="at least 3"):
        replica_counts([0.5, 0.3, 0.2], 2)


def test_replica_plan_of_an_export(tmp_path_factory):
    from aptp.runtime import load_artifacts
    from aptp.runtime.ray_serve import ServeOptions, deployment_plan

    export = load_artifacts(tiny_export(tmp_path_factory.mktemp("runtime")), verify=False)
    plan = deployment_plan(export, ServeOptions(replicas=5))
    assert {k: v["name"] for k, v in plan.items()} == {0: "expert-0", 1: "expert-1", "dense": "dense"}
    assert plan["dense"]["replicas"] == 1 and plan[0]["replicas"] + plan[1]["replicas"] == 4
    assert {k: v["replicas"] for k, v in deployment_plan(export, ServeOptions(replicas={0: 3}, dense=False)).items()
            } == {0: 3, 1: 1}
    with pytest.raises(ConfigError, match="at least 3"):
        deployment_plan(export, ServeOptions(replicas=2))
    with pytest.raises(ConfigError, match="unknown model"):
        deployment_plan(export, ServeOptions(replicas={7: 1}))


def test_a_plan_the_cluster_cannot_place_is_refused_with_flags_that_fit(tmp_path_factory):
    """The default plan (1 CPU per model + 0.5 for the router) on a 2-core machine: Ray Serve
    would wait forever; the refusal names what is needed and a --num-cpus that fits."""
    from aptp.runtime import load_artifacts
    from aptp.runtime.ray_serve import ServeOptions, check_placement, deployment_plan

    export = load_artifacts(tiny_export(tmp_path_factory.mktemp("runtime")), verify=False)
    options = ServeOptions()
    plan = deployment_plan(export, options)
    with pytest.raises(ConfigError, match=r"has 2 CPUs but this app needs 3.5 \(3 model replica\(s\) x --num-cpus 1 "
                                          r"\+ 0.5 for the router\).*pass --num-cpus 0.5 or fewer"):
        check_placement(plan, options, {"CPU": 2.0})
    check_placement(plan, ServeOptions(num_cpus=0.5), {"CPU": 2.0})  # what the message proposes fits
    with pytest.raises(ConfigError, match="has 0 GPUs but this app needs 3"):
        check_placement(plan, ServeOptions(num_cpus=0.1, num_gpus=1.0), {"CPU": 2.0})


@pytest.mark.parametrize("argv, message", [
    (["--artifacts", "/nonexistent/export"], "does not exist"),
    (["--artifacts", "EXPORT", "--ray", "--replicas", "0=x"], "--replicas must be"),
    (["--artifacts", "EXPORT", "--ray", "--replicas", "1"], "at least 3"),
    (["--artifacts", "EXPORT", "--ray", "--max-wait", "-1"], "--max-wait must be a finite number of seconds >= 0"),
    (["--artifacts", "EXPORT", "--max-wait", "nan"], "--max-wait must be a finite number of seconds >= 0"),
    (["--artifacts", "EXPORT", "--replicas", "2"], "--replicas only apply to --ray"),
])
def test_serve_cli_bad_input_is_one_line_exit_2(argv, message, tmp_path_factory, capsys):
    from aptp.runtime.serve_cli import main

    export = str(tiny_export(tmp_path_factory.mktemp("runtime")))
    assert main([export if a == "EXPORT" else a for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aptp-serve: error:") and message in err[0]


def test_runtime_imports_without_touching_ray():
    code = ("import sys, aptp.runtime, aptp.runtime.ray_serve, aptp.runtime.serve_http, aptp.runtime.http_app, "
            "aptp.runtime.a1111, aptp.runtime.local_serve; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- with Ray, in a network namespace ----------------------------------------------------


def _namespace_problem() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs `unshare` and `ip` (util-linux, iproute2) to isolate Ray's network"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode:
        return f"cannot create a loopback-only network namespace: {probe.stderr.strip() or probe.returncode}"
    return None


def _alive(pid: int, start: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        pytest.skip("Ray Serve is not installed: pip install 'aptp[serve]'")
    problem = _namespace_problem()
    if problem:
        pytest.skip(problem)
    export = tiny_export(tmp_path_factory.mktemp("runtime"))
    out = tmp_path_factory.mktemp("serve")
    ray_tmp = tmp_path_factory.getbasetemp() / "r"  # short: Ray's socket paths must fit 107 bytes
    own_tmp = None
    if len(str(ray_tmp)) > 48:  # a long TMPDIR: Ray's session folder would not fit under it
        own_tmp = ray_tmp = Path(tempfile.mkdtemp(prefix="aptp-r", dir="/tmp"))
    ray_tmp.mkdir(exist_ok=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, str(WORKER),
               str(export), str(out), str(ray_tmp), json.dumps(PROMPTS)]
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group: what this test started
        log, _ = proc.communicate()
        pytest.fail(f"the Ray worker did not finish within {WORKER_TIMEOUT_S} s:\n{log[-4000:]}")
    finally:
        if own_tmp is not None:
            shutil.rmtree(own_tmp, ignore_errors=True)
    report_path = out / "results.json"
    assert report_path.is_file(), f"the Ray worker wrote no report (exit {proc.returncode}):\n{log[-4000:]}"
    report = json.loads(report_path.read_text())
    assert "crashed" not in report, report["crashed"]
    report["log"] = log
    return report


@pytest.fixture(scope="module")
def reference(served, tmp_path_factory):
    """In-process results of every (prompt, seed) the worker sent: image and expert."""
    from aptp.runtime import AptpPipeline

    pipe = AptpPipeline.from_export(tiny_export(tmp_path_factory.mktemp("runtime")), threads=1)
    wanted = {**{(p, 100 + i): None for i, p in enumerate(PROMPTS)},
              **{(p, 500 + i): None for i, p in enumerate(PROMPTS)},
              **{(p, 700 + i): None for i, p in enumerate(PROMPTS[:4])},
              **{(p, 300 + i): None for i, p in enumerate(PROMPTS)}}
    keys = list(wanted)
    results = pipe([p for p, _ in keys], seeds=[s for _, s in keys])
    dense = pipe([PROMPTS[1]], seeds=[101], expert="dense")[0]
    return {key: (r.image, r.expert) for key, r in zip(keys, results)} | {"dense": (dense.image, dense.expert)}


def _pixels(entry: dict) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(entry["png_path"]).convert("RGB"))


def _assert_same(entry: dict, want: tuple[np.ndarray, object]) -> None:
    assert entry["status"] == 200, entry
    assert entry["expert"] == str(want[1])
    # onnxruntime may round differently at another batch size: allow one 8-bit level.
    got = _pixels(entry).astype(int)
    assert got.shape == want[0].shape
    assert np.abs(got - want[0].astype(int)).max() <= 1


@pytest.mark.slow
def test_sixteen_prompts_over_http_equal_in_process(served, reference):
    parity = served["parity"]
    for i, prompt in enumerate(PROMPTS):
        entry = parity[f"parity_{i}"]
        assert entry["seed"] == str(100 + i)
        _assert_same(entry, reference[(prompt, 100 + i)])
    experts = {parity[f"parity_{i}"]["expert"] for i in range(16)}
    assert experts == {"0", "1"}  # both experts served
    assert max(int(parity[f"parity_{i}"]["batch_size"]) for i in range(16)) > 1  # @serve.batch formed batches
    _assert_same(parity["dense_0"], reference["dense"])
    body = json.loads(parity["json_0"]["body"])
    assert body["expert"] == reference[(PROMPTS[0], 100)][1] and body["seed"] == 100
    assert {"route", "denoise", "decode", "serve_total"} <= set(body["timings"])
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image_png_base64"]))).convert("RGB"))
    assert np.abs(pixels.astype(int) - reference[(PROMPTS[0], 100)][0].astype(int)).max() <= 1


@pytest.mark.slow
def test_a1111_api_and_page_answer_on_the_ray_router(served, reference):
    a1111 = served["a1111"]
    assert a1111["txt2img"]["status"] == 200, a1111["txt2img"]
    body = json.loads(a1111["txt2img"]["body"])
    info = json.loads(body["info"])
    want_image, want_expert = reference[(PROMPTS[0], 100)]
    from PIL import Image

    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB"))
    assert np.abs(got.astype(int) - want_image.astype(int)).max() <= 1
    assert info["aptp"]["images"][0]["expert"] == want_expert and info["all_seeds"] == [100]
    assert a1111["bad_sampler"]["status"] == 422 and "Euler a" in json.loads(a1111["bad_sampler"]["body"])["detail"]
    assert {e["expert"] for e in json.loads(a1111["sd_models"]["body"])[0]["aptp"]["experts"]} == {0, 1, "dense"}
    assert json.loads(a1111["progress"]["body"])["progress"] == 0
    assert a1111["page"]["status"] == 200 and a1111["page"]["csp"].startswith("default-src 'self'")
    client = a1111["webuiapi"]  # the webuiapi client from PyPI, through the same router
    if "skipped" in client:
        pytest.skip(client["skipped"])
    assert client["seeds"] == [100] and client["aptp"]["expert"] == want_expert
    assert "macs_ratio" in client["aptp"]


@pytest.mark.slow
def test_malformed_requests_get_4xx_and_do_not_disturb_others(served, reference):
    results = served["malformed"]
    bad = {name: r for name, r in results.items() if name.startswith("bad_")}
    assert len(bad) == 19
    for name, entry in bad.items():
        assert entry["status"] is not None and 400 <= entry["status"] < 500, (name, entry)
        message = json.loads(entry["body"])["error"]
        assert message and "\n" not in message and "Traceback" not in message, (name, message)
    assert bad["bad_too_large"]["status"] == 413 and bad["bad_put"]["status"] == 405
    assert "steps" in json.loads(bad["bad_steps_out_of_range"]["body"])["error"]
    good = {name: r for name, r in results.items() if name.startswith("good_")}
    assert len(good) == 16  # the lone surrogate among them fails alone, not their batches
    for name, entry in good.items():
        i = int(name.split("_")[1])
        _assert_same(entry, reference[(PROMPTS[i], 300 + i)])


@pytest.mark.slow
def test_killed_replica_is_restarted_and_no_request_hangs(served, reference):
    kill = served["kill"]
    assert kill["recovered"] and kill["pid_after"] != kill["pid_before"]
    loaded = {name: r for name, r in kill["results"].items() if name.startswith("load_")}
    assert len(loaded) == 16
    completed = 0
    for name, entry in loaded.items():
        assert entry["status"] is not None, (name, entry)  # answered: no timeout, no dropped connection
        i = int(name.split("_")[1])
        if entry["status"] == 200:
            _assert_same(entry, reference[(PROMPTS[i], 500 + i)])
            completed += 1
        else:
            assert entry["status"] == 503, (name, entry)
            assert "retry" in json.loads(entry["body"])["error"]
    assert completed >= 8  # expert 1's requests never touched the killed replica
    for i in range(4):
        _assert_same(kill["results"][f"after_{i}"], reference[(PROMPTS[i], 700 + i)])


@pytest.mark.slow
def test_ray_leaves_no_process_behind(served):
    pids = served["ray_pids"]
    assert len(pids) >= 3, "the worker saw no Ray process: the PID check would prove nothing"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid, start) for pid, start in pids):
        time.sleep(0.5)
    assert [pid for pid, start in pids if _alive(pid, start)] == []
