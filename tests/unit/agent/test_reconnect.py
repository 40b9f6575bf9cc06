"""When the agent's next session starts: reconnect.py's backoff, on trio's mock clock."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from wstunnel.agent.reconnect import Reconnect
from wstunnel.config import AgentConfig, Forward

CONFIG = AgentConfig(relay="ws://relay.example:8080/tunnel",
                     forwards=(Forward("127.0.0.1", 0, "db", 5432),),
                     reconnect_min_interval=1.0, reconnect_max_interval=30.0)


def _run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test, clock=trio.testing.MockClock())


def test_a_rolling_restart_moves_each_session_on_at_once() -> None:
    """Relays behind a balancer restarted a few seconds apart: each session's relay
    goes away (GOAWAY) after 5 s, and each next session starts at once. (The wait
    used to grow with each one, 1, 2, 4, 8, 16 s, past connect_wait_timeout.)"""
    async def test() -> None:
        reconnect = Reconnect(lambda: CONFIG)
        relay = CONFIG.relay_url
        for _ in range(6):
            assert await reconnect.choose() == relay
            reconnect.connected(relay)
            assert reconnect.session_ended(relay, 5.0, goaway=True) == 0.0
            assert reconnect.next_relay() == (relay, trio.current_time())
    _run(test)


def test_sessions_that_end_at_once_back_off_even_at_a_goaway() -> None:
    """A relay (or a middlebox) that ends every session at once, with a GOAWAY or
    without, is not asked again every second: the wait keeps growing."""
    async def test() -> None:
        reconnect = Reconnect(lambda: CONFIG)
        relay = CONFIG.relay_url
        delays = [reconnect.session_ended(relay, 0.1, goaway=index % 2 == 0)
                  for index in range(5)]
        assert all(later > earlier for earlier, later in itertools.pairwise(delays))
        assert delays[-1] >= 0.8 * 16
    _run(test)


def test_a_session_lost_soon_after_it_started_backs_off() -> None:
    """A lost session (no GOAWAY) that lasted less than reconnect_max_interval counts
    as a failure, however long it lasted beyond a second."""
    async def test() -> None:
        reconnect = Reconnect(lambda: CONFIG)
        relay = CONFIG.relay_url
        first = reconnect.session_ended(relay, 5.0)
        second = reconnect.session_ended(relay, 5.0)
        assert 0.8 <= first <= 1.0 and second > first
    _run(test)
