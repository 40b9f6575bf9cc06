"""The agent's accept loop (forwards.py): what each accepted connection looks like."""

from __future__ import annotations

import socket
import struct

import trio

from wstunnel.agent.forwards import ForwardSet
from wstunnel.config import Forward
from wstunnel.net.sockopts import NOTSENT_LOWAT

from ..tunnel_helpers import LOOPBACK

_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


async def test_accepted_sockets_are_tuned_and_go_to_carry_now_or_the_handler() -> None:
    """carry_now gets a non-blocking socket with TCP_NODELAY, the 16 KiB
    low-water mark (measured to matter for the round trip under load) and an
    abortive close until it ends cleanly (net/ending.py); when it
    declines, the handler gets the connection as a trio SocketStream."""
    taken: list[socket.socket] = []
    handled: list[trio.SocketStream] = []
    carried, fell_back = trio.Event(), trio.Event()

    def carry_now(forward: Forward, sock: socket.socket) -> bool:
        taken.append(sock)
        carried.set()
        return len(taken) == 1  # the second one goes to the handler

    async def handler(forward: Forward, stream: trio.SocketStream) -> None:
        handled.append(stream)
        fell_back.set()
        await stream.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            forwards = ForwardSet(handler, nursery, carry_now)
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
            finally:
                if taken:
                    taken[0].close()  # (carry_now took it over)
                forwards.close()
