"""The console in a real browser: Debian's headless Chromium, driven by Selenium through
chromium-driver, against a live ``modelpod serve --console --token-file`` on loopback.

It logs in with the token, watches the charts move as requests arrive, tries a tabular model and a
detector (upload, boxes drawn) with the try-it form, checks that a page without the token can
change nothing, and that the page survives a server restart. A screenshot is kept as an artifact:
under the test's tmp dir, in ``$MODELPOD_TEST_ARTIFACTS`` when set, and at
``$MODELPOD_CONSOLE_SCREENSHOT`` when set (how docs/console.png is made).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servutil import PYTHON, REPO, ServeProcess, wait_for

pytestmark = pytest.mark.e2e
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vision"))  # the tiny detector and test images

TOKEN = "console-browser-token"
REQUIRE = os.environ.get("MODELPOD_REQUIRE_BROWSER") == "1"


def _browser() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if Path(p).exists()), None)
    return (chromium, driver) if chromium and driver else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """The server (restartable on the same port) and what the tests need to reach it."""

    def __init__(self, home: Path, token_file: Path, image: Path, config: Path) -> None:
        self.home, self.token_file, self.image, self.config = home, token_file, image, config
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: ServeProcess | None = None

    def start(self) -> None:
        argv = [str(PYTHON), "-m", "modelpod", "--home", str(self.home), "serve", "det", "--config", str(self.config),
                "--console",
                "--token-file", str(self.token_file), "--host", "127.0.0.1", "--port", str(self.port),
                "--no-grpc", "--json"]
        self.proc = ServeProcess(argv, env={"MODELPOD_LOG_LEVEL": "warning"})
        assert self.proc.info["console"] == f"{self.url}/console"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers={"authorization": f"Bearer {TOKEN}"})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sklearn_model: tuple[Path, np.ndarray, object]
           ) -> Iterator[Served]:
    if _browser() is None:
        if REQUIRE:
            pytest.fail("MODELPOD_REQUIRE_BROWSER=1 but chromium/chromium-driver are missing (.ci/setup-system.sh)")
        pytest.skip("needs Debian chromium and chromium-driver")
    from graphs import detector
    from imgutil import canvas, encode

    from modelpod.api import pack
    from modelpod.store import Store

    d = tmp_path_factory.mktemp("console")
    home = d / "home"
    path, sample, _ = sklearn_model
    store = Store(home)
    pack(path, "lr", store=store, sample=sample)
    pack(path, "lr", store=store, sample=sample, labels={"copy": "2"}, parent="lr:1")  # the same weights, v2
    config = d / "serve.yaml"
    config.write_text('{"routes": {"lr-ab": {"variants": [{"model": "lr:1", "weight": 80}, '
                      '{"model": "lr:2", "weight": 20}]}}}')
    (d / "names.txt").write_text("dim\nbright\n")
    subprocess.run([str(PYTHON), "-m", "modelpod", "--home", str(home), "pack",
                    str(detector(d / "det.onnx", "yolov5", metadata=False)), "--name", "det", "--task", "detect",
                    "--classes", str(d / "names.txt"), "--imgsz", "64"], check=True, cwd=REPO, capture_output=True,
                   timeout=180)
    image = d / "bright-square.png"
    image.write_bytes(encode(canvas(48, 64, (8, 10, 36, 40))))
    token_file = d / "token"
    token_file.write_text(TOKEN + "\n")
    s = Served(home, token_file, image, config)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser(served: Served) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = _browser()
    assert found is not None
    chromium, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1360,2000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _js_statuses(driver: Any, calls: list[tuple[str, str, dict[str, str]]]) -> list[int]:
    """Run fetch() calls in the page (as a script on it would) and return their statuses."""
    return list(driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        Promise.all(arguments[0].map(([m, u, h]) => fetch(u, {method: m, headers: h,
            body: m === "GET" ? undefined : '{"inputs": []}'}).then(r => r.status, () => -1))).then(done);
    """, calls))


def _attr(driver: Any, css: str, name: str) -> str:
    """An attribute of the first element matching ``css`` ("" if none), read in one script: the page
    redraws its rows and legends every second, so a found element may be gone a moment later."""
    return str(driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
        css, name) or "")


def _text(driver: Any, css: str) -> str:
    return str(driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';", css) or "")


def _count(driver: Any, css: str) -> int:
    return int(driver.execute_script("return document.querySelectorAll(arguments[0]).length;", css))


def test_without_the_token_the_page_can_change_nothing(served: Served, browser: Any) -> None:
    browser.get(f"{served.url}/console")
    assert browser.find_element("id", "login").is_displayed()  # the login form, not the console
    statuses = _js_statuses(browser, [
        ("POST", "/v2/repository/models/lr/unload", {"content-type": "application/json"}),
        ("POST", "/console/api/models/lr/infer", {"content-type": "application/json", "x-modelpod-console": "1"}),
        ("GET", "/console/api/overview", {}),
        ("POST", "/console/logout", {}),
    ])
    assert statuses[:3] == [401, 401, 401]
    with served.client() as c:
        states = {m["label"]: m["state"] for m in c.get("/console/api/overview").json()["models"]}
    assert states == {"lr:1": "READY", "lr:2": "READY", "det:1": "READY"}
    browser.find_element("id", "token").send_keys("not-the-token")
    browser.find_element("id", "login-button").click()
    try:
        wait_for(lambda: _count(browser, "#failed") and browser.find_element("id", "failed").is_displayed(), 30,
                 "the wrong-token message")
    except TimeoutError:
        raise AssertionError(f"{browser.current_url}: {browser.page_source[:2000]}") from None


def test_login_shows_models_and_their_state(served: Served, browser: Any) -> None:
    browser.get(f"{served.url}/console")
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.find_element("id", "login-button").click()
    wait_for(lambda: _count(browser, '#models-table tr[data-model="lr:1"]'), 30, "the models")
    row = _text(browser, '#models-table tr[data-model="det:1"]')
    assert "READY" in row and "detect" in row
    wait_for(lambda: _attr(browser, "#conn", "data-state") == "live", 30, "the page to be live")


def test_charts_update_as_requests_arrive(served: Served, browser: Any) -> None:
    """Requests to the route (80/20) and bad images to the detector: the charts, the route's A/B
    report and the recent errors all follow."""
    before = int(_attr(browser, "#chart-throughput", "data-points"))
    stop = threading.Event()
    x = np.random.default_rng(1).normal(size=(2, 20)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 20], "data": x.reshape(-1).tolist()}]}
    not_an_image = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["bm90IGFuIGltYWdl"]}]}
    with served.client() as c:
        body["inputs"][0]["name"] = c.get("/v2/models/lr").json()["inputs"][0]["name"]
        sent: list[int] = []
        refused: list[int] = []

        def load() -> None:
            while not stop.is_set():
                sent.append(c.post("/v2/models/lr-ab/infer", json=body).status_code)
                if len(sent) % 200 == 0:
                    refused.append(c.post("/v2/models/det/infer", json=not_an_image).status_code)

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        try:
            wait_for(lambda: float(_attr(browser, "#chart-throughput", "data-max") or 0) > 0, 60, "throughput > 0")
            for variant in ("lr-ab/lr:1", "lr-ab/lr:2"):
                wait_for(lambda v=variant: _count(browser, f'#chart-latency-p99 polyline[data-series="{v}"]'), 60,
                         f"a p99 latency line for {variant}")
            wait_for(lambda: float(_attr(browser, "#chart-batch", "data-max") or 0) >= 2, 60, "batch size >= 2 rows")
            wait_for(lambda: float(_attr(browser, "#chart-errors", "data-max") or 0) > 0, 60, "errors > 0")
            wait_for(lambda: "client error" in _text(browser, "#errors-table"), 60, "the refused images listed")
            wait_for(lambda: _count(browser, '[data-route="lr-ab"] table.report tbody tr') == 2, 60, "the A/B report")
        finally:
            stop.set()
            worker.join(30)
    assert sent and set(sent) == {200} and refused and set(refused) == {400}
    assert int(_attr(browser, "#chart-throughput", "data-points")) > before
    assert _text(browser, '#chart-throughput .legend [data-series="lr-ab/lr:1"]').startswith("lr-ab/lr:1")
    assert "lr:1 80.0%" in _text(browser, '[data-route="lr-ab"] .legend')


def test_the_drift_section_shows_each_model_version(served: Served, browser: Any) -> None:
    """lr was packed with a sample, so it has a drift reference: the page shows its drift table."""
    wait_for(lambda: "Drift" in _text(browser, "#section-drift h2"), 60, "the drift section")
    def rows() -> list[str]:
        return [str(t) for t in browser.execute_script(
            "return [...document.querySelectorAll('#section-drift tbody tr td:first-child')].map(e => e.textContent);")]

    wait_for(lambda: {"lr:1", "lr:2"} <= set(rows()), 60, "a drift row per version of lr")
    assert _count(browser, "#section-replicas") == 0  # no model runs in replicas: no such section


def test_try_it_returns_a_prediction(served: Served, browser: Any) -> None:
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "try-model")).select_by_value("lr")
    wait_for(lambda: '"inputs"' in (browser.find_element("id", "try-json").get_attribute("value") or ""), 30,
             "the example request")
    browser.find_element("id", "try-send").click()
    wait_for(lambda: "200" in browser.find_element("id", "try-status").text, 60, "an answer")
    assert "answered by lr:2" in browser.find_element("id", "try-status").text  # lr: its highest version
    assert '"outputs"' in browser.find_element("id", "try-output").text
    # A broken request shows the server's error, and the page goes on.
    box = browser.find_element("id", "try-json")
    box.clear()
    box.send_keys('{"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1], "data": [1]}]}')
    browser.find_element("id", "try-send").click()
    wait_for(lambda: "400" in browser.find_element("id", "try-status").text, 60, "the 400")


def test_try_it_draws_the_boxes_of_a_detector(served: Served, browser: Any, tmp_path_factory: Any) -> None:
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "try-model")).select_by_value("det")
    wait_for(lambda: browser.find_element("id", "try-file").is_displayed(), 30, "the image upload")
    browser.find_element("id", "try-file").send_keys(str(served.image))
    browser.find_element("id", "try-send").click()
    wait_for(lambda: "200" in browser.find_element("id", "try-status").text, 60, "the detector's answer")
    img = browser.find_element("id", "try-annotated")
    wait_for(lambda: img.is_displayed() and browser.execute_script("return arguments[0].naturalWidth", img) == 64,
             30, "the annotated PNG")
    assert "bright" in browser.find_element("id", "try-output").text
    _screenshot(browser, tmp_path_factory)


def test_the_page_survives_a_server_restart(served: Served, browser: Any) -> None:
    served.stop()
    wait_for(lambda: _attr(browser, "#conn", "data-state") == "offline", 60, "the page to notice")
    served.start()
    wait_for(lambda: _attr(browser, "#conn", "data-state") == "live", 60, "the page to reconnect")
    wait_for(lambda: "restarted" in _text(browser, "#notice"), 30, "the restart notice")
    wait_for(lambda: int(_attr(browser, "#chart-throughput", "data-points") or 0) >= 1, 30, "a new history")
    assert _count(browser, '#models-table tr[data-model="lr:1"]') == 1


def _screenshot(browser: Any, tmp_path_factory: Any) -> None:
    png = browser.get_screenshot_as_png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    targets = [tmp_path_factory.getbasetemp() / "artifacts" / "console.png"]
    if os.environ.get("MODELPOD_TEST_ARTIFACTS"):
        targets.append(Path(os.environ["MODELPOD_TEST_ARTIFACTS"]) / "console.png")
    if os.environ.get("MODELPOD_CONSOLE_SCREENSHOT"):
        targets.append(Path(os.environ["MODELPOD_CONSOLE_SCREENSHOT"]))
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
