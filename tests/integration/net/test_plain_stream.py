"""ws:// sessions on a bare socket (net/plain_stream.py) keep trio's Stream contract."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from wstunnel.net.plain_stream import PlainSocketStream, take_over

from ..tunnel_helpers import assert_parts_arrive_joined, assert_receive_into_fills_views


def plain_pair() -> tuple[PlainSocketStream, PlainSocketStream]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return (take_over(trio.SocketStream(trio.socket.from_stdlib_socket(a))),
            take_over(trio.SocketStream(trio.socket.from_stdlib_socket(b))))


async def test_trio_stream_conformance() -> None:
    """trio.testing's generic checks for a two-way stream (close, EOF, busy, cancellation)."""
    async def maker() -> tuple[PlainSocketStream, PlainSocketStream]:
        return plain_pair()

    with trio.fail_after(30):
        await trio.testing.check_two_way_stream(maker, None)


async def test_take_over_moves_the_socket_and_a_gone_peer_is_a_broken_stream() -> None:
    """The trio stream gives its descriptor up; writing to a peer that is gone
    raises BrokenResourceError caused by the OSError, as trio's own stream does."""
    raw = socket.socketpair()
    tcp = trio.SocketStream(trio.socket.from_stdlib_socket(raw[0]))
    stream = take_over(tcp)
    assert tcp.socket.fileno() == -1
    try:
        with trio.fail_after(5):
            await stream.send_all(b"ping")
            assert raw[1].recv(4) == b"ping"
            raw[1].send(b"pong")
            assert await stream.receive_some(10) == b"pong"
            raw[1].close()
            assert await stream.receive_some(10) == b""  # EOF
            with pytest.raises(trio.BrokenResourceError) as caught:
                await stream.send_all(b"x" * 65536)
        assert isinstance(caught.value.__cause__, OSError)
    finally:
        await stream.aclose()


async def test_parts_arrive_as_if_joined_even_when_the_kernel_takes_them_piecemeal() -> None:
    """send_parts gathers with sendmsg; partial sends resume mid-part."""
    sender, receiver = plain_pair()
    parts = [b"h" * 10, bytes(range(256)) * 8192, b"x", b"y" * 3_000_000]  # > socket buffers
    try:
        await assert_parts_arrive_joined(sender, receiver, parts)
    finally:
        await sender.aclose()
        await receiver.aclose()


async def test_receive_into_reads_into_the_given_view() -> None:
    """The transport reads big payloads straight into their buffer (receive_into)."""
    sender, receiver = plain_pair()
    try:
        await assert_receive_into_fills_views(sender, receiver)
    finally:
        await sender.aclose()
        await receiver.aclose()
