"""ws:// sessions on a bare socket (net/plain_stream.py) keep trio's Stream contract."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from wstunnel.net.plain_stream import PlainSocketStream, take_over

from ..tunnel_helpers import (
    FailedReads,
    assert_parts_arrive_joined,
    assert_receive_into_fills_views,
)


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


async def test_after_a_drained_read_the_next_bytes_are_awaited_not_tried_for() -> None:
    """An idle session's reader (net/transport.py) calls wait_receivable after a read
    that left the socket empty: the next bytes cost one read, not a failed one first
    (a system call and an exception per ping on a relay with many idle agents). After
    a read that filled its buffer the bytes left are read at once, without a wait."""
    a, b = socket.socketpair()
    b.setblocking(False)
    counted = FailedReads(fileno=b.detach())
    stream = PlainSocketStream(counted)
    try:
        with trio.fail_after(5):
            a.send(b"ping")
            assert await stream.receive_some(100) == b"ping"  # (short: drained)
            got: list[bytes | bytearray] = []

            async def read_when_receivable() -> None:
                await stream.wait_receivable()
                got.append(await stream.receive_some(100))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_when_receivable)
                await trio.testing.wait_all_tasks_blocked()
                a.send(b"next")
            assert got == [b"next"]
            assert counted.failed == 0
            a.send(b"0123456789")
            assert await stream.receive_some(4) == b"0123"  # (full: more may be there)
            await stream.wait_receivable()  # (returns at once: the rest is buffered)
            assert await stream.receive_some(100) == b"456789"
            assert counted.failed == 0
    finally:
        a.close()
        await stream.aclose()


async def test_closing_the_stream_wakes_a_reader_waiting_for_bytes() -> None:
    """A session that ends while its idle reader waits in wait_receivable: the reader
    gets ClosedResourceError (which ends its loop), not a hang."""
    a, b = socket.socketpair()
    b.setblocking(False)
    stream = PlainSocketStream(b)
    try:
        with trio.fail_after(5):
            a.send(b"ping")
            assert await stream.receive_some(100) == b"ping"  # (drained)
            async with trio.open_nursery() as nursery:
                async def wait_and_expect_closed() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await stream.wait_receivable()

                nursery.start_soon(wait_and_expect_closed)
                await trio.testing.wait_all_tasks_blocked()
                stream.close()
            with pytest.raises(trio.ClosedResourceError):
                await stream.wait_receivable()
    finally:
        a.close()
        await stream.aclose()
