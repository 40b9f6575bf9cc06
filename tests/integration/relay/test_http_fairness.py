"""An interactive record beside bulk data over the HTTP transports (relay/http_sessions.py,
relay/http_front.py, net/byte_pipe.py, net/pipe_sizing.py).

Bytes the session's writer hands to the HTTP pipe have left the multiplexer's
fair order: a record written after them waits until all of them have crossed
the link. With a fixed 4 MiB pipe and answers taken whole, that was seconds on
a slow link (docs/PERFORMANCE.md). What users rely on, checked in bytes, not
time: on a link measured slow the record has at most a bound's worth of bulk
bytes ahead of it, and it leaves in the answer being written; a bulk download
still gets answers as large as before; a retry of a growing answer gets exactly
what the agent may have been given, no byte lost or repeated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from wstunnel.net.byte_pipe import Buffer
from wstunnel.net.pipe_sizing import MIN_PIPE_SIZE
from wstunnel.relay.http_front import MAX_BATCH_SIZE
from wstunnel.relay.http_sessions import HttpSession

HOLD = 30.0
CHUNK = 64 * 1024
KEY = b"keystroke"
SLOW_LINK = (256 * 1024, 0.5)  # (a 256 KiB body write that took 0.5 s: 512 KB/s)


def _joined(parts: list[Buffer]) -> bytes:
    return b"".join(bytes(part) for part in parts)


async def _bulk(session: HttpSession) -> None:
    """The session's writer with a bulk channel: writes whenever the pipe takes more."""
    while True:
        await session.send_parts([b"B" * CHUNK])


@asynccontextmanager
async def _bulk_on_a_slow_link() -> AsyncIterator[tuple[HttpSession, trio.Nursery]]:
    """A polling session whose link was measured slow, its pipe filled by _bulk."""
    session = HttpSession("id", "agent", "polling")
    session.written(*SLOW_LINK)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_bulk, session)
        await trio.testing.wait_all_tasks_blocked()
        yield session, nursery
        nursery.cancel_scope.cancel()


async def _first_answer(session: HttpSession) -> list[Buffer]:
    batch = await session.poll_batch(0, session.outbound_limit, HOLD)
    assert batch is not None
    return batch


async def test_a_record_has_a_bounded_number_of_bytes_ahead_on_a_slow_link() -> None:
    async with _bulk_on_a_slow_link() as (session, nursery):
        assert session.outbound_limit == MIN_PIPE_SIZE
        ahead = session._outbound_size  # (what a record written now waits behind)
        nursery.start_soon(session.send_parts, [KEY])
        await trio.testing.wait_all_tasks_blocked()
        batch = await _first_answer(session)
        body = bytearray(_joined(batch))
        for _ in range(MAX_BATCH_SIZE // CHUNK):  # (the answer grows as the link drains)
            if KEY in body:
                break
            await trio.testing.wait_all_tasks_blocked()
            body += _joined(session.poll_more(batch, session.outbound_limit))
    assert ahead <= MIN_PIPE_SIZE + CHUNK
    assert body.index(KEY) <= MIN_PIPE_SIZE + CHUNK  # (one answer, not after 4 MiB)


async def test_a_bulk_download_still_gets_answers_as_large_as_before() -> None:
    async with _bulk_on_a_slow_link() as (session, _):
        batch = await _first_answer(session)
        size = sum(map(len, batch))
        for _ in range(MAX_BATCH_SIZE // MIN_PIPE_SIZE + 1):  # (each write drained, more)
            await trio.testing.wait_all_tasks_blocked()
            size += sum(map(len, session.poll_more(
                batch, min(session.outbound_limit, MAX_BATCH_SIZE - size))))
    assert size == MAX_BATCH_SIZE  # (and not past it: old agents read at most that)


async def test_a_retry_of_a_growing_answer_gets_what_it_held_and_it_stops_growing() -> None:
    async with _bulk_on_a_slow_link() as (session, _):
        batch = await _first_answer(session)
        await trio.testing.wait_all_tasks_blocked()
        session.poll_more(batch, session.outbound_limit)
        given = _joined(batch)  # (what the first answer may have written)
        again = await session.poll_batch(0, session.outbound_limit, HOLD)
        assert again is not None and _joined(again) == given
        await trio.testing.wait_all_tasks_blocked()
        assert session.poll_more(batch, session.outbound_limit) == []  # (frozen)
        following = await session.poll_batch(1, session.outbound_limit, HOLD)
        assert following  # (the bytes not given go under the next number)
    assert _joined(batch) == given
