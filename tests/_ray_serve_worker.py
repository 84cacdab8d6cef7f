"""Ray Serve scenarios for test_ray_serve.py, run inside a network namespace with only loopback.

    unshare -n sh -c 'ip link set lo up && exec python _ray_serve_worker.py EXPORT OUT RAYTMP'

Starts one single-node Ray (2 CPUs, no dashboard, usage stats off, temp dir RAYTMP), serves
the export on 127.0.0.1, runs every scenario with bounded request loops and timeouts, writes
OUT/results.json (and each response's PNG), then shuts Serve and Ray down and records the
PIDs Ray started so the test can check that none outlives it. The test process compares the
responses with in-process `AptpPipeline` results.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PORT = 8321
APP = "aptp"
TIMEOUT_S = 120.0  # per HTTP request: a request that takes longer counts as hung


def post(body: bytes, query: str = "", method: str = "POST", timeout: float = TIMEOUT_S) -> dict:
    """One request; returns status, headers of interest, body and elapsed seconds (never raises)."""
    start = time.monotonic()
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/{query}", data=body if method == "POST" else None,
                                 method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, headers, payload = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        status, headers, payload = err.code, dict(err.headers), err.read()
    except Exception as err:  # noqa: BLE001 - a timeout or a dropped connection is a result here
        return {"status": None, "error": f"{type(err).__name__}: {err}", "elapsed": time.monotonic() - start}
    out = {"status": status, "elapsed": time.monotonic() - start, "type": headers.get("content-type"),
           "expert": headers.get("x-aptp-expert"), "seed": headers.get("x-aptp-seed"),
           "batch_size": headers.get("x-aptp-batch-size"), "csp": headers.get("content-security-policy")}
    if out["type"] == "image/png":
        out["png"] = payload
    else:
        out["body"] = payload.decode("utf-8", "replace")
    return out


def save(out_dir: Path, name: str, result: dict) -> dict:
    png = result.pop("png", None)
    if png is not None:
        path = out_dir / f"{name}.png"
        path.write_bytes(png)
        result["png_path"] = str(path)
    return result


def request(prompt, seed, **extra) -> bytes:
    return json.dumps({"prompt": prompt, "seed": seed, **extra}).encode()


def descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below `root`, from /proc."""
    parent: dict[int, int] = {}
    start: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry.name)] = int(fields[1])
        start[int(entry.name)] = fields[19]
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid:
                found.append((child, start[child]))
                frontier.append(child)
    return found


def scenario_parity(out_dir: Path, prompts: list[str]) -> dict:
    """16 mixed prompts at once, PNG responses; two JSON responses; one forced onto dense."""
    jobs = [(f"parity_{i}", request(p, 100 + i), "") for i, p in enumerate(prompts)]
    jobs += [("json_0", request(prompts[0], 100), "?format=json"),
             ("dense_0", request(prompts[1], 101, expert="dense"), "")]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: post(job[1], job[2]), jobs))
    return {name: save(out_dir, name, r) for (name, _, _), r in zip(jobs, results)}


MALFORMED = {
    "not_json": b"{prompt: a car",
    "array": b'["a car"]',
    "empty_body": b"",
    "unknown_field": b'{"prompt": "a car", "sed": 1}',
    "missing_prompt": b'{"seed": 1}',
    "empty_prompt": b'{"prompt": "   "}',
    "prompt_number": b'{"prompt": 5}',
    "steps_zero": b'{"prompt": "a car", "steps": 0}',
    "steps_out_of_range": b'{"prompt": "a car", "steps": 151}',
    "guidance_text": b'{"prompt": "a car", "guidance_scale": "high"}',
    "seed_negative": b'{"prompt": "a car", "seed": -1}',
    "expert_unknown": b'{"prompt": "a car", "expert": 9}',
    "height_odd": b'{"prompt": "a car", "height": 33}',
    "not_utf8": b'{"prompt": "\xff\xfe"}',
    "too_large": b'{"prompt": "' + b"a" * 70000 + b'"}',
    "lone_surrogate": b'{"prompt": "a red \\ud800 car"}',
    "seed_5000_digits": b'{"prompt": "a car", "seed": ' + b"9" * 5000 + b"}",
}


def scenario_malformed(out_dir: Path, prompts: list[str]) -> dict:
    """Malformed requests interleaved with valid ones, all in flight together."""
    jobs = []
    valid = iter(range(len(prompts)))
    for name, body in MALFORMED.items():
        jobs.append((f"bad_{name}", body, "", "POST"))
        i = next(valid, None)
        if i is not None:
            jobs.append((f"good_{i}", request(prompts[i], 300 + i), "", "POST"))
    jobs += [("bad_put", b"", "", "PUT"), ("bad_format", request("a car", 1), "?format=xml", "POST")]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: post(job[1], job[2], job[3]), jobs))
    return {name: save(out_dir, name, r) for (name, _, _, _), r in zip(jobs, results)}


def scenario_a1111(out_dir: Path, prompts: list[str]) -> dict:
    """The shared app's other routes on the Ray router: one A1111 txt2img, its listings, the page."""
    body = json.dumps({"prompt": prompts[0], "seed": 100, "sampler_name": "DDIM", "width": 64, "height": 64,
                       "unknown_client_field": 1}).encode()
    out = {"txt2img": post(body, "sdapi/v1/txt2img"),
           "bad_sampler": post(json.dumps({"prompt": "a car", "sampler_name": "Euler a"}).encode(), "sdapi/v1/txt2img")}
    for name, path in (("sd_models", "sdapi/v1/sd-models"), ("progress", "sdapi/v1/progress"), ("page", "")):
        out[name] = post(b"", path, method="GET")
    out["webuiapi"] = _webuiapi_run(out_dir, prompts[0])
    return out


def _webuiapi_run(out_dir: Path, prompt: str) -> dict:
    """The webuiapi client (a real A1111 client from PyPI) against the Ray router."""
    try:
        import webuiapi
    except ImportError as err:
        return {"skipped": f"webuiapi is not installed ({err})"}
    api = webuiapi.WebUIApi(host="127.0.0.1", port=PORT, sampler="DDIM")
    result = api.txt2img(prompt=prompt, seed=100, steps=4, width=64, height=64)
    path = out_dir / "webuiapi.png"
    result.images[0].save(path)
    return {"png_path": str(path), "aptp": result.info["aptp"]["images"][0], "seeds": result.info["all_seeds"]}


def scenario_kill(out_dir: Path, prompts: list[str]) -> dict:
    """Kill expert 0's replica (SIGKILL) while requests are in flight; then serve again."""
    from ray import serve

    handle = serve.get_deployment_handle("expert-0", app_name=APP)
    before = handle.pid.remote().result(timeout_s=60)
    jobs = [(f"load_{i}", request(p, 500 + i)) for i, p in enumerate(prompts)]
    results: dict[str, dict] = {}
    killed = threading.Event()

    def send(job):
        results[job[0]] = post(job[1])

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = []
        for job in jobs:  # open loop: one arrival every 50 ms, whatever the responses do
            futures.append(pool.submit(send, job))
            time.sleep(0.05)
            if not killed.is_set() and len(futures) == len(jobs) // 2:
                os.kill(before, signal.SIGKILL)
                killed.set()
        for future in futures:
            future.result(timeout=2 * TIMEOUT_S)
    recovered_after = None
    after = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            after = handle.pid.remote().result(timeout_s=10)
        except Exception:  # noqa: BLE001 - the replacement is still starting
            time.sleep(1)
            continue
        if after != before:
            recovered_after = time.monotonic()
            break
        time.sleep(1)
    post_jobs = [(f"after_{i}", request(p, 700 + i)) for i, p in enumerate(prompts[:4])]
    with ThreadPoolExecutor(4) as pool:
        post_results = list(pool.map(lambda job: post(job[1]), post_jobs))
    named = {name: save(out_dir, name, r) for name, r in results.items()}
    named.update({name: save(out_dir, name, r) for (name, _), r in zip(post_jobs, post_results)})
    return {"pid_before": before, "pid_after": after, "recovered": recovered_after is not None,
            "results": named}


def main(export: str, out: str, ray_tmp: str, prompts_json: str) -> int:
    import ray
    from ray import serve

    from aptp.runtime.ray_serve import ServeOptions, build_app

    out_dir = Path(out)
    prompts = json.loads(prompts_json)
    report: dict = {"pid": os.getpid()}
    clock = time.monotonic()
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, _node_ip_address="127.0.0.1",
                 logging_level="WARNING", configure_logging=True)
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        options = ServeOptions(num_cpus=0.25, router_num_cpus=0.25, threads=1, max_wait_s=0.05, verify=True)
        serve.run(build_app(export, options), name=APP, route_prefix="/")
        report["startup_s"] = time.monotonic() - clock
        for name, scenario in [("parity", scenario_parity), ("malformed", scenario_malformed),
                               ("a1111", scenario_a1111), ("kill", scenario_kill)]:
            start = time.monotonic()
            try:
                report[name] = scenario(out_dir, prompts)
            except Exception:  # noqa: BLE001 - reported to the test, the next scenario still runs
                report[name] = {"crashed": traceback.format_exc()}
            report[f"{name}_s"] = time.monotonic() - start
    except Exception:  # noqa: BLE001
        report["crashed"] = traceback.format_exc()
    finally:
        report["ray_pids"] = descendants(os.getpid())
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        report["total_s"] = time.monotonic() - clock
        (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
