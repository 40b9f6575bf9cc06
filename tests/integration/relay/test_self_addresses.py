"""The relay does not open channels to its own host or its own ports under broad rules."""

from __future__ import annotations

import ipaddress
from functools import partial

import pytest
import trio

from wstunnel.addresses import HostPort, IPAddress
from wstunnel.config import Forward
from wstunnel.net.local_addresses import local_addresses
from wstunnel.security.allow_rule import AllowRule
from wstunnel.security.policy import special_block
from wstunnel.service.dashboard_server import serve_metrics
from wstunnel.service.metrics import TunnelStats

from ..security_helpers import watch_logs
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_exact,
    echo_handler,
    expect_reset,
    relay_config,
    start_agent,
    start_relay,
)


def _own_address() -> IPAddress:
    """An address of this machine that is neither loopback nor link-local."""
    candidates = sorted((a for a in local_addresses() if special_block(a) is None),
                        key=lambda a: (a.version, str(a)))
    if not candidates:
        pytest.skip("this machine has no non-loopback, non-link-local address to test with")
    return candidates[0]


async def _refused(port: int) -> bool:
    """A local connection through the tunnel is reset without a byte of answer."""
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await expect_reset(stream, b"hello?")
    return True


async def _serve_on(nursery: trio.Nursery, address: IPAddress) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, echo_handler, 0, host=str(address)))
    return int(listeners[0].socket.getsockname()[1])


async def test_own_address_is_refused_under_broad_rules() -> None:
    """With allow 0.0.0.0/0 and ::/0, a service on the relay host's own (non-loopback)
    address is refused before any connection is tried, and the relay says why.
    (That an exact rule allows it is checked in tests/unit/test_policy.py, without
    traffic: tests send nothing to addresses other than loopback.)"""
    own = _own_address()
    rules = ["0.0.0.0/0", "::/0"]
    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            target = await _serve_on(nursery, own)
            relay = await start_relay(nursery, relay_config(
                allow=tuple(AllowRule.parse(rule) for rule in rules)))
            agent = await start_agent(nursery, agent_config(
                relay.ports[0], [], forwards=(Forward(LOOPBACK, 0, str(own), target),)))
            assert await _refused(agent.ports[0])
            (line,) = await logs.wait_for("wstunnel.relay", "refused channel to")
            assert "address of the relay host itself" in line and str(own) in line
            nursery.cancel_scope.cancel()


async def test_the_relays_own_ports_are_refused() -> None:
    """With loopback allowed, the relay's metrics port and its own tunnel port are still
    refused (only a rule for exactly that address and port would allow them); an
    ordinary loopback service is reached."""
    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo = await _serve_on(nursery, ipaddress.ip_address(LOOPBACK))
            metrics = await nursery.start(serve_metrics, TunnelStats("relay"),
                                          HostPort(LOOPBACK, 0))
            metrics_port = metrics[0][1]
            relay = await start_relay(nursery, relay_config())  # allow: 127.0.0.1
            forwards = (Forward(LOOPBACK, 0, LOOPBACK, echo),
                        Forward(LOOPBACK, 0, LOOPBACK, metrics_port),
                        Forward(LOOPBACK, 0, LOOPBACK, relay.ports[0]))
            agent = await start_agent(nursery, agent_config(relay.ports[0], [],
                                                            forwards=forwards))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                assert await echo_exact(stream, b"fine") == b"fine"
            assert await _refused(agent.ports[1])
            (line,) = await logs.wait_for("wstunnel.relay", "refused channel to")
            assert "this relay's own metrics port" in line
            assert f"{LOOPBACK}:{metrics_port}" in line
            assert await _refused(agent.ports[2])
            nursery.cancel_scope.cancel()
    # (the second refusal is counted, and written when the session ends)
    (count,) = logs.matching("wstunnel.relay", "refused 1 channel of", "forbidden")
    assert f"{LOOPBACK}:{relay.ports[0]}" in count
