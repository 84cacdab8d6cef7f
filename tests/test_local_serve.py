"""aptp-serve's local mode over real HTTP on 127.0.0.1: the A1111 API, aptp's own POST /, shutdown.

The server runs in a thread of this process (`LocalServer`, an ephemeral port) for the
contract tests, and as an ``aptp-serve`` process for the signal tests; every wait is bounded.
Good requests must give the pixels `AptpPipeline` / ``aptp-generate`` give with the same
settings; bad ones a 4xx with one line. Uses the tiny export of `runtime_fixtures` (vehicle
prompts route to code 0, food prompts to code 1).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install 'aptp[test]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'aptp[local]')")

from aptp.runtime import AptpPipeline, GenerationServer  # noqa: E402
from aptp.runtime.local_serve import LocalOptions, LocalServer  # noqa: E402
from runtime_fixtures import FOOD_PROMPTS, VEHICLE_PROMPTS, hang_guard, tiny_export  # noqa: E402

TIMEOUT = hang_guard(120)


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def pipe(export_dir) -> AptpPipeline:
    return AptpPipeline.from_export(export_dir, threads=1)


@pytest.fixture(scope="module")
def server(export_dir):
    running = LocalServer.start(str(export_dir), options=LocalOptions(threads=1, max_wait=0.05), timeout=TIMEOUT)
    yield running
    assert running.stop(TIMEOUT)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def pixels(b64_or_bytes) -> np.ndarray:
    from PIL import Image

    data = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def one_line_error(response) -> dict:
    assert 400 <= response.status_code < 500, response.text
    assert "\n" not in response.text and "Traceback" not in response.text
    return response.json()


# ---- the progress callback in the runtime --------------------------------------------------


def test_progress_callback_reports_each_step_with_its_expert(pipe):
    calls = []
    results = pipe([VEHICLE_PROMPTS[0], FOOD_PROMPTS[0]], seeds=1, num_inference_steps=3,
                   callback=lambda step, total, expert: calls.append((step, total, expert)))
    assert sorted(calls, key=lambda c: str(c[2])) == [(s, 3, e) for e in (0, 1) for s in (1, 2, 3)]
    assert [r.expert for r in results] == [0, 1]
    plain = pipe([VEHICLE_PROMPTS[0], FOOD_PROMPTS[0]], seeds=1, num_inference_steps=3)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(results, plain))


def test_server_callback_is_per_request_and_a_raising_one_fails_only_its_request(pipe):
    seen: dict[str, list] = {"a": [], "b": []}

    def stop(step, total, expert):
        raise RuntimeError("stop this one")

    with GenerationServer(pipe, max_batch=4, max_wait=0.2) as srv:
        fa = srv.submit(VEHICLE_PROMPTS[0], seed=1, callback=lambda *a: seen["a"].append(a))
        fb = srv.submit(VEHICLE_PROMPTS[1], seed=2, callback=lambda *a: seen["b"].append(a))
        fc = srv.submit(VEHICLE_PROMPTS[2], seed=3, callback=stop)
        ra, rb = fa.result(TIMEOUT), fb.result(TIMEOUT)
        with pytest.raises(RuntimeError, match="stop this one"):
            fc.result(TIMEOUT)
    assert seen["a"][-1] == (pipe.scheduler.num_steps, pipe.scheduler.num_steps, 0)
    assert len(seen["b"]) >= pipe.scheduler.num_steps
    alone = pipe(VEHICLE_PROMPTS[0], seeds=1)[0]
    assert np.array_equal(ra.image, alone.image) and rb.expert == 0


# ---- the A1111 API -------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, aptp_sampler, steps, negative", [
    ("DDIM", "ddim", 4, ""), ("Euler", "euler", 3, "blurry"), ("DPM++ 2M", "dpmpp_2m", 5, ""), (None, "ddim", None, "")])
def test_txt2img_gives_the_pipelines_pixels_and_routing(client, pipe, sampler, aptp_sampler, steps, negative):
    prompt = VEHICLE_PROMPTS[1] if negative else FOOD_PROMPTS[1]
    body = {"prompt": prompt, "negative_prompt": negative, "seed": 11, "cfg_scale": 5.0, "batch_size": 2,
            "n_iter": 2, "width": 64, "height": 64, "some_field_a1111_does_not_know": [1, 2]}
    if sampler:
        body["sampler_name"] = sampler
    if steps:
        body["steps"] = steps
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    info = json.loads(data["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and len(data["images"]) == 4
    expected = pipe([prompt] * 4, seeds=11, guidance_scale=5.0, scheduler=aptp_sampler, num_inference_steps=steps,
                    negative_prompt=negative or None)
    for got, want, aptp in zip(data["images"], expected, info["aptp"]["images"]):
        assert np.array_equal(pixels(got), want.image)
        assert aptp["expert"] == want.expert == int(pipe.route(prompt)[0])
        assert aptp["macs_ratio"] == pipe.artifacts.experts[want.expert].macs_ratio
        assert aptp["provider"] == "CPUExecutionProvider" and aptp["expert_bytes"] > 0
        assert set(aptp["timings"]) >= {"denoise", "decode", "route"}
    assert info["steps"] == (steps or pipe.scheduler.num_steps) and info["sampler_name"] == (sampler or "DDIM")
    assert f"aptp expert: {expected[0].expert}" in info["infotexts"][0]
    assert data["parameters"]["seed"] == 11


def test_txt2img_random_seed_is_reported_and_reproducible(client, pipe):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": FOOD_PROMPTS[0], "seed": -1})
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert 0 <= info["seed"] < 2**32 and response.json()["parameters"]["seed"] == -1
    again = pipe(FOOD_PROMPTS[0], seeds=info["seed"])[0]
    assert np.array_equal(pixels(response.json()["images"][0]), again.image)


def test_aptp_generate_writes_the_same_pixels(client, export_dir, tmp_path):
    from aptp.runtime.cli import main as generate

    out = tmp_path / "car.png"
    assert generate(["--artifacts", str(export_dir), "--prompt", VEHICLE_PROMPTS[2], "--seed", "21", "--steps", "3",
                     "--scheduler", "euler", "--guidance-scale", "6", "--threads", "1", "--output", str(out)]) == 0
    response = client.post("/sdapi/v1/txt2img", json={"prompt": VEHICLE_PROMPTS[2], "seed": 21, "steps": 3,
                                                      "sampler_name": "Euler", "cfg_scale": 6})
    assert np.array_equal(pixels(response.json()["images"][0]), pixels(out.read_bytes()))


def test_native_post_still_answers_png_and_json(client, pipe):
    png = client.post("/", json={"prompt": FOOD_PROMPTS[2], "seed": 4})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-aptp-expert"] == "1" and png.headers["x-aptp-seed"] == "4"
    want = pipe(FOOD_PROMPTS[2], seeds=4)[0].image
    assert np.array_equal(pixels(png.content), want)
    js = client.post("/?format=json", json={"prompt": FOOD_PROMPTS[2], "seed": 4}).json()
    assert np.array_equal(pixels(js["image_png_base64"]), want) and js["expert"] == 1
    assert one_line_error(client.post("/", json={"prompt": "a", "sed": 1}))["error"].startswith("unknown field")


@pytest.mark.parametrize("body, message", [
    (b"{prompt", "not valid JSON"),
    (b"[]", "JSON object"),
    (b"", "empty request body"),
    (b'{"prompt": ""}', "'prompt' is empty"),
    (b'{"prompt": 3}', "'prompt' must be a string"),
    (b'{"prompt": "a red \\ud800 car"}', "lone surrogate"),
    (b'{"prompt": "a", "steps": "20"}', "'steps' must be an integer"),
    (b'{"prompt": "a", "steps": 4.5}', "'steps' must be an integer"),
    (b'{"prompt": "a", "steps": 0}', "'steps' must be in"),
    (b'{"prompt": "a", "steps": 151}', "between 1 and 150"),
    (b'{"prompt": "a", "cfg_scale": "7"}', "'cfg_scale' must be a number"),
    (b'{"prompt": "a", "cfg_scale": NaN}', "finite number"),
    (b'{"prompt": "a", "cfg_scale": 1000}', "guidance_scale must be in"),
    (b'{"prompt": "a", "seed": -2}', "'seed' must be -1"),
    (b'{"prompt": "a", "seed": true}', "'seed' must be -1"),
    (b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", "number aptp cannot read"),
    (b'{"prompt": "a", "width": 512}', "outside this export's range"),
    (b'{"prompt": "a", "height": 50}', "not a multiple"),
    (b'{"prompt": "a", "batch_size": 0}', "'batch_size' must be in"),
    (b'{"prompt": "a", "batch_size": 8, "n_iter": 8}', "at most 32 images"),
    (b'{"prompt": "a", "sampler_name": "Euler a"}', "not one aptp runs"),
    (b'{"prompt": "a", "sampler_name": 3}', "must be a string"),
    (b'{"prompt": "a", "scheduler": "Karras"}', "'scheduler'"),
    (b'{"prompt": "a", "enable_hr": true}', "'enable_hr' is not supported"),
    (b'{"prompt": "a", "styles": ["cinematic"]}', "'styles' is not supported"),
    (b'{"prompt": "a", "send_images": "yes"}', "'send_images' must be true or false"),
    (b"[" * 30000 + b"]" * 30000, "too deeply"),
])
def test_malformed_txt2img_is_422_with_one_line(client, body, message):
    response = client.post("/sdapi/v1/txt2img", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    error = one_line_error(response)
    assert set(error) == {"error", "detail"} and message in error["detail"], error


def test_oversized_body_is_413(client):
    response = client.post("/sdapi/v1/txt2img", content=b'{"prompt": "' + b"a" * 70000 + b'"}')
    assert response.status_code == 413 and "limit" in one_line_error(response)["detail"]


def test_listing_routes_describe_the_export(client, pipe):
    samplers = client.get("/sdapi/v1/samplers").json()
    # One entry per sampler the export runs; "PNDM" is an alias of A1111's "PLMS".
    assert [s["name"] for s in samplers] == ["Euler", "DDIM", "DPM++ 2M", "PLMS"]
    assert "PNDM" in samplers[-1]["aliases"] and "pndm" in samplers[-1]["aliases"]
    (model,) = client.get("/sdapi/v1/sd-models").json()
    assert model["sha256"] == pipe.manifest_sha256 and model["title"].endswith(f"[{pipe.manifest_sha256[:10]}]")
    experts = {e["expert"]: e for e in model["aptp"]["experts"]}
    assert set(experts) == {0, 1, "dense"} and experts["dense"]["macs_ratio"] == 1.0
    assert experts[1]["macs_ratio"] == pipe.artifacts.experts[1].macs_ratio
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == model["title"]
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}


def test_options_post_accepts_what_aptp_does_and_refuses_the_rest(client):
    title = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title, "samples_format": "png"}
                       ).status_code == 200
    assert "cannot be" in one_line_error(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "v1-5"}))["detail"]
    assert "cannot be set" in one_line_error(client.post("/sdapi/v1/options", json={"sd_vae": "x"}))["detail"]
    assert client.post("/sdapi/v1/options", content=b"[1]").status_code == 422


def test_unknown_routes_and_methods_are_one_line_4xx(client):
    assert client.get("/sdapi/v1/extra-single-image").status_code == 404
    assert client.get("/sdapi/v1/img2img").status_code == 405  # POST only (img2img exists)
    assert client.get("/sdapi/v1/txt2img").status_code == 405
    assert client.get("/nothing").status_code == 404
    for response in (client.get("/sdapi/v1/img2img"), client.put("/")):
        one_line_error(response)


def _in_thread(fn):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, box


def _wait_for_progress(client, jobs: int = 1) -> dict:
    for _ in range(int(TIMEOUT / 0.02)):
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] > 0 and progress["progress"] > 0 and progress["aptp"]["jobs"] >= jobs:
            return progress
        time.sleep(0.02)
    raise AssertionError("no progress reported within the time limit")


def test_progress_reports_the_running_job_then_idles(client):
    thread, box = _in_thread(lambda: client.post("/sdapi/v1/txt2img", json={
        "prompt": VEHICLE_PROMPTS[0], "seed": 1, "steps": 60, "n_iter": 2}))
    progress = _wait_for_progress(client)
    assert 0 < progress["progress"] <= 1 and progress["state"]["sampling_steps"] == 60
    assert progress["aptp"]["expert"] == 0 and progress["eta_relative"] >= 0
    thread.join(TIMEOUT)
    assert box["value"].status_code == 200 and len(box["value"].json()["images"]) == 2
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_interrupt_stops_the_job_and_returns_what_finished(client):
    thread, box = _in_thread(lambda: client.post("/sdapi/v1/txt2img", json={
        "prompt": FOOD_PROMPTS[0], "seed": 1, "steps": 150, "n_iter": 8}))
    _wait_for_progress(client)
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(TIMEOUT)
    response = box["value"]
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["aptp"]["interrupted"] >= 1 and len(response.json()["images"]) == 8 - info["aptp"]["interrupted"]
    # The server goes on serving.
    assert client.post("/sdapi/v1/txt2img", json={"prompt": FOOD_PROMPTS[0], "seed": 1}).status_code == 200


def test_webuiapi_client_gets_images_with_aptp_routing(server, pipe):
    webuiapi = pytest.importorskip("webuiapi", reason="webuiapi is not installed (pip install 'aptp[test]')")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DDIM", steps=4)
    result = api.txt2img(prompt=VEHICLE_PROMPTS[0], seed=5, width=64, height=64, cfg_scale=7.5, batch_size=2)
    assert len(result.images) == 2
    want = pipe([VEHICLE_PROMPTS[0]] * 2, seeds=5, guidance_scale=7.5)
    for image, expected, aptp in zip(result.images, want, result.info["aptp"]["images"]):
        assert np.array_equal(np.asarray(image.convert("RGB")), expected.image)
        assert aptp["expert"] == expected.expert == 0
    assert [s["name"] for s in api.get_samplers()] == ["Euler", "DDIM", "DPM++ 2M", "PLMS"]
    with pytest.raises(RuntimeError, match="422"):  # webuiapi's own default sampler is ancestral
        webuiapi.WebUIApi(host="127.0.0.1", port=server.port).txt2img(prompt="a car", width=64, height=64)


# ---- the command line: mode flags and shutdown ---------------------------------------------


def test_ray_flags_without_ray_are_refused_in_one_line(export_dir):
    for argv, flag in ((["--replicas", "3"], "--replicas only apply to --ray"),
                       (["--ray", "--max-queue", "3"], "--max-queue only apply to the local mode"),
                       (["--max-wait", "inf"], "finite number of seconds")):
        proc = subprocess.run([sys.executable, "-c", "import sys; from aptp.runtime.serve_cli import main; "
                               "sys.exit(main(sys.argv[1:]))", "--artifacts", str(export_dir), *argv],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 2 and flag in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_answers_queued_requests_503_and_exits(export_dir, tmp_path, sig):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from aptp.runtime.serve_cli import main; "
                             "sys.exit(main(sys.argv[1:]))", "--artifacts", str(export_dir), "--port", str(port),
                             "--max-batch", "1", "--threads", "1", "--no-verify"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            for _ in range(int(TIMEOUT / 0.1)):
                try:
                    if c.get("/sdapi/v1/progress").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                raise AssertionError("aptp-serve did not start")
            threads = [_in_thread(lambda i=i: _post_or_error(url, {"prompt": VEHICLE_PROMPTS[i % 3], "seed": i,
                                                                   "steps": 150})) for i in range(4)]
            _wait_for_progress(c, jobs=4)  # every request is in: one running, three queued
            proc.send_signal(sig)
            statuses = []
            for thread, box in threads:
                thread.join(TIMEOUT)
                assert not thread.is_alive(), "a request hung after the signal"
                statuses.append(box["value"])
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    assert statuses.count(200) >= 1 and 503 in statuses and set(statuses) <= {200, 503}, statuses
    assert "Traceback" not in proc.stderr.read()
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _post_or_error(url: str, body: dict):
    try:
        return httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=TIMEOUT).status_code
    except httpx.TransportError as err:
        return type(err).__name__


def test_aptp_generate_progress_bar_on_request(export_dir, tmp_path, capfd):
    from aptp.runtime.cli import main as generate

    assert generate(["--artifacts", str(export_dir), "--prompt", FOOD_PROMPTS[0], "--steps", "3", "--threads", "1",
                     "--progress", "--output", str(tmp_path / "soup.png")]) == 0
    err = capfd.readouterr().err
    assert "expert 1" in err and "/3 " in err
    assert generate(["--artifacts", str(export_dir), "--prompt", FOOD_PROMPTS[0], "--steps", "3", "--threads", "1",
                     "--output", str(tmp_path / "soup2.png")]) == 0
    assert "expert 1" not in capfd.readouterr().err  # stderr is not a terminal here: no bar by default
