"""A session with default settings carries more channels than the old 1,024 limit."""

from __future__ import annotations

import resource

import pytest
import trio

from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_handler,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
)

CHANNELS = 1500
BATCH = 100  # connections opened before they echo (the listen backlog stays short)


def _enough_files(needed: int) -> None:
    """Four descriptors per channel in this one process: client, agent, relay, target."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed and (hard == resource.RLIM_INFINITY or hard >= needed):
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    elif soft < needed:
        pytest.skip(f"needs {needed} open files; the hard limit is {hard}")


async def _echo_batch(port: int, streams: list[trio.SocketStream]) -> None:
    batch = [await trio.open_tcp_stream(LOOPBACK, port) for _ in range(BATCH)]
    for stream in batch:
        await stream.send_all(b"x")
    for stream in batch:
        assert await stream.receive_some(1) == b"x"
    streams.extend(batch)


async def test_a_default_session_carries_1500_channels_at_once() -> None:
    """With the relay's and agent's default settings, 1,500 connections through one -L
    forward are open at the same time and every one echoes (the old defaults, max_channels
    1024 and max_buffered_size = 1024 x 256 KiB, reset the 1,025th)."""
    _enough_files(4 * CHANNELS + 200)
    streams: list[trio.SocketStream] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            agent = await start_agent(nursery, agent_config(relay.ports[0], [target]))
            try:
                for _ in range(CHANNELS // BATCH):
                    await _echo_batch(agent.ports[0], streams)
                for stream in streams[::50]:  # the first ones are still carried
                    await stream.send_all(b"y")
                    assert await stream.receive_some(1) == b"y"
            finally:
                for stream in streams:
                    await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()
