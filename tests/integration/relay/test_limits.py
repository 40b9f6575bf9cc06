"""Per-agent destination rules and abuse limits, each breach confined to what broke it."""

from __future__ import annotations

import contextlib
import os

import pytest
import trio

from wstunnel import ws
from wstunnel.agent.connect import open_websocket
from wstunnel.config import Forward, parse_relay_url
from wstunnel.relay.relay import CLOSE_IDLE

from ..security_helpers import FakeResolver, account, install_resolver, watch_logs
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_exact,
    echo_handler,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
)


async def _closed_without_data(port: int) -> bool:
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        try:  # (the refusal may reset the connection before our bytes go)
            await stream.send_all(b"hello?")
            return await stream.receive_some() == b""
        except trio.BrokenResourceError:
            return True


async def test_per_agent_rules_checked_after_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Allowed works; outside the rules, a name resolving to 127.0.0.1 and the metadata
    address are refused as "forbidden", each logged with agent and destination."""
    resolver = FakeResolver({"sneaky.example": LOOPBACK})
    restore = install_resolver(resolver)
    try:
        with watch_logs() as logs, trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                target = await serve_target(nursery, echo_handler)
                hidden = await serve_target(nursery, echo_handler)  # loopback, but not named
                entry, token = account("a1", f"{LOOPBACK}:{target}", "sneaky.example",
                                       "169.254.0.0/16")
                other, _ = account("b2")  # another agent, no rules at all
                monkeypatch.setenv("A1_TOKEN", token)
                relay = await start_relay(nursery, relay_config(
                    no_auth=False, allow=(), agents=(entry, other), connect_timeout=0.5))
                forwards = (Forward(LOOPBACK, 0, LOOPBACK, target),
                            Forward(LOOPBACK, 0, "sneaky.example", hidden),
                            Forward(LOOPBACK, 0, "169.254.169.254", 80),
                            Forward(LOOPBACK, 0, "10.1.2.3", 22))
                agent = await start_agent(nursery, agent_config(
                    relay.ports[0], [], forwards=forwards, token_env="A1_TOKEN"))
                allowed, sneaky, metadata, outside = agent.ports
                async with await trio.open_tcp_stream(LOOPBACK, allowed) as stream:
                    assert await echo_exact(stream, b"allowed") == b"allowed"
                refused = ((sneaky, f"sneaky.example:{hidden}"),
                           (metadata, "169.254.169.254:80"), (outside, "10.1.2.3:22"))
                for port, _destination in refused:
                    assert await _closed_without_data(port)
                # The first is logged at once, in full; the next are counted (refusals.py).
                (line,) = logs.matching("wstunnel.relay", "agent a1",
                                        f"refused channel to sneaky.example:{hidden}")
                assert "not allowed" in line
                assert logs.matching("wstunnel.agent", "relay could not connect to "
                                     "sneaky.example", "not allowed")
                nursery.cancel_scope.cancel()
        # The session ended: the relay wrote the count, naming the other destinations.
        (line,) = logs.matching("wstunnel.relay", "refused 2 channels of", "agent a1",
                                "forbidden")
        assert "169.254.169.254:80" in line and "10.1.2.3:22" in line
    finally:
        restore()


async def test_slowloris_does_not_delay_a_good_agent() -> None:
    """200 half-sent upgrade requests: a good agent still connects within 1 s, and all 200
    are dropped at the handshake timeout."""
    timeout = 1.5
    with watch_logs() as logs, trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config(handshake_timeout=timeout))
            port = relay.ports[0]
            slow = []
            for _ in range(200):
                stream = await trio.open_tcp_stream(LOOPBACK, port)
                await stream.send_all(b"GET /tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: web")
                slow.append(stream)
            started = trio.current_time()
            good, _ = await open_websocket(parse_relay_url(f"ws://127.0.0.1:{port}/tunnel"))
            assert trio.current_time() - started < 1.0
            await logs.wait_for("no complete upgrade request within", count=200)
            for stream in slow:
                with contextlib.suppress(trio.BrokenResourceError):  # (a reset is a drop too)
                    assert await stream.receive_some() == b""  # dropped by the relay
                await stream.aclose()
            assert trio.current_time() - started < timeout + 3
            await good.aclose()
            nursery.cancel_scope.cancel()


async def test_oversized_header_and_frame_close_only_their_connection() -> None:
    """A 20 KiB header gets 431; a frame above max_message_size closes that session
    with 1009; a session beside it keeps working."""
    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config(max_message_size=64 * 1024))
            port = relay.ports[0]
            agent = await start_agent(nursery, agent_config(port, [target]))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as bystander:
                assert await echo_exact(bystander, b"before") == b"before"
                async with await trio.open_tcp_stream(LOOPBACK, port) as raw:
                    await raw.send_all(b"GET /tunnel HTTP/1.1\r\nHost: x\r\nX-Big: "
                                       + b"a" * 20000 + b"\r\n\r\n")
                    assert (await raw.receive_some()).startswith(b"HTTP/1.1 431")
                url = parse_relay_url(f"ws://127.0.0.1:{port}/tunnel")
                stream, _ = await open_websocket(url)
                await stream.send_all(ws.encode_frame(ws.Opcode.BINARY, b"x" * 70000,
                                                      mask_key=os.urandom(4)))
                client = ws.WebSocketConnection(ws.Role.CLIENT)
                while client.close_code is None:
                    data = await stream.receive_some()
                    assert data
                    client.receive_data(data)
                    client.events_received()
                assert client.close_code == ws.CloseCode.MESSAGE_TOO_BIG
                await stream.aclose()
                assert await echo_exact(bystander, b"after") == b"after"
            assert logs.matching("session down", "1009")
            nursery.cancel_scope.cancel()


async def test_channel_and_open_limits_refuse_only_the_extra_channel() -> None:
    """Past max_channels, and past max_pending_opens while a dial hangs, an OPEN gets
    "limit reached" and a log line; channels already open keep working."""
    resolver = FakeResolver({"slow.example": LOOPBACK}, block={"slow.example"})
    restore = install_resolver(resolver)
    try:
        with watch_logs() as logs, trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                target = await serve_target(nursery, echo_handler)
                relay = await start_relay(nursery, relay_config(
                    max_channels=3, max_pending_opens=1))
                forwards = (Forward(LOOPBACK, 0, LOOPBACK, target),
                            Forward(LOOPBACK, 0, "slow.example", target))
                agent = await start_agent(nursery, agent_config(
                    relay.ports[0], [], forwards=forwards))
                echo_port, slow_port = agent.ports
                first = await trio.open_tcp_stream(LOOPBACK, echo_port)
                assert await echo_exact(first, b"one") == b"one"
                hanging = await trio.open_tcp_stream(LOOPBACK, slow_port)  # dial blocks in DNS
                second = await trio.open_tcp_stream(LOOPBACK, slow_port)
                with contextlib.suppress(trio.BrokenResourceError):  # (refused: maybe reset)
                    await second.send_all(b"x")
                (line,) = await logs.wait_for("refused channel to slow.example",
                                              "opens in flight")
                resolver.release.set()
                assert await echo_exact(hanging, b"released") == b"released"
                third = await trio.open_tcp_stream(LOOPBACK, echo_port)
                # 3 open now: first, hanging, third
                assert await echo_exact(third, b"three") == b"three"
                assert await _closed_without_data(echo_port)
                await logs.wait_for("refused channel to 127.0.0.1", "max_channels")
                assert await echo_exact(first, b"still fine") == b"still fine"
                for stream in (first, hanging, second, third):
                    await stream.aclose()
                nursery.cancel_scope.cancel()
    finally:
        restore()


async def test_idle_session_is_closed_with_its_own_code() -> None:
    """A session with no channel for idle_timeout is closed with code 4000; the agent
    reconnects and still carries traffic."""
    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config(idle_timeout=0.3))
            agent = await start_agent(nursery, agent_config(relay.ports[0], [target]))
            await logs.wait_for("closing the idle session")
            await logs.wait_for("wstunnel.agent", f"closed with code {CLOSE_IDLE}")
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                assert await echo_exact(stream, b"after idle") == b"after idle"
            nursery.cancel_scope.cancel()
