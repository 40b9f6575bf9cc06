"""Session life: waiting for a session, and sessions isolated from each other."""

from __future__ import annotations

import logging
import os
from functools import partial

import pytest
import trio

from wstunnel import ws
from wstunnel.addresses import HostPort

from .log_watch import LogWatch
from .tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_handler,
    expect_reset,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
    tunnel,
)


async def _free_port() -> int:
    sock = trio.socket.socket()
    await sock.bind((LOOPBACK, 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


async def test_connection_waits_for_the_session_then_is_carried() -> None:
    """A connection accepted before the relay is up is carried once the session comes up."""
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay_port = await _free_port()
            agent = await start_agent(nursery, agent_config(relay_port, [target]))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as early:
                await early.send_all(b"sent before any session existed")
                await start_relay(nursery, relay_config(listen=HostPort(LOOPBACK, relay_port)))
                got = b""
                while len(got) < len(b"sent before any session existed"):
                    got += await early.receive_some()
                assert got == b"sent before any session existed"
            nursery.cancel_scope.cancel()


async def test_connection_without_session_is_closed_after_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no relay, a local connection is reset after connect_wait_timeout, with a log line."""
    caplog.set_level(logging.INFO)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            agent = await start_agent(
                nursery, agent_config(await _free_port(), [9], connect_wait_timeout=0.3)
            )
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                await expect_reset(stream)
            nursery.cancel_scope.cancel()
    assert any("no session to the relay within 0.3 s" in r.getMessage() for r in caplog.records)


async def _garbage_session(relay_port: int) -> int | None:
    """Upgrade properly, then send an invalid frame; return the relay's close code."""
    async with await trio.open_tcp_stream(LOOPBACK, relay_port) as stream:
        handshake = ws.ClientHandshake(f"{LOOPBACK}:{relay_port}", "/tunnel")
        await stream.send_all(handshake.data_to_send())
        while (event := handshake.next_event()) is None:
            handshake.receive_data(await stream.receive_some())
        assert isinstance(event, ws.HandshakeAccepted)
        connection = ws.WebSocketConnection(ws.Role.CLIENT, trailing_data=event.trailing_data)
        await stream.send_all(b"\x8f\x80" + os.urandom(4))  # reserved opcode 0xF, masked
        while True:
            data = await stream.receive_some()
            if not data:
                connection.receive_eof()
            else:
                connection.receive_data(data)
            for item in connection.events_received():
                if isinstance(item, ws.CloseReceived):
                    return item.code
            if not data:
                return None


async def test_bad_frame_closes_only_that_session() -> None:
    """One client's protocol error gets 1002 and a close; another agent's channel keeps working."""
    with trio.fail_after(15):
        async with tunnel([echo_handler]) as (ports, relay, _agent):
            async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as stream:
                await stream.send_all(b"before")
                assert await stream.receive_some() == b"before"
                assert await _garbage_session(relay.ports[0]) == ws.CloseCode.PROTOCOL_ERROR
                await stream.send_all(b"after")
                assert await stream.receive_some() == b"after"


async def _upgrade_then_close(stream: trio.SocketStream) -> None:
    """A relay (or a middlebox) that accepts each WebSocket upgrade and hangs up at once."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some()
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Protocol: wstunnel.v1\r\n"
                          b"Sec-WebSocket-Accept: " + ws.accept_key(key.decode()).encode()
                          + b"\r\n\r\n")
    await stream.aclose()


async def test_sessions_that_end_at_once_back_off_instead_of_retrying_each_interval(
    logs: LogWatch,
) -> None:
    """Each session ends right after the upgrade: the reconnect delay still doubles (up
    to reconnect_max_interval), and each log line says when the next try is; before,
    a session that came up reset the backoff, so it retried (and logged) every
    reconnect_min_interval for as long as that lasted."""
    upgrades = 0

    async def count(stream: trio.SocketStream) -> None:
        nonlocal upgrades
        upgrades += 1
        await _upgrade_then_close(stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, count, 0, host=LOOPBACK))
            port = listeners[0].socket.getsockname()[1]
            await start_agent(nursery, agent_config(port, [9], reconnect_min_interval=0.02,
                                                    reconnect_max_interval=0.32))
            await trio.sleep(1.5)  # (the window measured: 1.5 s / 0.02 s would be ~70)
            nursery.cancel_scope.cancel()
    assert 3 <= upgrades <= 15
    assert any("; reconnecting in 0.3 s" in line for line in logs.lines)
