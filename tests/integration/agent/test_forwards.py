"""The agent's accept loop (forwards.py): what each accepted connection looks like."""

from __future__ import annotations

import socket
import struct

import trio

from wstunnel.agent.forwards import ForwardSet
from wstunnel.config import Forward
from wstunnel.net.channel_stream import ChannelStream
from wstunnel.net.sockopts import NOTSENT_LOWAT

from ..tunnel_helpers import LOOPBACK

_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


class _Opener:
    """A ChannelOpener that takes the first connection at once and declines the rest."""

    def __init__(self) -> None:
        self.taken: list[socket.socket] = []
        self.handled: list[trio.abc.HalfCloseableStream] = []
        self.targets: list[tuple[str, int]] = []
        self.carried, self.fell_back = trio.Event(), trio.Event()

    def carry_now(self, host: str, port: int, sock: socket.socket) -> bool:
        self.taken.append(sock)
        self.targets.append((host, port))
        self.carried.set()
        return len(self.taken) == 1  # the second one goes to carry, in a task

    async def carry(self, host: str, port: int, stream: trio.abc.HalfCloseableStream) -> None:
        self.handled.append(stream)
        self.targets.append((host, port))
        self.fell_back.set()
        await stream.aclose()

    async def open_channel(self, host: str, port: int) -> ChannelStream | None:
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
            bound = await nursery.start(forwards.serve, [Forward(LOOPBACK, 0, LOOPBACK, 9)])
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
            finally:
                if taken:
                    taken[0].close()  # (carry_now took it over)
                forwards.close()
