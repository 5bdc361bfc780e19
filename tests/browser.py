"""A headless Chromium for the page's tests, driven through chromedriver's W3C WebDriver HTTP API with the
standard library: the dozen calls the tests make need no client package (selenium would add one, with
its own driver manager that looks for downloads), and chromedriver's network log comes the same way."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
KEYS = {"enter": "\ue007", "shift": "\ue008", "escape": "\ue00c", "release": "\ue000"}


class Browser:
    """One Chromium session: pages, scripts, keys, screenshots and the network log of every request."""

    def __init__(self, downloads: Path, bound: float):
        driver = shutil.which("chromedriver")
        binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if driver is None or binary is None:
            raise RuntimeError(f"the page's tests need Chromium and its driver: {INSTALL}")
        self.bound, self.downloads = bound, downloads
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.process = subprocess.Popen(
            [driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.base = f"http://127.0.0.1:{port}"
        self.wait(lambda: self._request("GET", "/status").get("ready"), "chromedriver did not start")
        options = {
            "binary": binary,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"],
            "prefs": {"download.default_directory": str(downloads), "download.prompt_for_download": False},
        }
        capabilities = {
            "browserName": "chrome",
            "goog:chromeOptions": options,
            "goog:loggingPrefs": {"performance": "ALL", "browser": "ALL"},
        }
        session = self._request("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = f"/session/{session['sessionId']}"

    def _request(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.bound) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"chromedriver: {e.read().decode()[:500]}") from None

    def call(self, method: str, path: str, body: dict | None = None):
        return self._request(method, self.session + path, body)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._request("DELETE", self.session)
        self.process.terminate()
        self.process.wait(timeout=self.bound)

    # ---- what the tests do ----

    def go(self, url: str) -> None:
        self.call("POST", "/url", {"url": url})

    def refresh(self) -> None:
        self.call("POST", "/refresh", {})

    def run(self, script: str, *args):
        """`script`'s return value (a function body; `arguments` holds `args`)."""
        return self.call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> dict:
        return self.call("POST", "/element", {"using": "css selector", "value": css})

    def type(self, css: str, *text: str) -> None:
        """Keys sent to an element: text, and KEYS (a modifier stays down until KEYS["release"])."""
        element = self.find(css)[ELEMENT]
        self.call("POST", f"/element/{element}/value", {"text": "".join(text)})

    def click(self, css: str) -> None:
        self.call("POST", f"/element/{self.find(css)[ELEMENT]}/click", {})

    def hover(self, css: str) -> None:
        move = {"type": "pointerMove", "duration": 0, "origin": self.find(css), "x": 0, "y": 0}
        actions = [
            {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}, "actions": [move]}
        ]
        self.call("POST", "/actions", {"actions": actions})

    def resize(self, width: int, height: int) -> None:
        self.call("POST", "/window/rect", {"width": width, "height": height})

    def color_scheme(self, scheme: str) -> None:
        """Emulate the system's "light" or "dark" preference (a DevTools command, through chromedriver)."""
        feature = {"name": "prefers-color-scheme", "value": scheme}
        command = {"cmd": "Emulation.setEmulatedMedia", "params": {"features": [feature]}}
        self.call("POST", "/goog/cdp/execute", command)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("GET", "/screenshot")))

    def requested_urls(self) -> list[str]:
        """Every URL the browser asked for since the last call (Chrome's DevTools network log, which
        lists requests that a Content-Security-Policy then blocked, too)."""
        entries = self.call("POST", "/se/log", {"type": "performance"})
        messages = [json.loads(entry["message"])["message"] for entry in entries]
        return [m["params"]["request"]["url"] for m in messages if m["method"] == "Network.requestWillBeSent"]

    def console(self) -> list[str]:
        """The page's console messages since the last call (errors and Content-Security-Policy
        violations included)."""
        return [entry["message"] for entry in self.call("POST", "/se/log", {"type": "browser"})]

    def wait(self, condition, what: str):
        """`condition()`'s first true value, polled; fails after `bound` seconds (a hang, not a speed)."""
        deadline = time.monotonic() + self.bound
        while True:
            with contextlib.suppress(OSError):
                if value := condition():
                    return value
            assert time.monotonic() < deadline, f"timed out: {what}"
            time.sleep(0.05)
