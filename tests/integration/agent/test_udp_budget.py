"""The flows of one agent UDP socket hold back a bounded amount together
(net/udp_flow.py DatagramBudget): many client addresses, each queueing while no
session takes their datagrams, cannot make the agent hold 64 KiB each."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio
import trio.testing

from wstunnel.agent import udp
from wstunnel.net.udp_flow import udp_stats

from ..tunnel_helpers import LOOPBACK

CLIENTS = 4
DATAGRAMS = 64  # of 1,000 bytes each: a flow's own 64 KiB queue holds about 61


class _NeverOpens:
    """No session yet: every flow keeps queueing its client's datagrams."""

    async def open_channel(self, *args: Any, **kwargs: Any) -> None:
        await trio.sleep_forever()


async def test_the_flows_of_one_forward_hold_no_more_than_its_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """4 clients, 64 KiB each, a budget of 128 KiB: about half of what they sent is
    dropped (oldest first, counted as queue_full), not the few datagrams each flow's
    own bound drops."""
    monkeypatch.setattr(udp, "FORWARD_DATAGRAM_BUDGET", 128 * 1024)
    forward = SimpleNamespace(target_host="10.0.0.53", target_port=53, label="-L udp:test",
                              udp_idle_timeout=None)
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((LOOPBACK, 0))
    server.setblocking(False)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(CLIENTS)]
    dropped = udp_stats.dropped["queue_full"]
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(udp.serve_udp_forward, server, lambda: cast(Any, forward),
                                   cast(Any, _NeverOpens()))
                for client in clients:
                    for n in range(DATAGRAMS):
                        client.sendto(n.to_bytes(4, "big") * 250, server.getsockname())
                        if n % 16 == 15:  # (within the socket's receive buffer)
                            await trio.testing.wait_all_tasks_blocked()
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
    finally:
        server.close()
        for client in clients:
            client.close()
    dropped = udp_stats.dropped["queue_full"] - dropped
    held = CLIENTS * DATAGRAMS - dropped
    assert held * (1002 + 64) <= 128 * 1024, f"{held} datagrams held, {dropped} dropped"
    assert dropped < CLIENTS * DATAGRAMS - 100  # (the budget is used, not just dropped)
