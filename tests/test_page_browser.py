"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, through selenium).

Serves the tiny export with `LocalServer` on 127.0.0.1, types a prompt, presses Generate, waits
(bounded) for the image, and compares the expert and MACs share the page shows with what the
runtime routes. The page runs under ``Content-Security-Policy: default-src 'self'``; any CSP
violation in the browser's console fails the test. A screenshot is written to the test's tmp
folder, and to ``$APTP_PAGE_SCREENSHOT`` when set (how ``docs/page.png`` is made). Skips,
naming what is missing, without chromium, chromedriver or selenium.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from runtime_fixtures import FOOD_PROMPTS, VEHICLE_PROMPTS, hang_guard, tiny_export

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
TIMEOUT = hang_guard(120)

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(DRIVER is None, reason="chromedriver is not installed (apt-get install chromium-driver)"),
]


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def server(export_dir):
    pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'aptp[local]')")
    from aptp.runtime.local_serve import LocalOptions, LocalServer

    running = LocalServer.start(str(export_dir), options=LocalOptions(threads=1), timeout=TIMEOUT)
    yield running
    assert running.stop(TIMEOUT)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install 'aptp[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,1150",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    yield driver
    driver.quit()


def _generate(browser, prompt: str) -> dict[str, str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = browser.find_element(By.ID, "image").get_attribute("src") or ""
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    browser.find_element(By.ID, "seed").clear()
    browser.find_element(By.ID, "seed").send_keys("7")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, TIMEOUT, poll_frequency=0.1).until(
        lambda d: (d.find_element(By.ID, "image").get_attribute("src") or "") not in ("", before)
        or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    return {key: browser.find_element(By.ID, key).text for key in ("expert", "macs", "size", "seed-used", "latency")}


def test_page_generates_and_shows_the_routed_expert(server, browser, export_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from aptp.runtime import AptpPipeline

    pipe = AptpPipeline.from_export(export_dir, threads=1)
    browser.get(server.url + "/")
    WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_element(By.ID, "sampler").get_attribute("value"))
    assert browser.find_element(By.ID, "model").text.endswith(f"[{pipe.manifest_sha256[:10]}]")
    shown = {}
    for prompt in (FOOD_PROMPTS[0], VEHICLE_PROMPTS[0]):
        shown[prompt] = _generate(browser, prompt)
        expert = int(pipe.route(prompt)[0])
        macs = pipe.artifacts.experts[expert].macs_ratio
        assert shown[prompt]["expert"] == str(expert)
        assert shown[prompt]["macs"] == f"{100 * macs:.1f} %"
        assert shown[prompt]["seed-used"] == "7" and shown[prompt]["size"].endswith("MiB")
    assert {s["expert"] for s in shown.values()} == {"0", "1"}
    rows = browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == [shown[VEHICLE_PROMPTS[0]]["expert"],
                                                                          shown[FOOD_PROMPTS[0]]["expert"]]
    assert browser.find_element(By.ID, "bar").get_attribute("value") == "1"
    violations = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not violations
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
    target = os.environ.get("APTP_PAGE_SCREENSHOT")
    if target:
        shutil.copyfile(shot, Path(target))
