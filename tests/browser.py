"""Headless Chromium for the browser tests, driven over the DevTools protocol (aiohttp's WebSocket client,
which Ray already brings): open a page, set a cookie, evaluate JavaScript, take a screenshot.

Debian's `chromium` (`apt-get install chromium`); `chromium_path()` is None where it is not installed.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 30


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium with a fresh profile, stopped by `close` (only the process it started)."""

    def __init__(self, profile: Path):
        self.process = subprocess.Popen(
            [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", "--no-first-run", "--window-size=1280,1000",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + START_TIMEOUT_S
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError(f"chromium did not open its DevTools port within {START_TIMEOUT_S} s")
            time.sleep(0.2)
        self.port = int(port_file.read_text().split()[0])
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        self.ws_url = json.loads(urllib.request.urlopen(request, timeout=10).read())["webSocketDebuggerUrl"]
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._session, self._ws = self._loop.run_until_complete(self._connect())

    async def _connect(self):
        import aiohttp

        session = aiohttp.ClientSession()
        return session, await session.ws_connect(self.ws_url, max_msg_size=0)

    def send(self, method: str, **params) -> dict:
        return self._loop.run_until_complete(self._send(method, params))

    async def _send(self, method: str, params: dict) -> dict:
        message_id = next(self._ids)
        await self._ws.send_json({"id": message_id, "method": method, "params": params})
        while True:  # events arrive between answers: skip them
            message = await asyncio.wait_for(self._ws.receive_json(), timeout=60)
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def open(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str):
        """Poll a JavaScript expression until it is truthy; its value. Until the page has loaded, an expression
        may throw (no document.body yet): that counts as not yet."""
        deadline, error = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as err:
                value, error = None, err
            if value:
                return value
            time.sleep(0.5)
        text = self.evaluate("document.body ? document.body.innerText : ''")
        raise AssertionError(f"{what}: not seen within {timeout_s:.0f} s (last error: {error}); page text: {str(text)[:500]!r}")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]))
        return path

    def close(self) -> None:
        if getattr(self, "_ws", None):
            self._loop.run_until_complete(self._ws.close())
            self._loop.run_until_complete(self._session.close())
            self._loop.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
