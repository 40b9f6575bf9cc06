"""A connection that crosses its relay's GOAWAY is opened again on the next relay.

The race, made deterministic: the first relay is reached through a path that
holds back what the relay sends (``_HeldPath``). The relay is stopped (it sends
GOAWAY, held), then a local connection arrives: the agent, not knowing yet,
opens its channel on the old session and sends its first bytes (and EOF) behind
the OPEN; the relay refuses it with OPEN_FAILED(GOING_AWAY), held too. Only then
is the path let go. The agent reads the GOAWAY and the refusal, and must carry
the connection on a new session to the second relay with every byte, as if
nothing happened (README, "Running several relays"; PROTOCOL.md section 7).
"""

from __future__ import annotations

import random
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from wstunnel.addresses import HostPort
from wstunnel.config import Forward
from wstunnel.config.textforms import UDP
from wstunnel.mux.wire import MIN_WINDOW, RecordType
from wstunnel.net.udp_flow import REFUSED_HOLD_INTERVAL
from wstunnel.security.allow_rule import AllowRule
from wstunnel.ws.frames import FrameDecoder, Opcode

from .log_watch import LogWatch
from .test_unix_sockets import serve_unix
from .tunnel_helpers import (
    LOOPBACK,
    Running,
    agent_config,
    echo_exact,
    echo_handler,
    receive_all,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
)
from .udp_helpers import exchange as udp_exchange
from .udp_helpers import serve_udp_echo

TIMEOUT = 15
SMALL = 10_000  # (sent whole, with the EOF, before the refusal is read)
LARGE = 3 << 20  # (more than a window: the rest is still unread in the socket then)
_GOAWAY_TEXT = b"the relay is shutting down"
_REFUSAL_TEXT = b"GOING_AWAY"  # (the text of the relay's OPEN_FAILED)


class _HeldPath:
    """Forwards the agent's first connection to the relay at ``relay_port``; once
    ``hold`` is called, what the relay sends waits here until ``release``. Later
    connections are closed at once, so the agent's next session goes elsewhere.
    Watches both ways: the relay's GOAWAY and refusal (their texts, unmasked), and
    the agent's DATA and FIN records (its WebSocket frames, decoded)."""

    def __init__(self, relay_port: int) -> None:
        self.relay_port = relay_port
        self.connections = 0
        self._holding = False
        self._released = trio.Event()
        self._held = b""
        self._cut_after_goaway = False
        self.goaway_held = trio.Event()
        self.refusal_held = trio.Event()
        self.fin_sent = trio.Event()
        self.data_sent = 0  # (DATA payload bytes the agent sent since ``hold``)
        self.data_mark = 0
        self.data_reached = trio.Event()  # (data_sent reached data_mark)
        self._frames = FrameDecoder(client=False, max_frame_size=1 << 24)
        self._message = b""
        self._head = b""

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(listeners[0].socket.getsockname()[1])

    def hold(self) -> None:
        self._holding = True

    def release(self) -> None:
        self._released.set()

    def release_goaway_then_cut(self) -> None:
        """Let only what the relay sent up to its GOAWAY through, then end the
        connection: a relay that closed right after its GOAWAY (one with no channel
        to drain does), before it read the agent's OPEN."""
        self._cut_after_goaway = True
        self._released.set()

    def _goaway_end(self) -> int:
        """Where the frame that carries the GOAWAY ends in what was held (the relay's
        frames are unmasked; holding began between two of them)."""
        held, at = self._held, 0
        while True:
            length, head = held[at + 1] & 0x7F, 2
            if length >= 126:
                head = 4 if length == 126 else 10
                length = int.from_bytes(held[at + 2:at + head], "big")
            end = at + head + length
            if _GOAWAY_TEXT in held[at:end]:
                return end
            at = end

    async def _handle(self, agent: trio.SocketStream) -> None:
        self.connections += 1
        if self.connections > 1:
            await agent.aclose()
            return
        relay = await trio.open_tcp_stream(LOOPBACK, self.relay_port)
        async with agent, relay, trio.open_nursery() as nursery:
            nursery.start_soon(self._up, agent, relay)
            await self._down(relay, agent)
            nursery.cancel_scope.cancel()

    async def _up(self, agent: trio.SocketStream, relay: trio.SocketStream) -> None:
        async for data in agent:
            self._watch_up(data)
            await relay.send_all(data)

    async def _down(self, relay: trio.SocketStream, agent: trio.SocketStream) -> None:
        """Reads on while holding (so what follows the GOAWAY is seen), in order."""
        send, receive = trio.open_memory_channel[bytes | bytearray](float("inf"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forward_down, receive, agent)
            async for data in relay:
                if self._holding:
                    self._held += data
                    if _GOAWAY_TEXT in self._held:
                        self.goaway_held.set()
                    if _REFUSAL_TEXT in self._held:
                        self.refusal_held.set()
                send.send_nowait(data)
            nursery.cancel_scope.cancel()

    async def _forward_down(self, receive: trio.MemoryReceiveChannel[bytes | bytearray],
                            agent: trio.SocketStream) -> None:
        async for data in receive:
            if self._holding:
                await self._released.wait()
                if self._cut_after_goaway:
                    await agent.send_all(self._held[:self._goaway_end()])
                    agent.socket.shutdown(socket.SHUT_WR)  # (the relay's end, as the agent sees it)
                    return
            await agent.send_all(data)

    def _watch_up(self, data: bytes | bytearray) -> None:
        if b"\r\n\r\n" not in self._head:  # (the upgrade request first)
            self._head += data
            if b"\r\n\r\n" not in self._head:
                return
            data = self._head.split(b"\r\n\r\n", 1)[1]
        self._frames.receive_data(data)
        while (frame := self._frames.next_frame()) is not None:
            if frame.opcode not in (Opcode.BINARY, Opcode.CONTINUATION):
                continue
            self._message += frame.payload
            if frame.fin:
                self._record(self._message)
                self._message = b""

    def _record(self, record: bytes) -> None:
        if not self._holding:
            return
        if record[0] == RecordType.DATA:
            self.data_sent += len(record) - 5
            if self.data_mark and self.data_sent >= self.data_mark:
                self.data_reached.set()
        elif record[0] == RecordType.FIN:
            self.fin_sent.set()


async def _start_relays(nursery: trio.Nursery, allow: tuple[str, ...]
                        ) -> tuple[Running, _HeldPath, list[str]]:
    """Two relays: the first (draining for long) behind a ``_HeldPath``. Returns it,
    the path, and the agent's two relay URLs."""
    rules = tuple(AllowRule.parse(rule) for rule in allow)
    first = await start_relay(nursery, relay_config(allow=rules, drain_timeout=60.0))
    second = await start_relay(nursery, relay_config(allow=rules))
    path = _HeldPath(first.ports[0])
    port = await nursery.start(path.serve)
    return first, path, [f"ws://{LOOPBACK}:{port}/tunnel",
                         f"ws://{LOOPBACK}:{second.ports[0]}/tunnel"]


async def _goaway_held(first: Running, path: _HeldPath, holder: trio.SocketStream) -> None:
    """The agent's session is on the first relay (``holder`` echoes through it and
    stays open, so the drain lasts); that relay is stopped and its GOAWAY held."""
    assert await echo_exact(holder, b"on the first relay") == b"on the first relay"
    path.hold()
    first.stop.set()
    await path.goaway_held.wait()


async def _send_then_eof(stream: trio.abc.HalfCloseableStream, payload: bytes) -> None:
    await stream.send_all(payload)
    await stream.send_eof()


@pytest.mark.usefixtures("carrier")
@pytest.mark.parametrize(("target", "size"), [("tcp", SMALL), ("tcp", LARGE), ("unix", SMALL)])
async def test_a_connection_that_crosses_the_goaway_completes_on_the_next_relay(
    target: str, size: int, tmp_path: Path, logs: LogWatch
) -> None:
    """The local connection made between the relay's GOAWAY and the agent reading it
    is not reset: the agent opens it again on a session to the other relay, with
    the bytes (and the EOF) it had sent behind the refused OPEN, and the rest; the
    echo comes back byte-exact and ends cleanly. (``unix``: a unix socket listener
    on the agent and a unix socket target on the relays.)"""
    payload = random.Random(size).randbytes(size)
    socket_path = str(tmp_path / "echo.sock")
    listen_path = str(tmp_path / "agent.sock")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            allow: tuple[str, ...] = (LOOPBACK,)
            forward = Forward(LOOPBACK, 0, LOOPBACK, echo)
            if target == "unix":
                await serve_unix(nursery, echo_handler, socket_path)
                allow = (LOOPBACK, f"unix:{socket_path}")
                forward = Forward("", 0, "", 0, listen_path=listen_path, target_path=socket_path)
            first, path, relays = await _start_relays(nursery, allow)
            holding = Forward(LOOPBACK, 0, LOOPBACK, echo)
            agent = await start_agent(nursery, agent_config(
                0, [], relay=tuple(relays), forwards=(holding, forward)))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as holder:
                await _goaway_held(first, path, holder)
                if target == "unix":
                    client: trio.SocketStream = await trio.open_unix_socket(listen_path)
                else:
                    client = await trio.open_tcp_stream(LOOPBACK, agent.ports[1])
                path.data_mark = MIN_WINDOW  # (what a relay opens a channel with, at least)
                async with client:
                    nursery.start_soon(_send_then_eof, client, payload)
                    await path.refusal_held.wait()
                    if size == SMALL:
                        await path.fin_sent.wait()  # (data and EOF went behind the OPEN)
                    else:
                        await path.data_reached.wait()  # (a window's start went behind it)
                    path.release()
                    assert await receive_all(client) == payload
            nursery.cancel_scope.cancel()
    assert f"session up to {relays[1]}" in logs.lines  # (the new session: the other relay)
    assert any("opened again on the new session" in line for line in logs.lines)


async def test_a_connection_that_crosses_a_goaway_and_then_a_close_completes_too(
    logs: LogWatch
) -> None:
    """A relay that closes right after its GOAWAY never answers an OPEN that crossed
    it. The GOAWAY's last channel id says it never acted on it, so the agent opens
    the connection again on the next relay as soon as it reads the GOAWAY, rather
    than reset it when the session ends."""
    payload = random.Random(7).randbytes(SMALL)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            first, path, relays = await _start_relays(nursery, (LOOPBACK,))
            agent = await start_agent(nursery, agent_config(0, [echo, echo],
                                                            relay=tuple(relays)))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as holder:
                await _goaway_held(first, path, holder)
                async with await trio.open_tcp_stream(LOOPBACK, agent.ports[1]) as client:
                    nursery.start_soon(_send_then_eof, client, payload)
                    await path.fin_sent.wait()  # (OPEN, data and EOF went out)
                    path.release_goaway_then_cut()
                    assert await receive_all(client) == payload
            nursery.cancel_scope.cancel()
    assert f"session up to {relays[1]}" in logs.lines
    assert any("opened again on the new session" in line for line in logs.lines)


async def test_a_udp_flow_that_crosses_the_goaway_is_not_held_back() -> None:
    """-L udp: a flow whose OPEN crossed the relay's GOAWAY loses the datagram it
    carried (UDP may lose any; it is not sent again), but is not held back as a
    refused flow is (REFUSED_HOLD_INTERVAL): the client's next try is answered
    through the other relay."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            udp_echo = await nursery.start(serve_udp_echo)
            allow = (LOOPBACK, f"udp:{LOOPBACK}:{udp_echo}")
            first, path, relays = await _start_relays(nursery, allow)
            flows = replace(Forward(LOOPBACK, 0, LOOPBACK, udp_echo), protocol=UDP)
            agent = await start_agent(nursery, agent_config(
                0, [], relay=tuple(relays), forwards=(Forward(LOOPBACK, 0, LOOPBACK, echo), flows)))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as holder:
                await _goaway_held(first, path, holder)
                with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    await sock.sendto(b"lost", (LOOPBACK, agent.ports[1]))
                    await path.refusal_held.wait()
                    path.release()
                    answer = await udp_exchange(sock, (LOOPBACK, agent.ports[1]), b"again",
                                                timeout=REFUSED_HOLD_INTERVAL / 2)
                    assert answer == b"again"
            nursery.cancel_scope.cancel()


async def test_a_proxy_client_that_crosses_the_goaway_is_answered_from_the_next_relay(
    logs: LogWatch
) -> None:
    """-D: a SOCKS5 CONNECT whose OPEN crossed the relay's GOAWAY is opened again on
    the other relay before the client hears anything: it gets "succeeded", and its
    bytes are echoed."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            first, path, relays = await _start_relays(nursery, (LOOPBACK,))
            agent = await start_agent(nursery, replace(agent_config(
                0, [echo], relay=tuple(relays)), forwards=(
                    Forward(LOOPBACK, 0, LOOPBACK, echo), Forward.dynamic(HostPort(LOOPBACK, 0)))))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as holder:
                await _goaway_held(first, path, holder)
                async with await trio.open_tcp_stream(LOOPBACK, agent.ports[1]) as client:
                    address = socket.inet_aton(LOOPBACK) + echo.to_bytes(2, "big")
                    await client.send_all(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + address)
                    await path.refusal_held.wait()
                    path.release()
                    reply = b""
                    while len(reply) < 12:
                        reply += await client.receive_some(12 - len(reply)) or pytest.fail(
                            f"closed after {reply!r}")
                    assert reply[:4] == b"\x05\x00\x05\x00"  # (method chosen; succeeded)
                    assert await echo_exact(client, b"through the other relay") == \
                        b"through the other relay"
            nursery.cancel_scope.cancel()
    assert any("opened again on the new session" in line for line in logs.lines)
