"""The local admin socket and the ``wstunnel status`` client.

Theory of operation
-------------------
The running agent or relay listens on a unix stream socket (``admin_socket``)
created with mode 0600, so only its own user (and root) may connect. The
protocol is JSON lines: the client sends ``{"command": "status"}`` and gets
one line back, the ``snapshot`` of its ``TunnelStats`` (metrics_output.py)
with ``"ok": true`` (or ``"ok": false`` and an ``"error"``). A connection may
ask again and again; ``--watch`` does exactly that once a second.

The client side is plain blocking ``socket`` code: it runs outside trio.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import Any, Final, NoReturn, TextIO

import trio

from .metrics import TunnelStats
from .metrics_output import snapshot

__all__ = ["AdminError", "StatusClient", "format_status", "query_status", "serve_admin",
           "show_status"]

log = logging.getLogger("wstunnel.admin")

_MAX_LINE: Final = 65536
_IDLE_TIMEOUT: Final = 300.0
_CLEAR_SCREEN: Final = "\x1b[H\x1b[J"  # cursor home, erase below: redraw in place


class AdminError(Exception):
    """The admin socket could not be reached or answered nonsense."""


# ------------------------------------------------------------------ server

async def serve_admin(
    stats: TunnelStats, path: str, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """Answer status requests on the unix socket ``path`` until cancelled.

    A stale socket file left by a crashed process is replaced; a live one
    (another process answers) or any other file there is an error.
    """
    listener = await _bind(path)
    log.info("admin socket at %s (wstunnel status --socket %s)", path, path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, _handler(stats), [listener])
            task_status.started(path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    raise AssertionError("serve_listeners returned")  # pragma: no cover


async def _bind(path: str) -> trio.SocketListener:
    _remove_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: no window where others could connect
    try:
        await sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    return trio.SocketListener(sock)


def _remove_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(17, "exists and is not a socket; remove it or pick another "
                                  "admin_socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left over from a crash
        return
    finally:
        probe.close()
    raise FileExistsError(17, "another wstunnel answers on this admin_socket", path)


def _handler(stats: TunnelStats) -> Callable[[trio.SocketStream], Any]:
    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _converse(stream, stats)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("admin client went away: %s", exc)
        finally:
            await trio.aclose_forcefully(stream)

    return handle


async def _converse(stream: trio.SocketStream, stats: TunnelStats) -> None:
    buffer = b""
    while True:
        with trio.move_on_after(_IDLE_TIMEOUT):
            data = await stream.receive_some(4096)
        if not data:
            return
        buffer += data
        if len(buffer) > _MAX_LINE:
            await stream.send_all(_line({"ok": False, "error": "request too long"}))
            return
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            await stream.send_all(_line(_answer(line, stats)))


def _answer(line: bytes, stats: TunnelStats) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "expected one JSON object per line"}
    command = request.get("command") if isinstance(request, dict) else None
    if command == "status":
        return {"ok": True, **snapshot(stats)}
    return {"ok": False, "error": f"unknown command {command!r}; known: status"}


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


# ------------------------------------------------------------------ client

class StatusClient:
    """A blocking connection to an admin socket; one status per :meth:`status`."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise AdminError(_connect_advice(path, exc)) from exc
        self._reader = self._sock.makefile("rb")

    def status(self) -> dict[str, Any]:
        try:
            self._sock.sendall(b'{"command":"status"}\n')
            line = self._reader.readline(_MAX_LINE * 64)
        except OSError as exc:
            raise AdminError(f"{self.path}: lost the connection: {exc}") from exc
        if not line:
            raise AdminError(f"{self.path}: the process closed the admin connection")
        try:
            answer = json.loads(line)
        except ValueError as exc:
            raise AdminError(f"{self.path}: not a wstunnel admin socket") from exc
        if not isinstance(answer, dict):
            raise AdminError(f"{self.path}: not a wstunnel admin socket (it answered "
                             f"{type(answer).__name__} JSON); check the admin_socket path")
        if not answer.get("ok"):
            raise AdminError(f"{self.path}: {answer.get('error', answer)}")
        return answer

    def close(self) -> None:
        self._reader.close()
        self._sock.close()


def query_status(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """One status snapshot from the admin socket at ``path``.

    Raises:
        AdminError: with a message saying what to check.
    """
    client = StatusClient(path, timeout)
    try:
        return client.status()
    finally:
        client.close()


def show_status(path: str, *, watch: bool = False, out: TextIO | None = None,
                interval: float = 1.0) -> int:
    """Print the status of the process behind ``path``; with ``watch``, redraw it
    every ``interval`` s (in place on a terminal) until Ctrl-C. Returns the exit code."""
    out = out or sys.stdout
    try:
        client = StatusClient(path)
    except AdminError as exc:
        print(f"wstunnel: error: {exc}", file=sys.stderr)
        return 1
    try:
        while True:
            text = format_status(client.status())
            if not watch:
                print(text, file=out)
                return 0
            in_place = out.isatty()
            out.write((_CLEAR_SCREEN if in_place else "") + text + ("\n" if in_place else "\n\n"))
            out.flush()
            time.sleep(interval)
    except AdminError as exc:
        print(f"wstunnel: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()


def _connect_advice(path: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return (f"no admin socket at {path}: is the agent/relay running with "
                f"admin_socket: {path} in its config?")
    if isinstance(exc, PermissionError):
        return f"permission denied on {path}: it is mode 0600; run as the service's user or root"
    if isinstance(exc, ConnectionRefusedError):
        with contextlib.suppress(OSError):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                return (f"{path} is not a socket: give the path of the process's "
                        f"admin_socket")
        return f"nothing listens on {path}: the process that made it has exited"
    return f"cannot connect to {path}: {exc.strerror or exc}"


# ------------------------------------------------------------------ output

def format_status(status: dict[str, Any]) -> str:
    """The human-readable status: a summary line, then each session and its channels."""
    sessions = status.get("sessions", [])
    open_channels = sum(len(s["channels"]) for s in sessions)
    lines = [
        f"wstunnel {status['role']} {status['version']}, pid {status['pid']}, "
        f"up {_duration(status['uptime'])}: {len(sessions)} session"
        f"{'s' * (len(sessions) != 1)}, {open_channels} open / {status['channels_total']} "
        f"channels, sent {_size(status['bytes_sent'])}, received "
        f"{_size(status['bytes_received'])}"
        + (f", {status['reconnects']} reconnects" if status["role"] == "agent" else ""),
    ]
    failures = status.get("open_failures") or {}
    if failures:
        lines.append("refused opens: " + ", ".join(f"{k} {v}" for k, v in sorted(failures.items())))
    if not sessions:
        lines.append("no session to the relay (reconnecting)" if status["role"] == "agent"
                     else "no agent connected")
    reverse = status.get("reverse_forwards") or []
    if reverse:
        lines += ["", "reverse forwards (-R)"]
        lines += [f"  {row['forward']}: {row['listen']} -> {row['target']}: {row['state']}"
                  for row in reverse]
    for session in sessions:
        lines.append("")
        lines.append(f"session {session['name']}  via {session.get('transport', 'websocket')}"
                     f"  up {_duration(session['age'])}  "
                     f"{len(session['channels'])} open / {session['channels_total']} channels")
        if session["channels"]:
            lines.append(_row("ID", "DESTINATION", "AGE", "SENT", "RECEIVED", "RATE OUT",
                              "RATE IN", "FORWARD"))
        for ch in sorted(session["channels"], key=lambda c: c["id"]):
            lines.append(_row(str(ch["id"]), ch["destination"], _duration(ch["age"]),
                              _size(ch["bytes_sent"]), _size(ch["bytes_received"]),
                              _size(ch["rate_sent"]) + "/s", _size(ch["rate_received"]) + "/s",
                              ch.get("forward") or "-"))
    return "\n".join(lines)


def _row(*cells: str) -> str:
    widths = (6, 28, 8, 10, 10, 12, 12, 0)
    return "  " + " ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _size(count: float) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
