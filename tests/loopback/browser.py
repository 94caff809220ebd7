"""Headless Chromium for the page tests: one-shot `--dump-dom` / `--screenshot` runs, and a
DevTools (CDP) session over its websocket for pages that must be waited on (a streamed answer).

Every wait has a deadline; the browser process is always ended (and reaped) on the way out."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What headless Chromium needs to run as root in a container: no sandbox (needs user namespaces),
# no GPU process, /tmp instead of a small /dev/shm.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--no-first-run", "--window-size=1280,900"]
START_TIMEOUT_S = 60.0  # a cold Chromium on a loaded 2-core machine takes seconds to listen


def env() -> dict[str, str]:
    """The test's environment minus LD_PRELOAD: bin/test preloads OpenBLAS for mlx, and Chromium's
    GPU process aborts with it ("GPU process isn't usable")."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def dump_dom(url: str, profile: Path, budget_ms: int = 5000, timeout: float = 120.0) -> str:
    """The DOM after the page's scripts ran for `budget_ms` of virtual time."""
    r = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}",
                        f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                       capture_output=True, text=True, timeout=timeout, env=env())
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


class Page:
    """One Chromium page driven over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = 0

    async def __aenter__(self) -> Page:
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "--remote-allow-origins=*", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=(self.profile / "chromium.log").open("wb"),
            start_new_session=True, env=env())
        try:
            port = await self._port()
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            async with self._http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            page = next(t for t in targets if t["type"] == "page")
            self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _port(self) -> int:
        """Chromium writes the port it picked to DevToolsActivePort in the profile."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, "chromium exited at start"
            if marker.exists() and (lines := marker.read_text().split()):
                return int(lines[0])
            await asyncio.sleep(0.1)
        raise TimeoutError(f"chromium did not open its DevTools port within {START_TIMEOUT_S:.0f}s")

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)

    async def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """One CDP command and its result (events in between are skipped)."""
        assert self._ws is not None
        self._ids += 1
        mine = self._ids
        await self._ws.send_str(json.dumps({"id": mine, "method": method, "params": params}))
        async with asyncio.timeout(timeout):
            while True:
                msg = json.loads((await self._ws.receive()).data)
                if msg.get("id") == mine:
                    assert "error" not in msg, msg
                    return msg["result"]

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        res = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float) -> Any:
        """Poll a JS expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            got = await self.evaluate(expression)
            if got:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still false after {timeout:.0f}s")
            await asyncio.sleep(0.2)

    async def screenshot(self, path: Path) -> Path:
        res = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(res["data"]))
        return path
