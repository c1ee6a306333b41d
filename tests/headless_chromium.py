"""Drive the Debian ``chromium`` headless over the DevTools protocol (imported by the report
tests as ``from headless_chromium import ...``): load a local page, collect console errors
and failed loads, inspect its images, take a full-page screenshot."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


def chromium_binary() -> str:
    """The Chromium to use; missing is a failure in CI (CBIR_REQUIRE_BENCHMARKS or
    CBIR_REQUIRE_CHROMIUM set: .ci/run installs the Debian package), a skip elsewhere."""
    for candidate in (os.environ.get("CBIR_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    message = "Chromium not found (Debian: apt-get install -y chromium)"
    if os.environ.get("CBIR_REQUIRE_CHROMIUM") or os.environ.get("CBIR_REQUIRE_BENCHMARKS"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class PageCheck:
    images: list[dict]
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    screenshot: Path | None = None


def render_page(page: Path, screenshot: Path, width: int = 1280) -> PageCheck:
    """Open ``page`` in a fresh headless Chromium, wait for load, and report what it saw."""
    from websockets.sync.client import connect

    binary = chromium_binary()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            port = _devtools_port(process)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = json.load(r)
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            with connect(ws_url, max_size=None, open_timeout=20) as ws:
                return _inspect(ws, page, screenshot, width)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _devtools_port(process: subprocess.Popen, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
        if match:
            return int(match.group(1))
    pytest.fail("Chromium did not start its DevTools endpoint:\n" + "".join(seen[-20:]))


class _Session:
    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        if any(e.get("method") == event for e in self.events):
            return
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(message)
            if message.get("method") == event:
                return
        raise TimeoutError(event)


def _inspect(ws, page: Path, screenshot: Path, width: int) -> PageCheck:
    s = _Session(ws)
    for domain in ("Page", "Runtime", "Log", "Network"):
        s.call(f"{domain}.enable")
    s.call(
        "Emulation.setDeviceMetricsOverride",
        width=width,
        height=900,
        deviceScaleFactor=1,
        mobile=False,
    )
    s.call("Page.navigate", url=page.resolve().as_uri())
    s.wait_for("Page.loadEventFired")
    images = s.call(
        "Runtime.evaluate",
        returnByValue=True,
        expression="Array.from(document.images).map(i => ({alt: i.alt, "
        "src: i.src.startsWith('data:') ? i.src.slice(0, 40) : i.src, "
        "complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))",
    )["result"]["value"]
    height = s.call(
        "Runtime.evaluate", returnByValue=True, expression="document.documentElement.scrollHeight"
    )["result"]["value"]
    shot = s.call(
        "Page.captureScreenshot",
        format="png",
        captureBeyondViewport=True,
        clip={"x": 0, "y": 0, "width": width, "height": min(height, 12000), "scale": 1},
    )
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    check = PageCheck(images=images, screenshot=screenshot)
    for e in s.events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            check.console_errors.append(json.dumps(params.get("args"))[:300])
        elif method == "Runtime.exceptionThrown":
            check.console_errors.append(json.dumps(params.get("exceptionDetails"))[:300])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            check.console_errors.append(params["entry"].get("text", "")[:300])
        elif method == "Network.loadingFailed":
            check.failed_requests.append(params.get("errorText", "") + " " + params.get("type", ""))
    return check
