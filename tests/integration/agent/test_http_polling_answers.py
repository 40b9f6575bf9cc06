"""The agent reads a polling answer as it arrives (agent/http_polling.py, ``_feed_answer``).

A relay writes a batch's body while the link takes it, adding frames as it
drains (docs/PROTOCOL.md §11.2): a record in the middle of a 4 MiB answer must
reach the session then, not once the whole answer has crossed a slow link.
And when the answer's connection breaks half way, the retry brings the same
batch again: the bytes already given to the session must not be given twice.
The relay here is a script of raw answers, so what the agent does is all
that is tested.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from wstunnel.agent.http_client import HttpRoute
from wstunnel.agent.http_polling import PollingStream
from wstunnel.config.textforms import RelayURL

LOOPBACK = "127.0.0.1"
HOLD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

Answer = Callable[[trio.SocketStream, int], Awaitable[None]]


async def _read_head(stream: trio.SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(4096)
        if not data:
            return b""
        head += data
    return head


async def _scripted_relay(nursery: trio.Nursery, answer: Answer, seen: list[bytes]) -> int:
    """A listener answering each GET (its X-Wstunnel-Seq and which connection it came
    on logged in ``seen``) with ``answer(stream, index)``."""
    async def handler(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.ClosedResourceError):  # (an answer that closed it)
            while head := await _read_head(stream):
                seq = next(line for line in head.split(b"\r\n")
                           if line.lower().startswith(b"x-wstunnel-seq"))
                seen.append(seq.split(b":")[1].strip())
                await answer(stream, len(seen) - 1)
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=LOOPBACK))
    return int(listeners[0].socket.getsockname()[1])


def _route(port: int) -> HttpRoute:
    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream(LOOPBACK, port)
    return HttpRoute(RelayURL(False, LOOPBACK, port, "/tunnel"), connect, "/tunnel",
                     (("Host", f"{LOOPBACK}:{port}"),))


async def _received(stream: PollingStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += await stream.receive_some()
    return data


async def test_the_start_of_an_answer_reaches_the_session_before_its_end() -> None:
    async def answer(stream: trio.SocketStream, index: int) -> None:
        await stream.send_all(HOLD + b"9\r\nkeystroke\r\n")  # (more would come: it does not end)
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await _scripted_relay(nursery, answer, [])
            stream = PollingStream(_route(port), "id")
            nursery.start_soon(stream.run_background)
            assert await _received(stream, 9) == b"keystroke"
            nursery.cancel_scope.cancel()


async def test_a_retried_answer_gives_each_byte_once() -> None:
    next_asked = trio.Event()

    async def answer(stream: trio.SocketStream, index: int) -> None:
        if index == 0:  # the first try breaks half way through the batch
            await stream.send_all(HOLD + b"3\r\nabc\r\n")
            await stream.aclose()
        elif index == 1:  # the retry: the same batch, whole
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabcdef")
        else:
            next_asked.set()
            await trio.sleep_forever()

    seen: list[bytes] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await _scripted_relay(nursery, answer, seen)
            stream = PollingStream(_route(port), "id")
            nursery.start_soon(stream.run_background)
            assert await _received(stream, 6) == b"abcdef"
            await next_asked.wait()
            nursery.cancel_scope.cancel()
    assert seen == [b"0", b"0", b"1"]  # (the same number again, then the next)
