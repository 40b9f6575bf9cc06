"""Rate limits over real sockets (the relay's agents[].rate_limit, the agent's
forwards[].rate_limit): traffic under a limit arrives whole, and the counters count
the bytes and the time the limit held them back.

How close the rate stays to the limit is measured by benchmarks/rate_limit.py and
asserted on a fake clock in tests/unit/mux/test_pacing.py; nothing here times.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import trio

from wstunnel.agent import run_agent
from wstunnel.config import Forward, RateLimit
from wstunnel.relay import run_relay
from wstunnel.service.metrics import TunnelStats
from wstunnel.service.metrics_output import render_prometheus

from ..security_helpers import account
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    digest_handler,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
    upload_and_download,
)

MiB = 1024 * 1024


async def test_a_limited_agent_moves_its_data_whole_and_is_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways at once under {down: 1MiB, up: 1MiB}: every byte arrives intact, the
    per-agent counters hold what moved, and the limit reports time spent throttled
    (1.5 MiB each way is more than a 256 KiB burst can cover)."""
    stats = TunnelStats("relay")
    size = 3 * MiB // 2
    entry, token = account("a1", LOOPBACK)
    entry = dataclasses.replace(entry, rate_limit=RateLimit(down=MiB, up=MiB))
    monkeypatch.setenv("A1_TOKEN", token)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, digest_handler(size, b"down"))
            config = relay_config(no_auth=False, allow=(), agents=(entry,))
            bound = await nursery.start(partial(run_relay, config, shutdown=trio.Event(),
                                                stats=stats))
            agent = await start_agent(nursery, agent_config(bound[0][1], [target],
                                                            token_env="A1_TOKEN"))
            await upload_and_download(agent.ports[0], size, size)
            nursery.cancel_scope.cancel()
    moved = stats.agent_bytes()
    assert moved["a1", "down"] == size + 32  # (the target's reply ends with a hash)
    assert moved["a1", "up"] == size
    assert stats.agent_buckets["a1", "down"].throttled_time > 0
    assert stats.agent_buckets["a1", "up"].throttled_time > 0
    text = render_prometheus(stats)
    assert f'wstunnel_agent_bytes_total{{agent="a1",direction="down"}} {size + 32}' in text
    assert 'wstunnel_agent_rate_limit_bytes{agent="a1",direction="up"} 1048576' in text
    assert 'wstunnel_agent_throttled_seconds_total{agent="a1",direction="down"}' in text


async def test_a_limited_forward_of_the_agent_moves_its_data_whole_beside_a_free_one() -> None:
    """forwards[].rate_limit on the agent: the limited forward's transfer (both ways at
    once) and an unlimited forward's arrive intact; only the limited one is throttled."""
    stats = TunnelStats("agent")
    size = 3 * MiB // 2
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, digest_handler(size, b"down"))
            relay = await start_relay(nursery, relay_config())
            limited = dataclasses.replace(Forward(LOOPBACK, 0, LOOPBACK, target), name="slow",
                                          rate_limit=RateLimit(down=MiB, up=MiB))
            config = agent_config(relay.ports[0], [target], forwards=(
                limited, Forward(LOOPBACK, 0, LOOPBACK, target)))
            bound = await nursery.start(partial(run_agent, config, shutdown=trio.Event(),
                                                stats=stats))
            async with trio.open_nursery() as transfers:
                for ports in bound:
                    transfers.start_soon(upload_and_download, ports[0][1], size, size)
            nursery.cancel_scope.cancel()
    assert set(stats.forward_buckets) == {("slow", "up"), ("slow", "down")}
    assert stats.forward_buckets["slow", "up"].throttled_time > 0
    assert stats.forward_buckets["slow", "down"].throttled_time > 0
    text = render_prometheus(stats)
    assert 'wstunnel_forward_rate_limit_bytes{forward="slow",direction="down"} 1048576' in text
