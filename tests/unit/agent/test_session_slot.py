"""SessionSlot: where a new local connection (or one opened again) waits for a session."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import trio
import trio.testing

from wstunnel.agent.session_slot import SessionSlot
from wstunnel.net.transport import TunnelTransport


class _Session:
    """What the slot reads of a session."""

    def __init__(self, *, goaway_received: bool = False, resuming: bool = False) -> None:
        self.goaway_received = goaway_received
        self.resuming = resuming
        self.is_open = True
        self.pumping = True
        self.carrier = trio.Event()

    async def wait_carrier(self) -> None:
        await self.carrier.wait()


async def _wait_through(slot: SessionSlot, change: Callable[[], None]) -> object:
    """What ``slot.wait`` returns when ``change`` happens while it waits."""
    got: list[object] = []

    async def waiter() -> None:
        got.append(await slot.wait(timeout=30))

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # (still waiting)
            change()
    return got[0]


async def test_a_wait_does_not_follow_a_going_away_session_into_its_resume() -> None:
    """The relay sent GOAWAY and then the path broke: that session resumes (its own
    channels finish on it) but takes no new channel, and its resume may last the
    whole grace. A connection waiting for a session gets the next one at once."""
    slot = SessionSlot()
    old, new = _Session(goaway_received=True, resuming=True), _Session()
    slot.fill(cast(TunnelTransport, old))

    def next_session() -> None:
        slot.vacate(cast(TunnelTransport, old))
        slot.fill(cast(TunnelTransport, new))

    assert await _wait_through(slot, next_session) is new


async def test_a_wait_follows_a_resume_of_the_current_session() -> None:
    """The current session's path broke (no GOAWAY): a waiting connection gets that
    same session once it has resumed."""
    slot = SessionSlot()
    current = _Session(resuming=True)
    slot.fill(cast(TunnelTransport, current))

    def resumed() -> None:
        current.resuming = False
        current.carrier.set()

    assert await _wait_through(slot, resumed) is current
