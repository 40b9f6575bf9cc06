"""The agent's own channel cap: past it, only the extra connection is refused."""

from __future__ import annotations

import pytest
import trio

from wstunnel.agent import agent as agent_module

from ..security_helpers import watch_logs
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_exact,
    echo_handler,
    receive_until_reset,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
)


def test_agent_allows_as_many_channels_as_a_relay_may() -> None:
    """The agent's session cap is not below the largest relay max_channels (65536):
    a relay configured for 10,000 channels must not be held to the sans-IO default 1024."""
    assert agent_module.MAX_CHANNELS >= 65536


async def test_connection_past_the_agent_cap_is_closed_and_the_agent_keeps_running(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A local connection the agent's session cannot carry is closed with a warning;
    the agent does not exit and the channels already open keep echoing."""
    monkeypatch.setattr(agent_module, "MAX_CHANNELS", 2)
    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            agent = await start_agent(nursery, agent_config(relay.ports[0], [target]))
            port = agent.ports[0]
            first = await trio.open_tcp_stream(LOOPBACK, port)
            second = await trio.open_tcp_stream(LOOPBACK, port)
            assert await echo_exact(first, b"one") == b"one"
            assert await echo_exact(second, b"two") == b"two"
            async with await trio.open_tcp_stream(LOOPBACK, port) as third:
                try:  # reset, not closed as if the destination had finished
                    await third.send_all(b"three")
                    assert await receive_until_reset(third) == b""
                except trio.BrokenResourceError as exc:
                    assert isinstance(exc.__cause__, ConnectionResetError)
            await logs.wait_for("wstunnel.agent", "cannot open a channel", "too many channels")
            assert await echo_exact(first, b"still one") == b"still one"
            await second.aclose()
            await first.aclose()
            nursery.cancel_scope.cancel()
