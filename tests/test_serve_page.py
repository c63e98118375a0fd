"""The demo page at / in headless Chromium, driven over the Chrome DevTools Protocol.

Chromium is the Debian package (/usr/bin/chromium; `apt-get install -y chromium`), started with
networking extras off and driven over its DevTools websocket (the `websockets` package): no
browser download, no driver binary. The page uploads a radiograph, the test clicks on the bone,
and the page must show the translated patch, the blended result and the score; a screenshot is
saved (and copied to $BONEAUG_PAGE_SCREENSHOT when set).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _serve_support import (  # noqa: E402
    Service,
    make_registry,
    png_bytes,
    radiograph,
    start_service,
)

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class DevTools:
    """A minimal CDP client: one page target, commands by id, events kept for inspection."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws  # a websockets.sync.client.ClientConnection
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def __call__(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        result = self("Runtime.evaluate", expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        status = self.evaluate("document.getElementById('status').textContent")
        raise TimeoutError(f"{expression} stayed falsy for {timeout} s; page status: {status!r}")


@pytest.fixture(scope="module")
def service(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    registry = make_registry(tmp_path_factory.mktemp("page-registry"), unit_iterations=1,
                             drn_steps=1)
    yield from start_service(registry)


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[DevTools]:
    assert Path(CHROMIUM).exists(), "install Chromium: apt-get install -y chromium"
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--disable-default-apps", "--mute-audio",
         "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", "--window-size=1400,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            pages = [t for t in json.load(reply) if t["type"] == "page"]
        from websockets.sync.client import connect

        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            yield DevTools(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_page_places_a_lesion_where_clicked(service: Service, browser: DevTools,
                                            tmp_path: Path) -> None:
    image = radiograph(512, 256, seed=4)
    upload = tmp_path / "radiograph.png"
    upload.write_bytes(png_bytes(image))

    browser("Page.enable")
    browser("Network.enable")
    browser("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1,
            mobile=False)
    browser("Page.navigate", url=service.base + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('original')")

    browser.evaluate(f"document.getElementById('token').value = {json.dumps(service.token)}")
    root = browser("DOM.getDocument")["root"]["nodeId"]
    file_input = browser("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    browser("DOM.setFileInputFiles", files=[str(upload)], nodeId=file_input)
    browser.wait_for("document.getElementById('status').textContent.includes('click where')")
    assert browser.evaluate("document.getElementById('original').width") == 256

    # click on the bone's axis, 60 % down the image
    rect = browser.evaluate(
        "JSON.stringify(document.getElementById('original').getBoundingClientRect())")
    rect = json.loads(rect)
    x = rect["left"] + rect["width"] * 0.5
    y = rect["top"] + rect["height"] * 0.6
    for kind in ("mousePressed", "mouseReleased"):
        browser("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
    status = browser.wait_for("(() => { const s = document.getElementById('status');"
                              " return s.className === 'error'"
                              " || s.textContent.startsWith('done') ?"
                              " s.className + '|' + s.textContent : ''; })()")
    assert status.startswith("|done"), status

    score_text = browser.evaluate("document.getElementById('score').textContent")
    assert score_text.startswith("score ") and "t = 0.9" in score_text
    sizes = browser.evaluate("JSON.stringify(['source-patch', 'patch', 'blended'].map("
                             "id => [document.getElementById(id).naturalWidth,"
                             " document.getElementById(id).naturalHeight]))")
    assert json.loads(sizes) == [[32, 32], [32, 32], [256, 512]]
    details = browser.evaluate("document.getElementById('details').textContent")
    assert "boneaug-unit-tibia v1" in details and "boneaug-drn-tibia v1" in details
    box = json.loads(details.splitlines()[0].removeprefix("box "))
    assert abs((box[0] + box[2]) / 2 - 128) <= 2 and abs((box[1] + box[3]) / 2 - 0.6 * 512) <= 2

    requested = {e["params"]["request"]["url"] for e in browser.events
                 if e.get("method") == "Network.requestWillBeSent"}
    external = [u for u in requested if not (u.startswith(service.base) or u.startswith("data:"))]
    assert not external, external  # no external assets

    shot = base64.b64decode(browser("Page.captureScreenshot", format="png")["data"])
    path = tmp_path / "serve_page.png"
    path.write_bytes(shot)
    if os.environ.get("BONEAUG_PAGE_SCREENSHOT"):
        shutil.copyfile(path, os.environ["BONEAUG_PAGE_SCREENSHOT"])
    print(f"\nscreenshot: {path}")
    from PIL import Image

    with Image.open(path) as im:
        assert im.size == (1400, 900)
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10  # not a blank page
