"""Reverse forwards (-R): the relay listens while the agent's session is up, and each
connection there reaches a server beside the agent."""

from __future__ import annotations

import errno
import os
import signal
import socket
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import trio

from benchmarks._children import agent_argv
from wstunnel.agent import run_agent
from wstunnel.config import Forward
from wstunnel.config.textforms import REVERSE, parse_forward
from wstunnel.relay import reverse as relay_reverse
from wstunnel.relay import run_relay
from wstunnel.security.listen_policy import ListenRule
from wstunnel.service.admin import format_status
from wstunnel.service.metrics import TunnelStats
from wstunnel.service.metrics_output import snapshot
from wstunnel.service.reload import ReloadRequest

from ..log_watch import LogWatch
from ..process_helpers import wstunnel
from ..security_helpers import account
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    digest_handler,
    echo_exact,
    echo_handler,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
    upload_and_download,
)

MiB = 1 << 20


def free_port() -> int:
    """A loopback port nobody listens on now (the relay binds it moments later)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def reverse(relay_port: int, target: int, name: str | None = None) -> Forward:
    forward = parse_forward(f"{relay_port}:{LOOPBACK}:{target}", kind=REVERSE)
    return replace(forward, name=name)


def listen_allow(*rules: str) -> tuple[ListenRule, ...]:
    return tuple(ListenRule.parse(rule) for rule in rules)


async def refused(port: int) -> bool:
    """Nothing listens on ``port`` (connection refused)."""
    try:
        stream = await trio.open_tcp_stream(LOOPBACK, port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_reverse_forward_carries_64_mib_each_way_and_200_at_once(
        carrier: str, logs: LogWatch) -> None:
    """A client at the relay reaches a server beside the agent: byte-exact both ways,
    and 200 connections at once each echo their own bytes."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            digest = await serve_target(nursery, digest_handler(64 * MiB, b"down"))
            echo = await serve_target(nursery, echo_handler)
            bulk_port, echo_port = free_port(), free_port()
            relay = await start_relay(nursery, relay_config(listen_allow=listen_allow(
                f"{LOOPBACK}:{bulk_port}", f"{LOOPBACK}:{echo_port}")))
            await start_agent(nursery, agent_config(relay.ports[0], [], forwards=(
                reverse(bulk_port, digest), reverse(echo_port, echo, "echo"))))
            await logs.wait_for(f"relay listening on {LOOPBACK}:{echo_port} for echo")
            await logs.wait_for(f"relay listening on {LOOPBACK}:{bulk_port}")
            await upload_and_download(bulk_port, 64 * MiB, 64 * MiB)

            async def one(i: int) -> None:
                async with await trio.open_tcp_stream(LOOPBACK, echo_port) as stream:
                    payload = f"connection {i} ".encode() * 50
                    assert await echo_exact(stream, payload) == payload

            async with trio.open_nursery() as clients:
                for i in range(200):
                    clients.start_soon(one, i)
            nursery.cancel_scope.cancel()


async def test_listener_closes_with_the_session_and_returns_with_the_agent(
        logs: LogWatch) -> None:
    """The relay's port is closed once the agent's session is gone (its resume grace
    over: 0.5 s here), and bound again when the agent comes back."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            port = free_port()
            relay = await start_relay(nursery, relay_config(
                listen_allow=listen_allow(f"{LOOPBACK}:{port}"), resume_grace=0.5))
            config = agent_config(relay.ports[0], [], forwards=(reverse(port, echo),))
            agent = await start_agent(nursery, config)
            await logs.wait_for(f"relay listening on {LOOPBACK}:{port}")
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                assert await echo_exact(stream, b"first") == b"first"
            agent.kill()
            await logs.wait_for(f"stopped listening on {LOOPBACK}:{port}")
            assert await refused(port)
            logs.lines.clear()
            await start_agent(nursery, config)
            await logs.wait_for(f"relay listening on {LOOPBACK}:{port}")
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                assert await echo_exact(stream, b"again") == b"again"
            nursery.cancel_scope.cancel()


async def test_a_second_agent_is_refused_and_the_same_agent_takes_over(
        logs: LogWatch, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another agent asking for a held address is refused (only the relay's log names
    the holder); the same agent asking again, from a new session, gets it at once."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            port = free_port()
            first, first_token = account("first")
            second, second_token = account("second")
            rules = listen_allow(f"{LOOPBACK}:{port}")
            first, second = replace(first, listen_allow=rules), replace(second, listen_allow=rules)
            monkeypatch.setenv("FIRST_TOKEN", first_token)
            monkeypatch.setenv("SECOND_TOKEN", second_token)
            relay = await start_relay(nursery, relay_config(no_auth=False, agents=(first, second)))
            forwards = (reverse(port, echo),)
            await start_agent(nursery, agent_config(relay.ports[0], [], forwards=forwards,
                                                    token_env="FIRST_TOKEN"))
            await logs.wait_for(f"relay listening on {LOOPBACK}:{port}")
            await start_agent(nursery, agent_config(relay.ports[0], [], forwards=forwards,
                                                    token_env="SECOND_TOKEN"))
            told = await logs.wait_for("the relay will not listen on")
            assert "in use by another agent" in told and "first" not in told.split(":", 1)[1]
            held = await logs.wait_for("agent second asked to listen on")
            assert "which agent first holds" in held
            # The first agent again, from a second process (a reconnect the relay has
            # not noticed): it takes the address over from its old session.
            await start_agent(nursery, agent_config(relay.ports[0], [], forwards=forwards,
                                                    token_env="FIRST_TOKEN"))
            await logs.wait_for("agent first takes")
            await logs.wait_for("relay stopped listening on")  # (the old session is told)
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                assert await echo_exact(stream, b"still") == b"still"
            nursery.cancel_scope.cancel()


async def test_a_listen_address_outside_listen_allow_is_refused_and_other_forwards_work(
        logs: LogWatch) -> None:
    """Without a listen_allow rule the relay does not listen; the agent says what to do
    and keeps its -L forward."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            port = free_port()
            relay = await start_relay(nursery, relay_config(
                listen_allow=listen_allow(f"{LOOPBACK}:1-1023")))
            agent = await start_agent(nursery, agent_config(relay.ports[0], [echo], forwards=(
                Forward(LOOPBACK, 0, LOOPBACK, echo), reverse(port, echo))))
            told = await logs.wait_for("the relay will not listen on")
            assert "not allowed by listen_allow" in told and "add it to this agent" in told
            assert "then restart this agent" in told  # (it asks once per session)
            assert await logs.wait_for(f"refused to listen for agent anonymous: listening on "
                                       f"{LOOPBACK}:{port}")
            assert await refused(port)
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                assert await echo_exact(stream, b"local") == b"local"
            nursery.cancel_scope.cancel()


async def test_a_bind_the_relay_host_denies_is_told_as_such_not_as_listen_allow(
        tmp_path: Path, logs: LogWatch, monkeypatch: pytest.MonkeyPatch) -> None:
    """An allowed address the relay host will not let the relay bind (EACCES: a port
    below 1024, a directory it may not write to) is not a listen_allow problem: the
    agent's log says what to do about it, for a port and for a path each."""
    def denied(*args: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(relay_reverse, "_bind", denied)  # (tests run as root)
    path = str(tmp_path / "relay.sock")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config(listen_allow=listen_allow(
                f"{LOOPBACK}:80", f"unix:{tmp_path}/*")))
            await start_agent(nursery, agent_config(relay.ports[0], [], forwards=(
                reverse(80, 22), parse_forward(f"{path}:{LOOPBACK}:22", kind=REVERSE))))
            port = await logs.wait_for(f"the relay will not listen on {LOOPBACK}:80 ")
            unix = await logs.wait_for(f"the relay will not listen on {path} ")
            nursery.cancel_scope.cancel()
    assert "CAP_NET_BIND_SERVICE" in port and "listen_allow" not in port
    assert "may not create" in unix and "listen_allow" not in unix and "1024" not in unix


async def test_target_refused_beside_the_agent_resets_the_client(logs: LogWatch) -> None:
    """Nothing listens at the agent's target: the relay's client sees a reset, and the
    agent logs why."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port, dead = free_port(), free_port()
            relay = await start_relay(nursery, relay_config(
                listen_allow=listen_allow(f"{LOOPBACK}:{port}")))
            await start_agent(nursery, agent_config(relay.ports[0], [], forwards=(
                reverse(port, dead),)))
            await logs.wait_for(f"relay listening on {LOOPBACK}:{port}")
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                with pytest.raises(trio.BrokenResourceError):
                    await stream.send_all(b"hello")
                    await stream.receive_some()
                    await stream.receive_some()
            line = await logs.wait_for("cannot connect to")
            assert "connection refused" in line
            nursery.cancel_scope.cancel()


async def test_a_frozen_agent_loses_the_relay_port_within_the_ping_timeout(
        tmp_path: Path) -> None:
    """An agent process that stops answering (SIGSTOP: its socket stays open) loses
    the relay's port once the relay's ping timeout and then its resume grace end the
    session; a new agent process gets it back at once."""
    port = free_port()
    config = tmp_path / "relay.yaml"
    config.write_text(f"listen: {LOOPBACK}:0\nno_auth: true\nallow: [{LOOPBACK}]\n"
                      f"listen_allow: ['{LOOPBACK}:{port}']\n"
                      "ping_interval: 0.2\nping_timeout: 0.5\nresume_grace: 0.5\n")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            async with wstunnel("relay", "-c", str(config)) as relay:
                match = await relay.wait_for(rb"relay listening on 127\.0\.0\.1:(\d+)")
                argv = agent_argv(int(match[1]), [], "-R", f"{port}:{LOOPBACK}:{echo}")
                async with wstunnel(*argv) as frozen:
                    await frozen.wait_for(rb"relay listening on ")
                    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                        assert await echo_exact(stream, b"up") == b"up"
                    frozen.process.send_signal(signal.SIGSTOP)
                    line = await relay.wait_for(
                        rb"stopped listening on 127\.0\.0\.1:%d [^\n]*" % port)
                    assert b"no answer to ping within 0.5 s" in line[0]
                    assert await refused(port)
                    async with wstunnel(*argv) as back:
                        await back.wait_for(rb"relay listening on ")
                        async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                            assert await echo_exact(stream, b"back") == b"back"
            nursery.cancel_scope.cancel()


async def test_unix_sockets_on_both_sides_of_a_reverse_forward(tmp_path: Path,
                                                              logs: LogWatch) -> None:
    """-R /relay.sock:unix:/server.sock: the relay listens on a unix socket path (a
    listen_allow directory rule) and the agent dials its target's unix socket; the
    socket file is removed when the lease ends."""
    served, relay_side = str(tmp_path / "server.sock"), str(tmp_path / "relay.sock")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.bind(served)
            sock.listen()
            nursery.start_soon(trio.serve_listeners, echo_handler, [trio.SocketListener(sock)])
            relay = await start_relay(nursery, relay_config(
                listen_allow=listen_allow(f"unix:{tmp_path}/*"), resume_grace=0.5))
            forward = parse_forward(f"{relay_side}:unix:{served}", kind=REVERSE)
            agent = await start_agent(nursery, agent_config(relay.ports[0], [],
                                                            forwards=(forward,)))
            await logs.wait_for(f"relay listening on {relay_side}")
            payload = bytes(range(256)) * 4096  # 1 MiB
            async with await trio.open_unix_socket(relay_side) as stream:
                assert await echo_exact(stream, payload) == payload
            agent.kill()
            await logs.wait_for(f"stopped listening on unix:{relay_side}")
            assert not Path(relay_side).exists()
            nursery.cancel_scope.cancel()


async def test_a_reload_adds_and_removes_reverse_forwards_on_the_same_session(
        logs: LogWatch) -> None:
    """A reload that adds a -R forward makes the relay listen at once; one that drops
    it makes the relay stop; the session stays up throughout."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            port = free_port()
            relay = await start_relay(nursery, relay_config(
                listen_allow=listen_allow(f"{LOOPBACK}:{port}")))
            config = agent_config(relay.ports[0], [echo])
            send, receive = trio.open_memory_channel[ReloadRequest](0)
            await nursery.start(partial(run_agent, config, shutdown=trio.Event(),
                                        reloads=receive))
            await logs.wait_for("session up")
            added = ReloadRequest(replace(config, forwards=(*config.forwards,
                                                            reverse(port, echo, "added"))))
            await send.send(added)
            await added.done.wait()
            assert added.error is None
            await logs.wait_for(f"relay listening on {LOOPBACK}:{port} for added")
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                assert await echo_exact(stream, b"added") == b"added"
            removed = ReloadRequest(config)
            await send.send(removed)
            await removed.done.wait()
            await logs.wait_for(f"stopped listening on {LOOPBACK}:{port} for agent anonymous: "
                                "the agent released it")
            assert await refused(port)
            nursery.cancel_scope.cancel()
    assert not any("reconnecting" in line for line in logs.lines)


async def test_status_shows_reverse_forwards_on_both_sides(logs: LogWatch) -> None:
    """`wstunnel status` lists each -R forward: the agent with its state (listening, or
    why not), the relay with the listener and whose it is."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            port, forbidden = free_port(), free_port()
            relay_stats, agent_stats = TunnelStats("relay"), TunnelStats("agent")
            await nursery.start(partial(run_relay, relay_config(
                listen_allow=listen_allow(f"{LOOPBACK}:{port}")), shutdown=trio.Event(),
                stats=relay_stats))
            relay_port = (await logs.wait_for("relay listening on")).split(":")[1].split(",")[0]
            config = agent_config(int(relay_port), [], forwards=(
                reverse(port, echo, "web"), reverse(forbidden, echo)))
            await nursery.start(partial(run_agent, config, shutdown=trio.Event(),
                                        stats=agent_stats))
            await logs.wait_for(f"relay listening on {LOOPBACK}:{port}")
            await logs.wait_for("the relay will not listen on")
            mine = format_status(snapshot(agent_stats))
            assert f"web: relay {LOOPBACK}:{port} -> {LOOPBACK}:{echo}: listening" in mine
            assert f"relay {LOOPBACK}:{forbidden} -> {LOOPBACK}:{echo}: refused:" in mine
            theirs = format_status(snapshot(relay_stats))
            assert f"agent anonymous: {LOOPBACK}:{port} -> session" in theirs
            nursery.cancel_scope.cancel()


async def test_an_agent_shutting_down_releases_its_listeners_first(logs: LogWatch) -> None:
    """On shutdown (SIGTERM: drain) the agent releases its leases before it drains, so
    the relay stops listening at once instead of accepting connections it must reset."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            port = free_port()
            relay = await start_relay(nursery, relay_config(
                listen_allow=listen_allow(f"{LOOPBACK}:{port}")))
            agent = await start_agent(nursery, agent_config(
                relay.ports[0], [], forwards=(reverse(port, echo),), drain_timeout=5.0))
            await logs.wait_for(f"relay listening on {LOOPBACK}:{port}")
            async with await trio.open_tcp_stream(LOOPBACK, port) as held:
                assert await echo_exact(held, b"open") == b"open"
                agent.stop.set()  # (this connection keeps the drain waiting)
                await logs.wait_for(f"stopped listening on {LOOPBACK}:{port} for agent "
                                    "anonymous: the agent released it")
                assert await refused(port)
                assert await echo_exact(held, b"still") == b"still"
            await agent.finished.wait()
            nursery.cancel_scope.cancel()


async def test_a_relay_shutting_down_stops_listening_first(logs: LogWatch) -> None:
    """The relay's drain closes its reverse listeners at once; a connection already
    carried finishes."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            port = free_port()
            relay = await start_relay(nursery, relay_config(
                listen_allow=listen_allow(f"{LOOPBACK}:{port}"), drain_timeout=5.0))
            await start_agent(nursery, agent_config(relay.ports[0], [], forwards=(
                reverse(port, echo),)))
            await logs.wait_for(f"relay listening on {LOOPBACK}:{port}")
            async with await trio.open_tcp_stream(LOOPBACK, port) as held:
                assert await echo_exact(held, b"open") == b"open"
                relay.stop.set()
                await logs.wait_for("the relay is shutting down")
                assert await refused(port)
                assert await echo_exact(held, b"still") == b"still"
            nursery.cancel_scope.cancel()



@pytest.mark.parametrize("ending", ["stop", "vanish"])
async def test_only_a_session_really_lost_with_channels_open_is_a_warning(
        logs: LogWatch, ending: str) -> None:
    """An agent whose only channel is its -R lease: stopping (SIGTERM: GOAWAY, drain,
    close) is no loss, so the relay warns of none; vanishing (no close) is, and the
    warning counts the lease in words that fit one ("1 channel open")."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = free_port()
            relay = await start_relay(nursery, relay_config(
                listen_allow=listen_allow(f"{LOOPBACK}:{port}"), resume_grace=0.0))
            agent = await start_agent(nursery, agent_config(
                relay.ports[0], [], forwards=(reverse(port, free_port()),)))
            await logs.wait_for(f"relay listening on {LOOPBACK}:{port}")
            agent.stop.set() if ending == "stop" else agent.kill()
            await logs.wait_for("session down")
            nursery.cancel_scope.cancel()
    lost = [line for line in logs.lines if "(agent anonymous): session lost" in line]  # relay's
    assert lost == ([] if ending == "stop" else [lost[0]])
    if ending == "vanish":
        assert "session lost with 1 channel open, all reset: " in lost[0]
