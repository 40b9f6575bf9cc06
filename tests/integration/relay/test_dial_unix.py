"""The relay's connect to a unix socket path (relay/dial_unix.py): policy first,
then a connect whose failures become OPEN_FAILED reasons the agent can act on."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from wstunnel import mux
from wstunnel.relay.dial import DialError
from wstunnel.relay.dial_unix import UnixConnector
from wstunnel.security.policy import Policy


def _connect_now(path: str, rules: list[str]) -> socket.socket:
    connected = UnixConnector().connect(path, mux.PATH_KIND_PORT, Policy(rules), timeout=5)
    assert isinstance(connected, socket.socket), "a unix connect completes at once"
    return connected


def _failure(path: str, rules: list[str]) -> DialError:
    with pytest.raises(DialError) as caught:
        _connect_now(path, rules)
    return caught.value


def test_an_allowed_listening_path_is_connected_at_once(tmp_path: Path) -> None:
    """An allowed path with a server is connected in the caller's task, non-blocking."""
    path = str(tmp_path / "db.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        with _connect_now(path, [f"unix:{path}"]) as sock:
            assert not sock.getblocking()
            assert sock.family == socket.AF_UNIX


def test_a_forbidden_path_is_refused_before_any_connect(tmp_path: Path) -> None:
    """FORBIDDEN with the policy's reason; the server never sees a connection."""
    path = str(tmp_path / "db.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        server.setblocking(False)
        failure = _failure(path, ["unix:/run/other.sock", "0.0.0.0/0"])
        assert failure.reason is mux.OpenFailure.FORBIDDEN
        assert f"no allow rule matches unix:{path}" in failure.text
        with pytest.raises(BlockingIOError):
            server.accept()


def test_connect_failures_say_what_is_wrong(tmp_path: Path) -> None:
    """Nothing at the path: UNREACHABLE; a stale socket file: REFUSED; each names it."""
    missing, stale = str(tmp_path / "missing.sock"), str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(stale)
    rules = [f"unix:{tmp_path}/*"]
    failure = _failure(missing, rules)
    assert (failure.reason, failure.text) == (
        mux.OpenFailure.UNREACHABLE, f"unix:{missing} does not exist on the relay host")
    failure = _failure(stale, rules)
    assert failure.reason is mux.OpenFailure.REFUSED
    assert failure.text.startswith(f"nothing listens on unix:{stale} (connection refused")


async def test_a_full_backlog_is_waited_for_not_refused(tmp_path: Path) -> None:
    """A server whose listen backlog is full (EAGAIN, where TCP would retry its SYN)
    is connected once it accepts, within the connect timeout."""
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
        server.bind(path)
        server.listen(0)
        first.connect(path)  # fills the backlog of 0 (one pending connection)
        connecting = UnixConnector().connect(path, 1, Policy([f"unix:{path}"]), timeout=5)
        assert callable(connecting)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_accept_later, server)
                sock = await connecting()
        sock.close()


async def test_a_backlog_that_stays_full_times_out(tmp_path: Path) -> None:
    """TIMEOUT, saying the backlog stayed full, after the connect timeout."""
    path = str(tmp_path / "stuck.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
        server.bind(path)
        server.listen(0)
        first.connect(path)
        connecting = UnixConnector().connect(path, 1, Policy([f"unix:{path}"]), timeout=0.05)
        assert callable(connecting)
        with trio.fail_after(5), pytest.raises(DialError) as caught:
            await connecting()
    assert caught.value.reason is mux.OpenFailure.TIMEOUT
    assert "listen backlog stayed full" in caught.value.text


async def _accept_later(server: socket.socket) -> None:
    await trio.testing.wait_all_tasks_blocked()  # the connector waits to retry
    server.accept()[0].close()
