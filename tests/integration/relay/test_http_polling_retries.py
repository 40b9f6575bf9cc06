"""HTTP polling's numbered requests on the relay (relay/http_sessions.py), when a
retry comes while the request it repeats is still being served.

A polling request whose connection breaks is sent again with the same number
(docs/PROTOCOL.md §11.2). The relay does not notice the broken connection of a
request that is waiting (a GET held for bytes, a POST waiting for room), so the
original and its retry are served at the same time. Whatever the order, every
byte must go down once under the number the agent asked for, and every body
must go up once, in order: a lost batch would silently take records out of the
session (a WINDOW among them stalls a channel for good).
"""

from __future__ import annotations

import trio
import trio.testing

from wstunnel.relay.http_sessions import HttpSession

HOLD = 30.0  # (longer than the test: a request still held at the end failed it)


def _polling() -> HttpSession:
    return HttpSession("id", "agent", "polling")


def _joined(batch: list[bytes | bytearray | memoryview] | None) -> bytes:
    assert batch is not None
    return b"".join(bytes(part) for part in batch)


async def test_a_get_and_its_retry_both_held_get_the_same_batch() -> None:
    """GET n held twice (the first one's connection broke unnoticed): bytes that come
    go to both answers, as batch n, and the next number gets what follows."""
    session = _polling()
    answers: list[bytes] = []

    async def get(sequence: int) -> None:
        answers.append(_joined(await session.poll_batch(sequence, 1 << 20, HOLD)))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, 0)  # (the original)
            nursery.start_soon(get, 0)  # (its retry)
            await trio.testing.wait_all_tasks_blocked()
            await session.send_all(b"window record")
        assert answers == [b"window record", b"window record"]
        await session.send_all(b"next")
        assert _joined(await session.poll_batch(1, 1 << 20, HOLD)) == b"next"


async def test_a_retried_get_answered_meanwhile_gets_the_last_batch_again() -> None:
    """The original was answered (its answer lost) before the retry came: the retry
    gets that batch again at once, not the bytes after it."""
    session = _polling()
    await session.send_all(b"first")
    assert _joined(await session.poll_batch(0, 1 << 20, HOLD)) == b"first"
    await session.send_all(b"second")
    with trio.fail_after(5):
        assert _joined(await session.poll_batch(0, 1 << 20, HOLD)) == b"first"
        assert _joined(await session.poll_batch(1, 1 << 20, HOLD)) == b"second"
        assert await session.poll_batch(5, 1 << 20, HOLD) is None


async def _feed_whole(session: HttpSession, sequence: int, body: bytes) -> bool | None:
    """A polling POST's whole body, as relay/http_front.py ``_poll_up`` feeds it."""
    fed = await session.poll_feed_part(sequence, 0, body)
    if fed:
        await session.poll_fed(sequence)
    return fed

async def test_a_post_and_its_retry_waiting_for_room_are_fed_once_in_order() -> None:
    """POST n waits for room (the session reads slower than the agent sends) and its
    retry comes: the body is fed once, and body n + 1 after it."""
    session = _polling()
    session.max_buffered_size = 4
    assert await _feed_whole(session, 0, b"full") is True
    received = bytearray()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed_whole, session, 1, b"body")  # (the original)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(_feed_whole, session, 1, b"body")  # (its retry)
            await trio.testing.wait_all_tasks_blocked()
            while len(received) < 8:
                received += await session.receive_some()
        assert await _feed_whole(session, 2, b"more") is True
        received += await session.receive_some()
        assert bytes(received) == b"fullbodymore"
        assert await _feed_whole(session, 4, b"gap") is None
