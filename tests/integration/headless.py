"""A headless Chromium driven over the DevTools protocol, for the dashboard tests.

Blocking code (``websockets.sync``): run it in a thread (``trio.to_thread``).
Chromium comes from Debian's packages (``apt-get install chromium``); the
tests skip, saying so, where it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

__all__ = ["CHROMIUM", "Tab", "open_tab"]

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)
_TIMEOUT = 30.0


class Tab:
    """One page of the browser: call DevTools methods, wait for events, run script."""

    def __init__(self, connection: ClientConnection, session: str) -> None:
        self.connection = connection
        self.session = session
        self._id = 0
        self._events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session:  # (none: the browser itself)
            message["sessionId"] = self.session
        self.connection.send(json.dumps(message))
        while True:
            reply = json.loads(self.connection.recv(timeout=_TIMEOUT))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return dict(reply["result"])
            self._events.append(reply)

    def wait_event(self, method: str) -> dict[str, Any]:
        """The first ``method`` event since the tab opened (they are kept until read)."""
        while True:
            for event in self._events:
                if event.get("method") == method:
                    self._events.remove(event)
                    return event
            self._events.append(json.loads(self.connection.recv(timeout=_TIMEOUT)))

    def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page (a promise is awaited); a script
        error is an AssertionError with the browser's text."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise AssertionError(f"in the page: {text}")
        return result["result"].get("value")


@contextmanager
def open_tab(profile: Path, headers: dict[str, str] | None = None) -> Iterator[Tab]:
    """A fresh headless Chromium (profile in ``profile``) with one blank tab that sends
    ``headers`` with every request; killed on the way out."""
    assert CHROMIUM is not None
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = _devtools_url(process)
        with connect(url, max_size=None, open_timeout=_TIMEOUT) as connection:
            yield _attach(connection, headers or {})
    finally:
        process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


def _devtools_url(process: subprocess.Popen[str]) -> str:
    """Read Chromium's stderr up to the DevTools address; keep draining it after."""
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if match := re.search(r"DevTools listening on (ws://\S+)", line):
            threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
            return match[1]
    raise AssertionError("chromium exited before listening:\n" + "".join(seen[-20:]))


def _drain(stream: Any) -> None:
    try:
        for _ in stream:
            pass
    except (OSError, ValueError):  # closed on the way out
        return


def _attach(connection: ClientConnection, headers: dict[str, str]) -> Tab:
    browser = Tab(connection, "")
    target = browser.call("Target.createTarget", url="about:blank")["targetId"]
    session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    tab = Tab(connection, session)
    tab.call("Page.enable")
    tab.call("Network.enable")
    if headers:
        tab.call("Network.setExtraHTTPHeaders", headers=headers)
    return tab
