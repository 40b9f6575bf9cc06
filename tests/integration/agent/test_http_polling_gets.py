"""The agent has a second polling GET in flight only when the relay announces it
(agent/http_polling.py ``_downstream``, agent/http_transport.py; docs/PROTOCOL.md §11.2).

With two in flight, GET N + 1 waits at the relay while N's answer comes down, so
the bytes after N go at once. A relay that does not announce it (an older one)
answers a number past the next with 409, which would end the session. What the
session relies on: answers are fed in order, each byte once, also when N + 1's
answer comes first and N's breaks half way and is asked again. The relay here is
a script that answers each GET when the test releases it.
"""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

from wstunnel.framing import DOWN_PIPELINE_HEADER

from .scripted_polling import answer_opening, open_polling, read_request


class _ScriptedRelay:
    """Opens a session (announcing ``pipeline`` GETs when given), holds every POST,
    and answers GET n once released, with its next scripted answer: (body, bytes
    sent before the connection is cut, or None: all); ``gets`` logs the numbers."""

    def __init__(self, pipeline: str | None) -> None:
        self.pipeline = pipeline
        self.gets: list[int] = []
        self.answers: dict[int, list[tuple[bytes, int | None]]] = {}
        self.changed = trio.Event()
        self._released: dict[int, trio.Event] = {}

    def release(self, sequence: int) -> None:
        self._released.setdefault(sequence, trio.Event()).set()

    async def gets_after(self, count: int) -> list[int]:
        while len(self.gets) < count:
            await self.changed.wait()
        return self.gets

    async def handler(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            data = bytearray()
            while (request := await read_request(stream, data)) is not None:
                head, fields, _ = request
                if b"X-Wstunnel-Session" not in fields:  # the opening
                    await answer_opening(stream, DOWN_PIPELINE_HEADER, self.pipeline)
                    return
                if not head.startswith(b"GET "):
                    await trio.sleep_forever()
                if not await self._answer(stream, int(fields[b"X-Wstunnel-Seq"])):
                    return

    async def _answer(self, stream: trio.SocketStream, sequence: int) -> bool:
        """GET ``sequence``'s answer, once released; False: its connection was cut."""
        self.gets.append(sequence)
        self.changed.set()
        self.changed = trio.Event()
        await self._released.setdefault(sequence, trio.Event()).wait()
        script = self.answers.get(sequence)
        if not script:
            await trio.sleep_forever()
        body, cut = script.pop(0)
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        if cut is None:
            await stream.send_all(answer)
            return True
        await stream.send_all(answer[:len(answer) - len(body) + cut])
        await stream.aclose()
        return False


@pytest.mark.parametrize(("announced", "in_flight"), [(None, 1), ("2", 2), ("9", 2),
                                                      ("two", 1)])
async def test_a_second_get_goes_only_when_the_relay_takes_it(announced: str | None,
                                                              in_flight: int) -> None:
    """A relay announcing two GETs (or more: the agent keeps to two) has GETs 0 and 1
    held at once; one announcing nothing (or garbage) only GET 0."""
    relay = _ScriptedRelay(announced)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await open_polling(nursery, relay.handler)
            assert sorted(await relay.gets_after(in_flight)) == list(range(in_flight))
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(relay.gets) == list(range(in_flight))  # (each on its connection)
            nursery.cancel_scope.cancel()


async def test_answers_are_fed_in_order_when_n_breaks_after_n_plus_1_came() -> None:
    """GET 1's answer comes first: it waits, unread. GET 0's answer breaks half way; 0
    is asked again and its retry answered in full: the session gets 0's bytes, once,
    then 1's; GET 2 goes once 0 is fed, GET 3 once 1 is."""
    relay = _ScriptedRelay("2")
    relay.answers = {0: [(b"AAAAAA", 3), (b"AAAAAA", None)], 1: [(b"BBBB", None)]}
    received = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            stream = await open_polling(nursery, relay.handler)

            async def receive() -> None:
                while data := await stream.receive_some():
                    received.extend(data)

            nursery.start_soon(receive)
            await relay.gets_after(2)
            relay.release(1)
            await trio.testing.wait_all_tasks_blocked()
            assert received == b""  # (1's bytes wait for 0's)
            relay.release(0)
            assert sorted(await relay.gets_after(5)) == [0, 0, 1, 2, 3]
            await trio.testing.wait_all_tasks_blocked()
            assert received == b"AAAAAABBBB"
            nursery.cancel_scope.cancel()
