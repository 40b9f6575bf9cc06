"""run_relay warns at start when the relay is open to anyone or will refuse everything."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from wstunnel.addresses import HostPort
from wstunnel.security.listen_policy import ListenRule

from ..security_helpers import account, watch_logs
from ..tunnel_helpers import relay_config, start_relay

NO_AUTH = "no_auth: ANY client that reaches this port may open channels"
NO_ALLOW = "no 'allow' rules: every channel will be refused (add --allow HOST[:PORT])"
NO_AGENTS = "no agents configured: every agent will be refused with 401"


async def _start_up_warnings(**overrides: Any) -> list[str]:
    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config(**overrides))
            relay.stop.set()
    return [line for line in logs.lines if " WARNING " in line]


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, [NO_AUTH]),
    ({"allow": ()}, [NO_AUTH, NO_ALLOW]),
    ({"allow": (), "listen_allow": (ListenRule.parse("127.0.0.1:9022"),)}, [NO_AUTH]),
    ({"no_auth": False}, [NO_AGENTS]),
    ({"no_auth": False, "agents": (account("a1", "127.0.0.1")[0],)}, []),
])
async def test_start_up_says_who_may_use_the_relay(overrides: dict[str, Any],
                                                   expected: list[str]) -> None:
    """An open relay (no_auth), one with no allow rules, one with no agents: each is
    said once at start, as a warning with what to do; a relay with agents says none,
    and one with listen_allow rules only (a relay for -R) is not told that every
    channel will be refused."""
    warnings = await _start_up_warnings(**overrides)
    assert len(warnings) == len(expected)
    for line, text in zip(warnings, expected, strict=True):
        assert text in line


async def test_an_ipv6_listener_is_logged_as_it_would_be_typed() -> None:
    """`relay listening on [::1]:PORT`: an IPv6 address in brackets, so the line can
    be pasted into --relay ws://[::1]:PORT/tunnel."""
    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config(listen=HostPort("::1", 0)))
            relay.stop.set()
    line = next(line for line in logs.lines if "relay listening on" in line)
    assert f"[::1]:{relay.ports[0]}" in line
