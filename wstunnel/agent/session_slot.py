"""Which session new local connections go to, and the ones draining beside it.

The agent has at most one current session; new channels open only on it.
When its relay sends GOAWAY it leaves the slot at once (a balancer may have
another relay ready) but keeps running among the draining sessions until its
channels are done, so the next session can start beside it. A connection
that arrives while the slot is empty, or while the current session's path is
broken and it resumes, waits here for a usable one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from ..net.transport import TunnelTransport

__all__ = ["SessionSlot"]


class SessionSlot:
    """The current session and the draining ones; see the module docstring."""

    def __init__(self) -> None:
        self.current: TunnelTransport | None = None
        self._draining: set[TunnelTransport] = set()
        self._filled = trio.Event()
        self._left = trio.Event()  # (set when the current session leaves the slot)

    def fill(self, transport: TunnelTransport) -> None:
        self.current = transport
        self._left = trio.Event()
        self._filled.set()

    def _leave(self) -> None:
        self.current = None
        self._filled = trio.Event()
        self._left.set()

    def vacate(self, transport: TunnelTransport) -> None:
        """``transport`` ended, or went away: no new channel goes to it."""
        if self.current is transport:
            self._leave()
        self._draining.discard(transport)

    def all(self) -> list[TunnelTransport]:
        """Every session still running: the draining ones, then the current one."""
        return [*self._draining, *([self.current] if self.current is not None else [])]

    def usable_now(self) -> TunnelTransport | None:
        """The current session if a channel can open on it without waiting, and its
        socket pump can take the connection (carrying.py ``carry_now``)."""
        session = self.current
        if (session is None or not session.pumping or not session.is_open
                or session.goaway_received or session.resuming):
            return None
        return session

    async def wait(self, timeout: float) -> TunnelTransport | None:
        """The current session, waiting up to ``timeout`` for a usable one."""
        with trio.move_on_after(timeout):
            while True:
                session = self.current
                if session is not None and session.resuming and not session.goaway_received:
                    await session.wait_carrier()  # (its path is broken: it resumes)
                    continue
                if session is not None and session.is_open and not session.goaway_received:
                    return session
                if session is not None:  # GOAWAY read (it may be resuming, to finish its
                    await self._left.wait()  # own channels), not yet vacated: wait for that
                await self._filled.wait()
                await trio.sleep(0)
        return None

    async def serve(self, transport: TunnelTransport,
                    run: Callable[[TunnelTransport], Awaitable[str]],
                    draining: trio.Nursery) -> str | None:
        """Make ``transport`` current and ``run`` it in ``draining``: why it ended, or
        None at its relay's GOAWAY, when it leaves the slot and drains on its own."""
        self.fill(transport)
        ended: list[str] = []
        done = trio.Event()

        async def run_to_end() -> None:
            try:
                ended.append(await run(transport))
            finally:
                done.set()

        draining.start_soon(run_to_end)
        async with trio.open_nursery() as first:
            first.start_soon(_cancel_after, done.wait, first.cancel_scope)
            first.start_soon(_cancel_after, transport.wait_goaway, first.cancel_scope)
        if ended:
            return ended[0]
        if self.current is transport:
            self._leave()
            self._draining.add(transport)
        return None


async def _cancel_after(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()
