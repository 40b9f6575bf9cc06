"""One connection's unexpected error ends that connection, not the relay.

What operators rely on: a bug met while serving one client (a request nobody
foresaw) is logged with its traceback and closes that connection; the relay goes
on serving every other agent, as the socket pump does per channel.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from wstunnel.relay.relay import Relay

from ..log_watch import LogWatch
from ..test_http_transports import echo_round_trips
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_handler,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
)


async def test_a_bug_in_one_connection_closes_it_and_the_relay_serves_on(
        monkeypatch: pytest.MonkeyPatch, logs: LogWatch) -> None:
    original = Relay._handshake
    calls = 0

    async def first_one_fails(self: Relay, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a request nobody foresaw")
        return await original(self, *args)

    monkeypatch.setattr(Relay, "_handshake", first_one_fails)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            async with await trio.open_tcp_stream(LOOPBACK, relay.ports[0]) as first:
                await first.send_all(b"GET /tunnel HTTP/1.1\r\nHost: x\r\n\r\n")
                assert await first.receive_some(100) == b""  # (closed, nothing sent)
            line = await logs.wait_for("unexpected error serving this connection")
            assert "the relay serves on" in line
            agent = await start_agent(nursery, agent_config(relay.ports[0], [target]))
            await echo_round_trips(agent.ports[0], 3)
            nursery.cancel_scope.cancel()
