"""``--stdio`` retries an unreachable relay on the agent's shared backoff (agent/reconnect.py).

ssh users start many ``--stdio`` agents at once (a fleet of ProxyCommands after
a relay restart): each must wait the jittered ``Reconnect.backoff`` the daemon
agent uses, not a fixed schedule of its own that makes them all retry in step.
The relay is faked (every connect refused) and trio's autojump clock makes the
waits instant.
"""

from __future__ import annotations

import errno
import random
from itertools import pairwise

import pytest
import trio
import trio.testing

from wstunnel.addresses import HostPort
from wstunnel.agent.agent import Agent
from wstunnel.agent.stdio import StdioFailed, run_stdio
from wstunnel.config import AgentConfig
from wstunnel.net.transport import TunnelTransport


async def test_stdio_retries_on_the_shared_jittered_backoff(
        monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock) -> None:
    """Each wait is Reconnect.backoff (doubling from reconnect_min_interval up to
    reconnect_max_interval, times its jitter: pinned here to its low end, 0.8), until
    connect_wait_timeout; then one StdioFailed that counts the attempts."""
    attempts: list[float] = []

    async def refused(self: Agent) -> TunnelTransport:
        attempts.append(trio.current_time())
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(Agent, "connect_once", refused)
    monkeypatch.setattr(random, "uniform", lambda low, high: low)  # (reconnect.py's jitter)
    config = AgentConfig(relay="ws://127.0.0.1:9/tunnel", proxy="none",
                         reconnect_min_interval=1.0, reconnect_max_interval=8.0,
                         connect_wait_timeout=20.0)
    stream, _ = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with pytest.raises(StdioFailed) as failed:
        await run_stdio(config, HostPort("127.0.0.1", 22), stream)
    gaps = [round(later - earlier, 6) for earlier, later in pairwise(attempts)]
    assert gaps[:5] == [0.8, 1.6, 3.2, 6.4, 6.4]
    assert round(attempts[-1] - start, 6) == 20.0  # (the last wait cut to the deadline)
    assert f"gave up after {len(attempts)} attempts" in str(failed.value)
