"""The agent's reading of the relay's answer to a resume (agent/resume.py)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from wstunnel import mux
from wstunnel.agent.resume import AgentResumer
from wstunnel.agent.transports import Opened
from wstunnel.net.transport import NewCarrier, TunnelTransport
from wstunnel.protocol import TunnelProtocol
from wstunnel.replay import RESUMED_HEADER, Ticket


@pytest.mark.parametrize(("answer", "resumed"), [("17", True), ("\u00b2", False),
                                                 ("no; gone", False), ("", False)])
async def test_only_a_decimal_count_resumes(answer: str, resumed: bool) -> None:
    """A count is ASCII digits; anything else (even a character Python calls a digit,
    as latin-1's superscript two) is a refusal, never a crash of the agent."""
    protocol = TunnelProtocol(mux.Role.AGENT)
    protocol.enable_resume()
    stream, _ = trio.testing.memory_stream_pair()
    transport = TunnelTransport(stream, protocol, name="test")
    fresh: list[Opened] = []

    async def reconnect(headers: Any, how: Any) -> Opened:
        return Opened(stream, b"", "websocket", {RESUMED_HEADER.lower(): answer})

    resumer = AgentResumer(Ticket("id", "secret", 5.0), reconnect, fresh.append)
    with trio.fail_after(5):
        carrier = await resumer.new_carrier(transport, "lost")
    assert isinstance(carrier, NewCarrier) == resumed
    assert len(fresh) == (0 if resumed else 1)
