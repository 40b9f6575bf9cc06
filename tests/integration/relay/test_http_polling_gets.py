"""Two polling GETs in flight on the relay (relay/http_sessions.py ``poll_batch``,
``poll_more``, ``poll_done``; docs/PROTOCOL.md §11.2).

The agent asks for batch N + 1 while N's answer is still coming down, so that the
bytes after N go at once. What it relies on: N + 1 takes no byte while N's answer
may still grow (the agent feeds N whole before N + 1: a byte in both, or taken out
of order, would garble the session), and either may be asked again after N + 1 was
answered (a broken answer), getting exactly what it held.
"""

from __future__ import annotations

import trio
import trio.testing

from wstunnel.relay.http_sessions import GETS_IN_FLIGHT, HttpSession

HOLD = 30.0  # (longer than the test: a request still held at the end failed it)


def _joined(batch: list[bytes | bytearray | memoryview] | None) -> bytes:
    assert batch is not None
    return b"".join(bytes(part) for part in batch)


async def _ask(session: HttpSession, sequence: int, answers: list[bytes]) -> None:
    """GET ``sequence``: its answer goes into ``answers``."""
    answers.append(_joined(await session.poll_batch(sequence, 1 << 20, HOLD)))

async def test_get_n_plus_1_takes_nothing_until_n_has_ended() -> None:
    """GET 1 waits while GET 0's answer grows (bytes that come meanwhile go into 0's
    answer), and takes the next bytes once 0's answer has ended."""
    session = HttpSession("id", "agent", "polling")
    answers: list[bytes] = []

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await session.send_all(b"first")
            batch = await session.poll_batch(0, 1 << 20, HOLD)
            assert batch is not None and _joined(batch) == b"first"
            nursery.start_soon(_ask, session, 1, answers)
            await session.send_all(b" more")
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []  # (0's answer may still take them)
            assert _joined(session.poll_more(batch, 1 << 20)) == b" more"
            await session.send_all(b"second")
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []
            session.poll_done(batch)  # (0's answer ended: what is left is 1's)
        assert answers == [b"second"]
        assert session.poll_more(batch, 1 << 20) == []


async def test_n_broken_while_n_plus_1_held_then_both_asked_again() -> None:
    """GET 0's answer breaks while GET 1 is held: 1 takes what follows, and 0's retry,
    coming after 1 was answered, gets 0's batch, not 1's; a retry of 1 gets 1's. GET 2
    then lets 0's batch go (the agent asks for 2 only once 0 is fed): memory for two."""
    session = HttpSession("id", "agent", "polling")
    with trio.fail_after(5):
        await session.send_all(b"first")
        zero = await session.poll_batch(0, 1 << 20, HOLD)
        assert zero is not None
        session.poll_done(zero)  # (its connection broke)
        await session.send_all(b"second")
        assert _joined(await session.poll_batch(1, 1 << 20, HOLD)) == b"second"
        assert _joined(await session.poll_batch(0, 1 << 20, HOLD)) == b"first"
        assert _joined(await session.poll_batch(1, 1 << 20, HOLD)) == b"second"
        await session.send_all(b"third")
        two = await session.poll_batch(2, 1 << 20, HOLD)
        assert _joined(two) == b"third"
        assert await session.poll_batch(0, 1 << 20, HOLD) is None
        assert await session.poll_batch(3 + GETS_IN_FLIGHT, 1 << 20, HOLD) is None  # (too far)


async def test_a_retry_of_n_ends_its_growing_answer_and_lets_n_plus_1_go() -> None:
    """GET 0's connection broke unnoticed while its answer grows: its retry gets what
    it holds, which then grows no more, and GET 1 takes the bytes after it."""
    session = HttpSession("id", "agent", "polling")
    answers: list[bytes] = []

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await session.send_all(b"first")
            zero = await session.poll_batch(0, 1 << 20, HOLD)
            assert zero is not None
            nursery.start_soon(_ask, session, 1, answers)
            await session.send_all(b"second")
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []  # (0's answer may still take them)
            assert _joined(await session.poll_batch(0, 1 << 20, HOLD)) == b"first"
        assert answers == [b"second"]
        assert session.poll_more(zero, 1 << 20) == []
