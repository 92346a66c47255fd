"""Helpers of the user-facing tests (CLI, Python client, SSE, dashboard, webhook, /metrics): a finished
job shared between test files, the CLI as a subprocess, and headless Chromium over the DevTools
protocol."""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.services import REPO

# The checkout's own venv (CI: .ci/setup), else the console script beside the running interpreter.
ADAPTD = REPO / ".venv" / "bin" / "adaptd"
if not ADAPTD.exists():
    ADAPTD = Path(sys.executable).parent / "adaptd"
_FINISHED: dict[str, dict] = {}


def spec_kwargs(assets: dict, batch_size: int = 16) -> dict:
    """Client.submit() keyword arguments for the digit CNN and the demo's shifted digits."""
    return dict(method="tent", params={"lr": 1e-3}, model=assets["model"], architecture="digit_cnn",
                num_classes=10, arch_kwargs=assets["arch_kwargs"], data=assets["target"],
                eval_data=assets["eval"], preprocess=assets["preprocess"],
                options={"batch_size": batch_size, "seed": 0})


def finished_job(url: str, assets: dict) -> dict:
    """One succeeded tent job with eval data per service, shared by the test files that only read it."""
    if url not in _FINISHED:
        from app.client import Client

        with Client(url) as c:
            job = c.wait(c.submit(**spec_kwargs(assets))["id"], poll=0.2, timeout=300)
        assert job["status"] == "succeeded", job
        _FINISHED[url] = job
    return _FINISHED[url]


def long_dataset(path: Path, n: int = 4000) -> Path:
    """Random digits: with batch size 4 a tent job runs long enough to watch and cancel."""
    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, x=rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8))
    return path


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")}
    env.update({"ADAPTD_CONFIG": "/nonexistent/adaptd.toml", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def adaptd(*args: str, env: dict | None = None, timeout: float = 240, cwd: Path | None = None
           ) -> subprocess.CompletedProcess:
    """Run the installed console script, as a user does."""
    return subprocess.run([str(ADAPTD), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(), cwd=cwd)


# --- headless Chromium ---------------------------------------------------------------------------------

def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def chromium_run(binary: str, url: str, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """One-shot headless Chromium (--dump-dom, --screenshot) with a throwaway profile."""
    with tempfile.TemporaryDirectory(prefix="adaptd-chromium-") as profile:
        return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url],
                              capture_output=True, text=True, timeout=timeout)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: commands
    on fd 3, replies on fd 4, NUL-terminated JSON), for pages whose JavaScript must be waited for."""

    def __init__(self, binary: str, width: int = 1280, height: int = 1600, flags: tuple[str, ...] = ()):
        self.profile = tempfile.mkdtemp(prefix="adaptd-chromium-")
        child_in, self._w = os.pipe()
        self._r, child_out = os.pipe()

        def wire_fds():  # in the child: its fd 3 reads our commands, its fd 4 writes the replies
            r, w = os.dup(child_in), os.dup(child_out)  # above 4, so dup2 is never a no-op
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                      f"--window-size={width},{height}", "--remote-debugging-pipe", *flags,
                                      "about:blank"],
                                     preexec_fn=wire_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(child_in)
        os.close(child_out)
        self.width, self.height = width, height
        self._buf, self._id, self.session = b"", 0, None
        self.events: list[dict] = []  # protocol events (no "id"), in arrival order

    def call(self, method: str, params: dict | None = None, timeout: float = 30, browser: bool = False) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not browser:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if "id" not in reply:
                    self.events.append(reply)
                elif reply["id"] == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {method} in {timeout} s")
            if select.select([self._r], [], [], left)[0]:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium exited")
                self._buf += chunk

    def open(self, url: str, record_network: bool = False) -> None:
        """Navigate a new tab to `url`; with `record_network`, every request the page makes is kept in
        `self.events` (Network.requestWillBeSent)."""
        target = self.call("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 browser=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        self.call("Page.enable")
        if record_network:
            self.call("Network.enable")
        self.call("Page.navigate", {"url": url})

    def requested_urls(self) -> list[str]:
        """URLs the page asked for, less those the browser blocked before sending (CSP, mixed content)."""
        blocked = {e["params"]["requestId"] for e in self.events
                   if e.get("method") == "Network.loadingFailed" and e["params"].get("blockedReason")}
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent" and e["params"]["requestId"] not in blocked]

    def eval(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"]))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", browser=True, timeout=5)
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self._r)
        os.close(self._w)
        shutil.rmtree(self.profile, ignore_errors=True)


def png_stats(path: Path) -> tuple[tuple[int, int], float, int]:
    """(size, pixel standard deviation over the grey image, number of distinct colours)."""
    from PIL import Image, ImageStat

    with Image.open(path) as img:
        rgb = img.convert("RGB")
        grey = rgb.convert("L")
        colours = rgb.getcolors(maxcolors=1 << 20)
        return rgb.size, ImageStat.Stat(grey).stddev[0], len(colours) if colours else 1 << 20
