"""The agent's accept loop (forwards.py): what each accepted connection looks like."""

from __future__ import annotations

import socket
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from wstunnel import mux
from wstunnel.agent.forwards import ForwardSet, ListenError
from wstunnel.config import Forward
from wstunnel.net.channel_stream import ChannelStream
from wstunnel.net.sockopts import NOTSENT_LOWAT

from ..log_watch import LogWatch
from ..tunnel_helpers import LOOPBACK

_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


class _Opener:
    """A ChannelOpener that takes the first connection at once and declines the rest."""

    def __init__(self) -> None:
        self.taken: list[socket.socket] = []
        self.handled: list[trio.abc.HalfCloseableStream] = []
        self.targets: list[tuple[str, int]] = []
        self.forwards: list[str | None] = []
        self.carried, self.fell_back = trio.Event(), trio.Event()

    def carry_now(self, host: str, port: int, sock: socket.socket, *,
                  kind: int = mux.ChannelKind.TCP, forward: str | None = None) -> bool:
        self.taken.append(sock)
        self.targets.append((host, port))
        self.forwards.append(forward)
        self.carried.set()
        return len(self.taken) == 1  # the second one goes to carry, in a task

    async def carry(self, host: str, port: int, stream: trio.abc.HalfCloseableStream, *,
                    kind: int = mux.ChannelKind.TCP, forward: str | None = None) -> None:
        self.handled.append(stream)
        self.targets.append((host, port))
        self.fell_back.set()
        await stream.aclose()

    async def open_channel(self, host: str, port: int, *, kind: int = mux.ChannelKind.TCP,
                           forward: str | None = None) -> ChannelStream | None:
        raise AssertionError("a -L forward opens with carry_now or carry")

    async def carry_channel(self, channel: ChannelStream,
                            stream: trio.abc.HalfCloseableStream) -> None:
        raise AssertionError("a -L forward opens with carry_now or carry")


async def test_accepted_sockets_are_tuned_and_go_to_carry_now_or_carry() -> None:
    """A local TCP forward's connection goes to the forward's target: carry_now gets
    a non-blocking socket with TCP_NODELAY, the 16 KiB low-water mark (measured
    to matter for the round trip under load) and an abortive close until it ends
    cleanly (net/ending.py); when it declines, carry gets the connection as a
    trio SocketStream in a task."""
    opener = _Opener()
    taken, handled, carried, fell_back = (opener.taken, opener.handled, opener.carried,
                                          opener.fell_back)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            forwards = ForwardSet(opener, nursery)
            named = replace(Forward(LOOPBACK, 0, LOOPBACK, 9), name="discard")
            bound = await nursery.start(forwards.serve, [named])
            port = bound[0][0][1]
            try:
                async with await trio.open_tcp_stream(LOOPBACK, port):
                    await carried.wait()
                sock = taken[0]
                assert not sock.getblocking()
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                assert sock.getsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT
                # abortive from the start: even the kernel's close of a killed agent resets
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == \
                    struct.pack("ii", 1, 0)
                async with await trio.open_tcp_stream(LOOPBACK, port):
                    await fell_back.wait()
                assert len(taken) == 2 and isinstance(handled[0], trio.SocketStream)
                assert opener.targets == [(LOOPBACK, 9)] * 3
                assert opener.forwards == ["discard"] * 2  # (its channels carry its name)
            finally:
                if taken:
                    taken[0].close()  # (carry_now took it over)
                forwards.close()


class _Closer(_Opener):
    """A ChannelOpener that notes each connection's target and kind and closes it."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: list[int] = []

    def carry_now(self, host: str, port: int, sock: socket.socket, *,
                  kind: int = mux.ChannelKind.TCP, forward: str | None = None) -> bool:
        self.targets.append((host, port))
        self.kinds.append(kind)
        sock.close()
        self.carried.set()
        return True


def _stale_socket(path: Path) -> None:
    """A socket file nobody listens on, as a killed agent leaves it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


async def test_unix_listener_replaces_a_stale_socket_and_removes_its_file(
        tmp_path: Path) -> None:
    """A listen path left by a dead run is taken over; connections on it go to the
    target as a unix OPEN (path, port 1) when the target is unix:/path; the file is
    removed when the forward is dropped by a reload, and when the listeners stop."""
    opener = _Closer()
    first, second = tmp_path / "a.sock", tmp_path / "b.sock"
    _stale_socket(first)
    forward_a = Forward("", 0, "", 0, listen_path=str(first), target_path="/run/db.sock")
    forward_b = Forward("", 0, LOOPBACK, 9, listen_path=str(second))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            forwards = ForwardSet(opener, nursery)
            bound = await nursery.start(forwards.serve, [forward_a, forward_b])
            assert bound == [[(str(first), 0)], [(str(second), 0)]]
            for path in (first, second):
                async with await trio.open_unix_socket(str(path)):
                    await opener.carried.wait()
                opener.carried = trio.Event()
            assert opener.targets == [("/run/db.sock", mux.PATH_KIND_PORT), (LOOPBACK, 9)]
            assert opener.kinds == [mux.ChannelKind.UNIX, mux.ChannelKind.TCP]
            await forwards.apply([forward_b])
            await trio.testing.wait_all_tasks_blocked()
            assert not first.exists() and second.exists()
            forwards.close()
    assert not second.exists()


@pytest.mark.parametrize("occupant", ["file", "listener"])
async def test_occupied_listen_path_is_an_error_naming_the_forward(
        tmp_path: Path, occupant: str) -> None:
    """A regular file at the listen path is never removed, nor is a live program's
    socket taken over: binding fails with the forward's position, path and why."""
    path = tmp_path / "app.sock"
    live = None
    if occupant == "file":
        path.write_text("precious")
    else:
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        live.bind(str(path))
        live.listen()
    forward = Forward("", 0, LOOPBACK, 9, listen_path=str(path))
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                with pytest.raises(ListenError) as caught:
                    await nursery.start(ForwardSet(_Closer(), nursery).serve,
                                        [Forward(LOOPBACK, 0, LOOPBACK, 9), forward])
        text = str(caught.value)
        assert text.startswith(f"forwards[1]: cannot listen on {path} ")
        if live is None:
            assert "is not a socket" in text and path.read_text() == "precious"
        else:
            assert "a running program listens on it" in text
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(path))  # still the other program's
    finally:
        if live is not None:
            live.close()


async def test_an_ipv6_listener_is_logged_with_brackets(logs: LogWatch) -> None:
    """``-L [::1]:PORT:...`` is logged as ``[::1]:PORT``, the form the user wrote and
    can paste, not as the ambiguous ``::1:PORT``."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            forwards = ForwardSet(_Opener(), nursery)
            bound = await nursery.start(forwards.serve, [Forward("::1", 0, LOOPBACK, 9)])
            forwards.close()
    assert f"forwarding [::1]:{bound[0][0][1]} -> {LOOPBACK}:9" in logs.lines
