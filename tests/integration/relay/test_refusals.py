"""Every refused channel is counted in the metrics and logged, in a bounded number of lines."""

from __future__ import annotations

import re
from functools import partial

import trio

from wstunnel import mux
from wstunnel.agent.connect import open_websocket
from wstunnel.config import parse_relay_url
from wstunnel.protocol import TunnelProtocol
from wstunnel.relay import run_relay
from wstunnel.service.metrics import TunnelStats
from wstunnel.service.metrics_output import render_prometheus

from ..security_helpers import watch_logs
from ..tunnel_helpers import LOOPBACK, relay_config, serve_target

MAX_CHANNELS = 8
BATCHES, BATCH = 6, 500  # 3,000 OPENs


async def _hold(stream: trio.SocketStream) -> None:
    """A destination that keeps every connection open until the other side closes."""
    async with stream:
        while await stream.receive_some():
            pass


async def _open_many(stream: trio.abc.Stream, agent: TunnelProtocol, target: int) -> int:
    """Open BATCHES x BATCH channels, a batch at a time; return how many were refused."""
    refused = answered = 0
    for batch in range(1, BATCHES + 1):
        for _ in range(BATCH):
            agent.open_channel(LOOPBACK, target)
        await stream.send_all(agent.data_to_send())
        while answered < batch * BATCH:
            data = await stream.receive_some()
            assert data, "the relay closed the session"
            agent.receive_data(data)
            for event in agent.events_received():
                if isinstance(event, mux.ChannelOpenFailed):
                    assert event.reason == mux.OpenFailure.LIMIT_REACHED
                    refused += 1
                answered += isinstance(event, mux.ChannelOpenFailed | mux.ChannelOpened)
            if out := agent.data_to_send():
                await stream.send_all(out)
    return refused


def _refusals_in(lines: list[str]) -> int:
    """Refusals the relay's log lines account for: 1 per full line, N per count line."""
    total = 0
    for line in lines:
        if "refused channel to" in line:
            total += 1
        elif match := re.search(r"refused ([\d,]+) channels? of", line):
            total += int(match.group(1).replace(",", ""))
    return total


async def test_a_flood_past_max_channels_is_counted_and_logged_in_few_lines() -> None:
    """3,000 OPENs against max_channels 8: every refusal, whether the relay or its
    multiplexer made it, is in wstunnel_channel_open_failures_total{reason=
    "limit_reached"}, and the relay's log accounts for each of them in a few lines."""
    stats = TunnelStats("relay")
    with watch_logs() as logs, trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, _hold)
            config = relay_config(max_channels=MAX_CHANNELS)
            bound = await nursery.start(partial(run_relay, config, shutdown=trio.Event(),
                                                stats=stats))
            url = parse_relay_url(f"ws://{LOOPBACK}:{bound[0][1]}/tunnel")
            stream, trailing = await open_websocket(url)
            agent = TunnelProtocol(mux.Role.AGENT, trailing_data=trailing)
            started = trio.current_time()
            refused = await _open_many(stream, agent, target)
            elapsed = trio.current_time() - started
            assert refused == BATCHES * BATCH - MAX_CHANNELS
            live = render_prometheus(stats)
            await stream.aclose()
            await logs.wait_for("wstunnel.relay", "session down")
            nursery.cancel_scope.cancel()
    series = 'wstunnel_channel_open_failures_total{reason="limit_reached"}'
    assert f"{series} {refused}\n" in live  # counted while the session is up
    assert f"{series} {refused}\n" in render_prometheus(stats)  # and after it ended
    lines = logs.matching("wstunnel.relay", "refused")
    assert _refusals_in(lines) == refused
    # Per cause (the relay's max_channels, the multiplexer's own limit): the first at
    # once, then a count at most once a second, and the rest when the session ends.
    assert len(lines) <= 2 * (3 + int(elapsed)), lines
