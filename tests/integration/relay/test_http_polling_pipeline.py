"""Two polling POSTs in flight (relay/http_front.py ``_poll_up``, relay/http_sessions.py
``poll_turn``, ``poll_feed_part``; docs/PROTOCOL.md §11.2).

The relay announces on the opening answer that it takes two POSTs at once: POST
N + 1, on a connection of its own, may arrive while N is still arriving. What
the agent relies on: N + 1 waits (unread) until N has been fed, then both are
answered; the session gets every byte once, in order, also when N's connection
breaks half way and N is sent again; an agent that sends one POST at a time
(older ones) is served as before. The bodies here are PING frames, which the
relay's session answers with PONGs carrying the same payload: a byte lost or
repeated would garble the frames and end the session instead.
"""

from __future__ import annotations

import struct

import trio
import trio.testing

from wstunnel.framing import (
    DOWN_PIPELINE_HEADER,
    PIPELINE_HEADER,
    SEQUENCE_HEADER,
    SESSION_HEADER,
    TRANSPORT_HEADER,
    FrameType,
    encode_frame,
)
from wstunnel.relay import Relay

from ..tunnel_helpers import LOOPBACK, relay_config

TIMEOUT = 10.0
_FRAME_HEAD = struct.Struct(">BI")


def _head(method: str, session_id: str | None, sequence: int, length: int) -> bytes:
    lines = [f"{method} /tunnel HTTP/1.1", "Host: x", f"{TRANSPORT_HEADER}: polling",
             f"{SEQUENCE_HEADER}: {sequence}", f"Content-Length: {length}"]
    if session_id is not None:
        lines.append(f"{SESSION_HEADER}: {session_id}")
    return "\r\n".join([*lines, "", ""]).encode()


async def _answer(stream: trio.SocketStream) -> tuple[str, bytes]:
    """(status line and headers, the body: Content-Length or chunked) of the next answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = await stream.receive_some()
        assert got, f"closed with no answer after {data!r}"
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    if "transfer-encoding: chunked" not in text.lower():
        length = int(text.lower().split("content-length: ")[1].split("\r\n")[0])
        while len(rest) < length:
            rest += await stream.receive_some()
        return text, rest
    body = b""
    while True:
        while b"\r\n" not in rest:
            rest += await stream.receive_some()
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        while len(rest) < size + 2:
            rest += await stream.receive_some()
        body, rest = body + rest[:size], rest[size + 2:]
        if size == 0:
            return text, body


def _ping(word: bytes) -> bytes:
    return encode_frame(FrameType.PING, word)


class _Client:
    """Raw polling requests to an in-process relay."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.session_id = ""
        self.down = 0
        self.pongs: list[bytes] = []
        self._frames = b""

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(LOOPBACK, self.port)

    async def open(self) -> str:
        async with await self.connect() as stream:
            await stream.send_all(_head("POST", None, 0, 0))
            head, _ = await _answer(stream)
        start = head.lower().index(f"{SESSION_HEADER.lower()}: ") + len(SESSION_HEADER) + 2
        self.session_id = head[start:].split("\r\n")[0]
        return head

    async def post(self, stream: trio.SocketStream, sequence: int, body: bytes) -> None:
        await stream.send_all(_head("POST", self.session_id, sequence, len(body)) + body)

    async def pongs_until(self, word: bytes) -> list[bytes]:
        """GET batches until a PONG carrying ``word`` came; every PONG so far."""
        while word not in self.pongs:
            async with await self.connect() as stream:
                await stream.send_all(_head("GET", self.session_id, self.down, 0))
                head, body = await _answer(stream)
            assert head.startswith("HTTP/1.1 200 "), head
            self.down += bool(body)
            self._frames += body
            while len(self._frames) >= _FRAME_HEAD.size:
                kind, length = _FRAME_HEAD.unpack_from(self._frames)
                if len(self._frames) < _FRAME_HEAD.size + length:
                    break
                payload = self._frames[_FRAME_HEAD.size:_FRAME_HEAD.size + length]
                self._frames = self._frames[_FRAME_HEAD.size + length:]
                if kind == FrameType.PONG:
                    self.pongs.append(payload)
        return self.pongs


async def _relay(nursery: trio.Nursery) -> int:
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    await nursery.start(trio.serve_listeners, Relay(relay_config()).handle_connection,
                        listeners)
    return int(listeners[0].socket.getsockname()[1])


async def test_post_n_plus_1_waits_for_n_and_both_are_answered_in_order() -> None:
    """POST 1 arrives first and waits; POST 0's connection breaks half way through its
    body and POST 0 comes again: each body is fed once, 0 before 1, and both answered."""
    zero, one = _ping(b"zero"), _ping(b"one")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            client = _Client(await _relay(nursery))
            head = await client.open()
            assert f"{PIPELINE_HEADER.lower()}: 2" in head.lower(), head
            assert f"{DOWN_PIPELINE_HEADER.lower()}: 2" in head.lower(), head
            async with await client.connect() as second:
                await client.post(second, 1, one)  # (the one after the next, first)
                async with await client.connect() as broken:
                    await broken.send_all(_head("POST", client.session_id, 0, len(zero))
                                          + zero[:6])
                    await trio.testing.wait_all_tasks_blocked()
                # (its first six bytes were fed: they are not fed again)
                await trio.testing.wait_all_tasks_blocked()
                async with await client.connect() as retry:
                    await client.post(retry, 0, zero)
                    assert (await _answer(retry))[0].startswith("HTTP/1.1 200 ")
                assert (await _answer(second))[0].startswith("HTTP/1.1 200 ")
                await client.post(second, 1, one)  # (a retry whose answer was lost: dropped)
                assert (await _answer(second))[0].startswith("HTTP/1.1 200 ")
                await client.post(second, 2, _ping(b"two"))
                assert (await _answer(second))[0].startswith("HTTP/1.1 200 ")
            assert await client.pongs_until(b"two") == [b"zero", b"one", b"two"]
            nursery.cancel_scope.cancel()


async def test_a_post_further_ahead_than_two_in_flight_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            client = _Client(await _relay(nursery))
            await client.open()
            async with await client.connect() as stream:
                await client.post(stream, 2, _ping(b"two"))
                head, _ = await _answer(stream)
            assert head.startswith("HTTP/1.1 409 "), head
            nursery.cancel_scope.cancel()


async def test_one_post_at_a_time_is_served_as_before() -> None:
    """An agent without pipelining (older ones): each POST answered before the next,
    on one kept-alive connection; every body fed once, in order."""
    words = [b"w%d" % index for index in range(5)]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            client = _Client(await _relay(nursery))
            await client.open()
            async with await client.connect() as stream:
                for sequence, word in enumerate(words):
                    await client.post(stream, sequence, _ping(word))
                    assert (await _answer(stream))[0].startswith("HTTP/1.1 200 ")
            assert await client.pongs_until(words[-1]) == words
            nursery.cancel_scope.cancel()
