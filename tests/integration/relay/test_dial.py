"""The relay's task-free connect to an IP literal (relay/dial.py) and its task fallback."""

from __future__ import annotations

import ipaddress
import socket

import pytest
import trio

from wstunnel import mux
from wstunnel.net import pump
from wstunnel.relay import dial
from wstunnel.relay.dial import (
    DialError,
    TcpConnector,
    finish_connect,
    literal_address,
    start_connect,
)
from wstunnel.security.policy import Policy

from ..tunnel_helpers import LOOPBACK, echo_exact, echo_handler, tunnel

ADDRESS = ipaddress.ip_address(LOOPBACK)


def _allow_all(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return True


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def test_literal_address_only_for_ip_literals() -> None:
    """IP literals (v4, v6) need no DNS; names do."""
    assert literal_address("10.0.0.1") == ipaddress.ip_address("10.0.0.1")
    assert literal_address("::1") == ipaddress.ip_address("::1")
    assert literal_address("localhost") is None


def test_start_connect_on_loopback_is_complete_at_once() -> None:
    """A loopback connect is finished (or refused) by the time we look: no task needed."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        sock, connected = start_connect(LOOPBACK, ADDRESS, listener.getsockname()[1],
                                        allows=_allow_all)
        with sock:
            assert connected
            peer, _ = listener.accept()
            peer.close()


def test_start_connect_refused_and_forbidden_raise_dial_errors() -> None:
    """Refused and forbidden are OPEN_FAILED reasons with the same texts as dial()."""
    port = _closed_port()
    with pytest.raises(DialError) as refused:
        start_connect(LOOPBACK, ADDRESS, port, allows=_allow_all)
    assert (refused.value.reason, refused.value.text) == (
        mux.OpenFailure.REFUSED, "connection refused")
    with pytest.raises(DialError) as forbidden:
        start_connect(LOOPBACK, ADDRESS, port, allows=lambda address: False)
    assert forbidden.value.reason is mux.OpenFailure.FORBIDDEN
    assert forbidden.value.text == (
        f"{LOOPBACK}:{port} is not allowed by the relay's policy (resolves to {LOOPBACK})")


def _connect_started(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex((LOOPBACK, port))
    return sock


async def test_finish_connect_waits_for_the_connection_or_classifies_the_failure() -> None:
    """A connect left in progress completes in finish_connect, or fails as REFUSED."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        sock = _connect_started(listener.getsockname()[1])
        with trio.fail_after(5):
            assert await finish_connect(sock, LOOPBACK, 1, timeout=5) is sock
        sock.close()
    sock = _connect_started(_closed_port())
    with trio.fail_after(5), pytest.raises(DialError) as refused:
        await finish_connect(sock, LOOPBACK, 1, timeout=5)
    assert refused.value.reason is mux.OpenFailure.REFUSED
    assert sock.fileno() == -1  # closed


async def test_finish_connect_times_out(autojump_clock: trio.abc.Clock) -> None:
    """A connect that never completes (the listener's queue is full, SYNs are dropped)
    ends as TIMEOUT after the timeout, with dial()'s text, and the socket closed."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [_connect_started(port) for _ in range(3)]
        try:
            sock = _connect_started(port)
            with pytest.raises(DialError) as timed_out:
                await finish_connect(sock, LOOPBACK, port, timeout=7)
        finally:
            for filler in fillers:
                filler.close()
    assert timed_out.value.reason is mux.OpenFailure.TIMEOUT
    assert timed_out.value.text == f"connecting to {LOOPBACK}:{port} timed out after 7 s"
    assert sock.fileno() == -1


@pytest.mark.skipif(not pump.AVAILABLE, reason="no select.epoll here")
async def test_connect_still_in_progress_finishes_in_a_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the connect is not complete at once (a remote destination), the relay
    finishes it in a task and the channel carries data as usual."""
    calls: list[bool] = []

    def in_progress(*args: object, **kwargs: object) -> tuple[socket.socket, bool]:
        sock, _connected = start_connect(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(True)
        return sock, False

    monkeypatch.setattr(dial, "start_connect", in_progress)  # (TcpConnector's)
    with trio.fail_after(10):
        async with tunnel([echo_handler]) as (ports, _relay, _agent):
            for _ in range(3):
                async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as stream:
                    assert await echo_exact(stream, b"hello" * 100) == b"hello" * 100
    assert len(calls) == 3


def test_start_connect_without_a_socket_is_a_dial_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """No socket to be had (out of file descriptors) refuses the channel; it never
    raises into the session's reader."""

    def no_socket(*args: object) -> socket.socket:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(socket, "socket", no_socket)
    with pytest.raises(DialError) as failed:
        start_connect(LOOPBACK, ADDRESS, 1, allows=_allow_all)
    assert failed.value.reason is mux.OpenFailure.UNREACHABLE
    assert failed.value.text == "too many open files"


async def test_tcp_connector_literal_at_once_name_in_a_task_forbidden_refused() -> None:
    """The relay's Connector for TCP: an allowed IP literal comes back connected at
    once (no task); a host name comes back as the rest to await, which resolves,
    checks and connects; a literal the policy forbids is a DialError at once."""
    connector = TcpConnector()
    with socket.create_server((LOOPBACK, 0)) as listener:
        port = listener.getsockname()[1]
        policy = Policy([f"{LOOPBACK}:{port}"])
        now = connector.connect(LOOPBACK, port, policy, timeout=5)
        assert isinstance(now, socket.socket)
        later = connector.connect("localhost", port, policy, timeout=5)
        assert not isinstance(later, socket.socket)
        with trio.fail_after(5):
            connected = await later()
        try:
            for sock in (now, connected):
                assert sock.getpeername()[:2] == (LOOPBACK, port)
        finally:
            now.close()
            connected.close()
        with pytest.raises(DialError) as forbidden:
            connector.connect(LOOPBACK, port + 1 if port < 65535 else port - 1, policy, timeout=5)
    assert forbidden.value.reason is mux.OpenFailure.FORBIDDEN
