"""Relay reloads change who may log in and what each agent may open, for new channels."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import trio

from wstunnel.relay import run_relay
from wstunnel.service.reload import ReloadRequest

from ..security_helpers import account, watch_logs
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_handler,
    expect_reset,
    relay_config,
    serve_target,
    start_agent,
)


async def _echo(port: int, payload: bytes) -> bytes:
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(payload)
        got = b""
        while len(got) < len(payload):
            data = await stream.receive_some()
            if not data:
                break
            got += data
        return got


async def test_reload_adds_an_agent_and_retires_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent added by a reload logs in; a removed agent's live session opens nothing new."""
    old_entry, old_token = account("old", LOOPBACK)
    new_entry, new_token = account("new", LOOPBACK)
    monkeypatch.setenv("OLD_TOKEN", old_token)
    monkeypatch.setenv("NEW_TOKEN", new_token)
    config = relay_config(no_auth=False, allow=(), agents=(old_entry,))
    with watch_logs() as logs, trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            send, receive = trio.open_memory_channel[ReloadRequest](0)
            bound = await nursery.start(
                partial(run_relay, config, shutdown=trio.Event(), reloads=receive)
            )
            port = bound[0][1]
            old = await start_agent(nursery, agent_config(port, [target], token_env="OLD_TOKEN"))
            assert await _echo(old.ports[0], b"old agent") == b"old agent"

            request = ReloadRequest(replace(config, agents=(new_entry,)))
            await send.send(request)
            await request.done.wait()
            assert request.error is None

            new = await start_agent(nursery, agent_config(port, [target], token_env="NEW_TOKEN"))
            assert await _echo(new.ports[0], b"new agent") == b"new agent"
            async with await trio.open_tcp_stream(LOOPBACK, old.ports[0]) as stream:
                await expect_reset(stream, b"old agent again")
            assert logs.matching("agent old is no longer configured")
            nursery.cancel_scope.cancel()
