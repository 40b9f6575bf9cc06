"""The agent has a second polling POST in flight only when the relay announces it
(agent/http_polling.py ``_upstream``, agent/http_transport.py; docs/PROTOCOL.md §11.2).

With two in flight, the next POST starts once a body is written, not once its
answer is back: bytes the session writes meanwhile leave a round trip sooner.
A relay that does not announce it (an older one) answers a number past the
next with 409, which would end the session: the agent must then wait for each
answer. The relay here is a script that holds each POST's answer until the
test releases it, so what the agent sends, and when, is all that is tested.
"""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

from wstunnel.framing import PIPELINE_HEADER

from .scripted_polling import answer_opening, open_polling, read_request


class _ScriptedRelay:
    """Opens a session (announcing ``pipeline`` when given), holds every GET, and
    answers POST n once ``release(n)`` is called; ``posts`` logs (number, body)."""

    def __init__(self, pipeline: str | None) -> None:
        self.pipeline = pipeline
        self.posts: list[tuple[int, bytes]] = []
        self.arrived = trio.Event()
        self.break_once: set[int] = set()  # (POSTs whose first try's connection breaks)
        self._released: dict[int, trio.Event] = {}

    def release(self, sequence: int) -> None:
        self._released.setdefault(sequence, trio.Event()).set()

    async def handler(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            data = bytearray()
            while (request := await read_request(stream, data)) is not None:
                await self._answer(stream, *request)

    async def _answer(self, stream: trio.SocketStream, head: bytes,
                      fields: dict[bytes, bytes], body: bytes) -> None:
        if b"X-Wstunnel-Session" not in fields:  # the opening
            await answer_opening(stream, PIPELINE_HEADER, self.pipeline)
            await stream.aclose()
            return
        if head.startswith(b"GET "):
            await trio.sleep_forever()
        sequence = int(fields[b"X-Wstunnel-Seq"])
        self.posts.append((sequence, body))
        self.arrived.set()
        self.arrived = trio.Event()
        if sequence in self.break_once:
            self.break_once.discard(sequence)
            await stream.aclose()
            return
        await self._released.setdefault(sequence, trio.Event()).wait()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


async def _posts_after(relay: _ScriptedRelay, count: int) -> list[tuple[int, bytes]]:
    while len(relay.posts) < count:
        await relay.arrived.wait()
    return relay.posts


@pytest.mark.parametrize(("announced", "in_flight"), [(None, 1), ("2", 2), ("9", 2),
                                                      ("two", 1)])
async def test_a_second_post_goes_only_when_the_relay_takes_it(announced: str | None,
                                                               in_flight: int) -> None:
    """POST 0 unanswered, the session writes more: a relay announcing two (or more:
    the agent keeps to two) gets POST 1 at once; one announcing nothing (or garbage)
    gets it only after POST 0's answer."""
    relay = _ScriptedRelay(announced)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            stream = await open_polling(nursery, relay.handler)
            await stream.send_all(b"first")
            assert await _posts_after(relay, 1) == [(0, b"first")]
            await stream.send_all(b"second")
            if in_flight == 2:
                assert await _posts_after(relay, 2) == [(0, b"first"), (1, b"second")]
                await stream.send_all(b"third")
                await trio.testing.wait_all_tasks_blocked()
                assert len(relay.posts) == 2  # (not a third before POST 0's answer)
            else:
                await trio.testing.wait_all_tasks_blocked()
                assert relay.posts == [(0, b"first")]
                await stream.send_all(b"third")
            relay.release(0)
            relay.release(1)
            posts = await _posts_after(relay, 3 if in_flight == 2 else 2)
            assert b"".join(body for _, body in posts) == b"firstsecondthird"
            assert [number for number, _ in posts] == list(range(len(posts)))
            nursery.cancel_scope.cancel()


async def test_a_broken_first_post_is_sent_again_while_the_second_waits() -> None:
    """POST 0's connection breaks while POST 1 is out: POST 0 goes again, the same body
    under the same number, and the session goes on with POST 2 once both are answered."""
    relay = _ScriptedRelay("2")
    relay.break_once.add(0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            stream = await open_polling(nursery, relay.handler)
            await stream.send_all(b"first")
            await _posts_after(relay, 1)
            await stream.send_all(b"second")
            posts = await _posts_after(relay, 3)
            assert sorted(posts) == [(0, b"first"), (0, b"first"), (1, b"second")]
            relay.release(0)
            relay.release(1)
            await stream.send_all(b"third")
            assert (await _posts_after(relay, 4))[3] == (2, b"third")
            nursery.cancel_scope.cancel()
