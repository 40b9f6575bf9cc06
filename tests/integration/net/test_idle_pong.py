"""An idle session's pong is written by the reader itself (issue 22: 1,000 idle agents
on one relay cost a ping exchange each, and the writer's wake-up was a fifth of it).

What users rely on: the peer gets its pong, and every byte of the session arrives in
order and correctly framed even when the kernel takes the pong only in part. Which
task sends is the point of the change, so the first test counts the stream's calls.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from wstunnel import mux, ws
from wstunnel.net.plain_stream import Buffer, PlainSocketStream, nowait_sender
from wstunnel.net.tls_stream import TLSSocketStream, start_tls
from wstunnel.net.transport import TunnelTransport
from wstunnel.protocol import TunnelProtocol
from wstunnel.security.tls import ClientTLS, client_context, self_signed_certificate, server_context

from ..tunnel_helpers import FailedReads


class CountingStream(PlainSocketStream):
    """Counts which path sends; ``nowait_limit`` bytes at most per ``send_nowait``
    (the kernel taking a reply in part), ``on_nowait`` runs right after one."""

    def __init__(self, sock: socket.socket, nowait_limit: int | None = None) -> None:
        super().__init__(sock)
        self.nowait_calls = 0
        self.parts_calls = 0
        self.nowait_limit = nowait_limit
        self.on_nowait: Callable[[], object] = lambda: None

    def send_nowait(self, parts: Sequence[Buffer]) -> list[Buffer]:
        self.nowait_calls += 1
        if self.nowait_limit is None:
            return super().send_nowait(parts)
        joined = b"".join(parts)
        head, rest = joined[:self.nowait_limit], joined[self.nowait_limit:]
        left = super().send_nowait([head])
        self.on_nowait()
        return [*left, rest] if rest else left

    async def send_parts(self, parts: Sequence[Buffer], *, checkpoint: bool = True) -> None:
        self.parts_calls += 1
        await super().send_parts(parts, checkpoint=checkpoint)


async def _ping_the_idle_relay(nowait_limit: int | None = None,
                               queued_after_the_pong: bytes = b""
                               ) -> tuple[bytes, CountingStream]:
    """Start a relay session over a socket pair, let it go idle, ping it as a bare
    WebSocket client; return every byte the relay sent after the ping up to the pong
    (and, where given, the ping it queued right after the pong's first bytes), and
    the relay's stream."""
    peer_sock, relay_sock = socket.socketpair()
    relay_sock.setblocking(False)
    relay_stream = CountingStream(relay_sock, nowait_limit)
    relay = TunnelTransport(relay_stream, TunnelProtocol(mux.Role.RELAY), name="relay",
                            ping_interval=0)
    if queued_after_the_pong:
        relay_stream.on_nowait = lambda: relay.protocol.ping(queued_after_the_pong)
    peer = ws.WebSocketConnection(ws.Role.CLIENT)
    peer_stream = trio.SocketStream(trio.socket.from_stdlib_socket(peer_sock))
    expected_events = 2 if queued_after_the_pong else 1
    received = bytearray()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            with trio.fail_after(5):
                await trio.testing.wait_all_tasks_blocked()
                # (what the relay sent on its own first: its SETTINGS)
                peer.receive_data(await peer_stream.receive_some())
                assert peer.events_received()
                await trio.testing.wait_all_tasks_blocked()
                relay_stream.parts_calls = 0
                peer.ping(b"agent")
                await peer_stream.send_all(peer.data_to_send())
                events: list[ws.Event] = []
                while len(events) < expected_events:
                    data = await peer_stream.receive_some()
                    assert data, "the relay closed the connection"
                    received += data
                    peer.receive_data(data)
                    events += peer.events_received()
            assert [type(event) for event in events] == (
                [ws.PongReceived, ws.PingReceived] if queued_after_the_pong
                else [ws.PongReceived])
            nursery.cancel_scope.cancel()
    finally:
        await peer_stream.aclose()
        await relay_stream.aclose()
    return bytes(received), relay_stream


def _server_frame(opcode: int, payload: bytes) -> bytes:
    return bytes([0x80 | opcode, len(payload)]) + payload


async def test_an_idle_sessions_pong_is_sent_by_the_reader_not_the_writer() -> None:
    received, stream = await _ping_the_idle_relay()
    assert received == _server_frame(0xA, b"agent")
    assert (stream.nowait_calls, stream.parts_calls) == (1, 0)


async def test_a_pong_the_kernel_took_in_part_is_finished_before_what_follows() -> None:
    """Three bytes of the pong go from the reader; a ping queued at that moment must
    still leave after the rest of the pong: byte-exact, one correctly framed sequence."""
    received, stream = await _ping_the_idle_relay(3, queued_after_the_pong=b"later")
    assert received == _server_frame(0xA, b"agent") + _server_frame(0x9, b"later")
    assert stream.nowait_calls == 1


async def test_only_a_stream_on_our_own_socket_writes_in_place() -> None:
    """Plain and TLS streams send a reply themselves (TLS through OpenSSL: its own
    send_nowait); a stream of another kind (the HTTP transports' pipe) leaves every
    byte to the session's writer."""
    a, b = socket.socketpair()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls = TLSSocketStream(context.wrap_socket(a, server_hostname="relay.example",
                                              do_handshake_on_connect=False))
    plain = PlainSocketStream(b)
    try:
        assert nowait_sender(tls) == tls.send_nowait
        assert nowait_sender(trio.testing.memory_stream_pair()[0]) is None
        assert nowait_sender(plain) == plain.send_nowait
    finally:
        tls.close()
        plain.close()


@pytest.mark.parametrize("want_write", [False, True])
async def test_over_tls_the_reader_sends_the_pong_through_openssl(
    tmp_path: Path, want_write: bool,
) -> None:
    """wss://: the idle relay's pong is written by the reader, encrypted, and the peer
    reads it as the one pong it expects. When OpenSSL cannot take it at once
    (WANT_WRITE), the writer sends the same bytes instead, and the peer still reads
    one pong."""
    key_pem, cert_pem = self_signed_certificate(["relay.test"])
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    a, b = socket.socketpair()
    raw_relay = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    raw_peer = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    streams: dict[str, TLSSocketStream] = {}
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def relay_side() -> None:
                streams["relay"] = await start_tls(
                    raw_relay, server_context(str(tmp_path / "cert.pem"),
                                              str(tmp_path / "key.pem")), server_side=True)

            async def peer_side() -> None:
                streams["peer"] = await start_tls(
                    raw_peer, client_context(ClientTLS(ca_file=str(tmp_path / "cert.pem"))),
                    server_hostname="relay.test")

            nursery.start_soon(relay_side)
            nursery.start_soon(peer_side)
    relay_stream, peer_stream = streams["relay"], streams["peer"]
    calls = {"nowait": 0, "parts": 0}
    send_nowait, send_parts = relay_stream.send_nowait, relay_stream.send_parts

    def counting_nowait(parts: Sequence[Buffer]) -> list[Buffer]:
        calls["nowait"] += 1
        return send_nowait(parts)

    async def counting_parts(parts: Sequence[Buffer], *, checkpoint: bool = True) -> None:
        calls["parts"] += 1
        await send_parts(parts, checkpoint=checkpoint)

    ssl_write = relay_stream._ssl_write
    refusals: list[ssl.SSLWantWriteError] = []  # (armed once the relay is idle)

    def write_refused_when_armed(data: Buffer) -> int:
        if refusals:
            raise refusals.pop()
        return ssl_write(data)

    relay_stream._ssl_write = write_refused_when_armed
    relay_stream.send_nowait = counting_nowait  # type: ignore[method-assign]
    relay_stream.send_parts = counting_parts  # type: ignore[method-assign]
    relay = TunnelTransport(relay_stream, TunnelProtocol(mux.Role.RELAY), name="relay",
                            ping_interval=0)
    peer = ws.WebSocketConnection(ws.Role.CLIENT)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            with trio.fail_after(5):
                await trio.testing.wait_all_tasks_blocked()
                peer.receive_data(await peer_stream.receive_some())  # (its SETTINGS)
                assert peer.events_received()
                await trio.testing.wait_all_tasks_blocked()
                calls["parts"] = 0
                if want_write:
                    refusals.append(ssl.SSLWantWriteError())
                peer.ping(b"agent")
                await peer_stream.send_all(peer.data_to_send())
                peer.receive_data(await peer_stream.receive_some())
                assert peer.events_received() == [ws.PongReceived(b"agent")]
            nursery.cancel_scope.cancel()
    finally:
        await peer_stream.aclose()
        await relay_stream.aclose()
    assert calls == {"nowait": 1, "parts": 1 if want_write else 0}


class BrokenOnReply(PlainSocketStream):
    """The connection breaks just as the reader writes its reply."""

    def send_nowait(self, parts: Sequence[Buffer]) -> list[Buffer]:
        raise trio.BrokenResourceError("connection reset by peer")


async def test_a_reply_into_a_broken_connection_ends_the_carrier_as_lost() -> None:
    """The reader's write failing is the writer's failure: the session ends (or, when
    resumable, waits for a new carrier) with the reason, not with a silent stall."""
    peer_sock, relay_sock = socket.socketpair()
    relay_sock.setblocking(False)
    relay_stream = BrokenOnReply(relay_sock)
    relay = TunnelTransport(relay_stream, TunnelProtocol(mux.Role.RELAY), name="relay",
                            ping_interval=0)
    peer = ws.WebSocketConnection(ws.Role.CLIENT)
    peer_stream = trio.SocketStream(trio.socket.from_stdlib_socket(peer_sock))
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                async def ping_when_idle() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    peer.ping(b"agent")
                    await peer_stream.send_all(peer.data_to_send())

                nursery.start_soon(ping_when_idle)
                reason = await relay.run()
    finally:
        await peer_stream.aclose()
        await relay_stream.aclose()
    assert reason.startswith("connection lost while sending: connection reset by peer")


@asynccontextmanager
async def _idle_relay(relay_stream: PlainSocketStream, peer_sock: socket.socket,
                      ping_interval: float = 0) -> AsyncIterator[tuple[
                          TunnelTransport, ws.WebSocketConnection, trio.SocketStream]]:
    """A relay session on ``relay_stream``, gone idle once its SETTINGS reached the
    bare WebSocket peer on ``peer_sock``; yields the session, that peer and its
    stream, and stops the session and closes both on the way out."""
    relay = TunnelTransport(relay_stream, TunnelProtocol(mux.Role.RELAY), name="relay",
                            ping_interval=ping_interval)
    peer = ws.WebSocketConnection(ws.Role.CLIENT)
    peer_stream = trio.SocketStream(trio.socket.from_stdlib_socket(peer_sock))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            with trio.fail_after(5):
                await trio.testing.wait_all_tasks_blocked()
                peer.receive_data(await peer_stream.receive_some())  # (its SETTINGS)
                assert peer.events_received()
                yield relay, peer, peer_stream
            nursery.cancel_scope.cancel()
    finally:
        await peer_stream.aclose()
        await relay_stream.aclose()


async def test_an_idle_session_reads_each_ping_once() -> None:
    """After a read that raised no event (a ping) the reader waits for the next bytes
    instead of trying a read first: one read per ping, none that finds nothing (a
    system call and an exception per wake-up, on a relay with many idle agents)."""
    peer_sock, relay_sock = socket.socketpair()
    relay_sock.setblocking(False)
    counted = FailedReads(fileno=relay_sock.detach())
    relay_stream = CountingStream(counted)
    async with _idle_relay(relay_stream, peer_sock) as (_, peer, peer_stream):
        await _ping_and_wait_for_the_pong(peer, peer_stream, b"first")
        counted.failed = 0
        for payload in (b"second", b"third", b"fourth"):
            await _ping_and_wait_for_the_pong(peer, peer_stream, payload)
            await trio.testing.wait_all_tasks_blocked()  # (the reader waits again)
    assert counted.failed == 0
    assert relay_stream.nowait_calls == 4  # (and every pong went out in place)


async def _ping_and_wait_for_the_pong(peer: ws.WebSocketConnection,
                                      peer_stream: trio.SocketStream, payload: bytes) -> None:
    peer.ping(payload)
    await peer_stream.send_all(peer.data_to_send())
    peer.receive_data(await peer_stream.receive_some())
    assert peer.events_received() == [ws.PongReceived(payload)]


async def test_the_keepalives_ping_is_sent_in_place_too() -> None:
    """A relay's keepalive ping to a quiet agent goes out from the keepalive timer
    itself, as the reader's pong does: no writer wake-up per ping either; and the
    agent's pong to it costs the relay one read, none that finds nothing."""
    peer_sock, relay_sock = socket.socketpair()
    relay_sock.setblocking(False)
    counted = FailedReads(fileno=relay_sock.detach())
    relay_stream = CountingStream(counted)
    async with _idle_relay(relay_stream, peer_sock, ping_interval=0.2) as (
            _, peer, peer_stream):
        relay_stream.parts_calls = 0
        events: list[ws.Event] = []
        while not events:
            peer.receive_data(await peer_stream.receive_some())
            events = peer.events_received()
        counted.failed = 0
        await peer_stream.send_all(peer.data_to_send())  # (the pong)
        await trio.testing.wait_all_tasks_blocked()  # (the relay read it, and waits)
    assert events == [ws.PingReceived(b"wstunnel")]
    assert relay_stream.parts_calls == 0  # (none from the writer)
    assert relay_stream.nowait_calls >= 1
    assert counted.failed == 0


class WriterSteps(trio.abc.Instrument):
    """Counts the scheduler steps of the session writer tasks."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("._writer"):
            self.steps += 1


async def test_a_write_with_nothing_behind_it_costs_the_writer_one_step() -> None:
    """After a write the kernel took at once, a writer with nothing more to send goes
    straight back to waiting (itself a checkpoint) instead of passing a checkpoint
    first and then waiting: one scheduler round per interactive write, not two (a
    tenth of an idle round trip's instructions, issue 22)."""
    peer_sock, relay_sock = socket.socketpair()
    relay_sock.setblocking(False)
    async with _idle_relay(CountingStream(relay_sock), peer_sock) as (relay, peer, peer_stream):
        counter = WriterSteps()
        trio.lowlevel.add_instrument(counter)
        try:
            relay.protocol.ping(b"interactive")
            relay.wake_writer()
            peer.receive_data(await peer_stream.receive_some())
            assert peer.events_received() == [ws.PingReceived(b"interactive")]
            await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert counter.steps == 1
