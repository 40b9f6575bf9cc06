"""The agent's reading of the relay's answer to a resume (agent/resume.py)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from wstunnel import mux
from wstunnel.agent.resume import AgentResumer
from wstunnel.agent.transports import Opened
from wstunnel.net.resumption import NewCarrier
from wstunnel.net.transport import TunnelTransport
from wstunnel.protocol import TunnelProtocol
from wstunnel.replay import RESUMED_HEADER, Ticket


@pytest.mark.parametrize(("answer", "resumed"), [("17", True), ("\u00b2", False),
                                                 ("no; gone", False), ("", False)])
async def test_only_a_decimal_count_resumes(answer: str, resumed: bool) -> None:
    """A count is ASCII digits; anything else (even a character Python calls a digit,
    as latin-1's superscript two) is a refusal, never a crash of the agent."""
    stream, transport = _resumable()
    fresh: list[Opened] = []

    async def reconnect(headers: Any, how: Any) -> Opened:
        return Opened(stream, b"", "websocket", {RESUMED_HEADER.lower(): answer})

    async def take(opened: Opened) -> bool:
        fresh.append(opened)
        return True

    resumer = AgentResumer(Ticket("id", "secret", 5.0), reconnect, take)
    with trio.fail_after(5):
        carrier = await resumer.new_carrier(transport, "lost")
    assert isinstance(carrier, NewCarrier) == resumed
    assert len(fresh) == (0 if resumed else 1)


async def test_a_new_session_the_agent_declines_is_closed() -> None:
    """The relay gave a new session instead of the resume, and the agent does not want
    it (another session is up: the lost one was draining): its connection is closed
    at once, not left open (and unread) for the relay to time out."""
    stream, transport = _resumable()
    offered, relay_side = trio.testing.memory_stream_pair()

    async def reconnect(headers: Any, how: Any) -> Opened:
        return Opened(offered, b"", "websocket", {RESUMED_HEADER.lower(): "no; unknown"})

    async def decline(opened: Opened) -> bool:
        return False

    resumer = AgentResumer(Ticket("id", "secret", 5.0), reconnect, decline)
    with trio.fail_after(5):
        outcome = await resumer.new_carrier(transport, "lost")
        assert isinstance(outcome, str)
        assert await relay_side.receive_some() == b""  # (closed)


async def test_a_handshake_timeout_is_one_failed_attempt_not_the_end_of_grace(
        autojump_clock: trio.abc.Clock) -> None:
    """An HTTP transport's connect raises TooSlowError when the relay does not answer
    within handshake_timeout (a relay stopped for a moment, a slow proxy): the agent
    tries again until the relay's grace is over, as it does for WebSocket, instead of
    resetting every channel after one attempt (chaos hunt: polling, relay SIGSTOPped)."""
    stream, transport = _resumable()
    attempts: list[float] = []

    async def reconnect(headers: Any, how: Any) -> Opened:
        attempts.append(trio.current_time())
        if len(attempts) < 3:
            await trio.sleep(3.0)  # handshake_timeout
            raise trio.TooSlowError
        return Opened(stream, b"", "polling", {RESUMED_HEADER.lower(): "4"})

    resumer = AgentResumer(Ticket("id", "secret", 10.0), reconnect, _never_fresh)
    carrier = await resumer.new_carrier(transport, "lost")
    assert isinstance(carrier, NewCarrier), carrier
    assert len(attempts) == 3


async def test_the_grace_still_ends_the_attempts(autojump_clock: trio.abc.Clock) -> None:
    """A relay that never answers: the attempts stop once its grace is over."""
    stream, transport = _resumable()

    async def reconnect(headers: Any, how: Any) -> Opened:
        await trio.sleep(3.0)
        raise trio.TooSlowError

    resumer = AgentResumer(Ticket("id", "secret", 10.0), reconnect, _never_fresh)
    start = trio.current_time()
    outcome = await resumer.new_carrier(transport, "lost")
    assert isinstance(outcome, str) and "resume grace (10 s" in outcome
    assert 10.0 <= trio.current_time() - start < 10.5


async def _never_fresh(opened: Opened) -> bool:
    raise AssertionError("the relay resumed: no new session")


def _resumable() -> tuple[trio.abc.Stream, TunnelTransport]:
    """A resumable agent session's transport, and the stream under it."""
    protocol = TunnelProtocol(mux.Role.AGENT)
    protocol.enable_resume()
    stream, _ = trio.testing.memory_stream_pair()
    return stream, TunnelTransport(stream, protocol, name="test")
