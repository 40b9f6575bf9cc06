"""max_sessions_per_agent on the relay, raw on loopback: openings racing each other.

The limit is checked when a login passes, and the place it grants is taken in
that same step: a session that is still being opened (its body not yet read,
its 101 not yet sent) counts. Openings that fail give their place back.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from wstunnel import mux
from wstunnel.framing import SESSION_HEADER, TRANSPORT_HEADER
from wstunnel.protocol import TunnelProtocol
from wstunnel.relay import Relay

from ..security_helpers import account
from ..tunnel_helpers import LOOPBACK, relay_config, serving_relay

TIMEOUT = 10.0
ENTRY, TOKEN = account("a1", LOOPBACK)
_LOGIN = f"Authorization: Bearer {TOKEN}"
_UPGRADE = "\r\n".join([
    "GET /tunnel HTTP/1.1", "Host: x", "Upgrade: websocket", "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
    "Sec-WebSocket-Protocol: wstunnel.v1", _LOGIN, "", ""]).encode()


def _limited_relay(**overrides: object) -> Relay:
    return Relay(relay_config(no_auth=False, allow=(), agents=(ENTRY,),
                              max_sessions_per_agent=1, **overrides))


def _opening(body: bytes = b"", *headers: str) -> bytes:
    """An opening POST (polling) whose Content-Length announces ``body``, without it."""
    return "\r\n".join(["POST /tunnel HTTP/1.1", "Host: x", f"{TRANSPORT_HEADER}: polling",
                        _LOGIN, f"Content-Length: {len(body)}", *headers, "", ""]).encode()


async def _status(stream: trio.SocketStream) -> bytes:
    """The status code of the answer on ``stream`` (b"" when it closed with none)."""
    head = bytearray()
    while b"\r\n" not in head:
        data = await stream.receive_some()
        if not data:
            break
        head += data
    return bytes(head[9:12])


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@asynccontextmanager
async def _connected(port: int, count: int) -> AsyncIterator[list[trio.SocketStream]]:
    """``count`` connections to the relay, closed at the end."""
    streams: list[trio.SocketStream] = []
    try:
        for _ in range(count):
            streams.append(await trio.open_tcp_stream(LOOPBACK, port))
        yield streams
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def test_http_openings_whose_bodies_come_late_pass_the_limit_once() -> None:
    """Five HTTP-transport openings of one agent (limit 1) all logged in before any of
    their bodies arrives: exactly one gets a session (200), the others 429; the
    relay holds one session (it used to let all five in)."""
    relay = _limited_relay()
    with trio.fail_after(TIMEOUT):
        async with serving_relay(relay) as port:
            async with _connected(port, 5) as streams:
                for stream in streams:
                    await stream.send_all(_opening(b"x"))
                await trio.testing.wait_all_tasks_blocked(0.05)  # (every login has passed)
                for stream in streams:  # (a refused one's is read and dropped)
                    await stream.send_all(b"x")
                statuses = sorted([await _status(stream) for stream in streams])
                assert statuses == [b"200", b"429", b"429", b"429", b"429"]
                await trio.testing.wait_all_tasks_blocked(0.05)
                assert (len(relay.stats.sessions), relay.stats.sessions_total) == (1, 1)


async def test_upgrades_in_a_burst_pass_the_limit_once() -> None:
    """A burst of five upgrades of one agent (limit 1), read by the relay together, gets
    exactly one 101 and four 429s, round after round."""
    relay = _limited_relay()
    with trio.fail_after(TIMEOUT):
        async with serving_relay(relay) as port:
            for _ in range(10):
                async with _connected(port, 5) as streams:
                    for stream in streams:
                        await stream.send_all(_UPGRADE)
                    statuses = sorted([await _status(stream) for stream in streams])
                    assert statuses == [b"101", b"429", b"429", b"429", b"429"]
                while relay.stats.sessions:  # (the session is down: its place is free)
                    await trio.testing.wait_all_tasks_blocked(0.01)


async def test_an_opening_that_fails_gives_its_place_back() -> None:
    """Openings that got past the limit and then failed (the client gone before its
    body, an upgrade's client gone at once, an opening whose body does not come
    within handshake_timeout) do not keep the agent's one place: the next opening
    gets a session."""
    relay = _limited_relay(handshake_timeout=0.5, resume_grace=30.0)
    resumable = "X-Wstunnel-Resume: new"
    failures = [_opening(b"x"), _opening(b"x", resumable), _UPGRADE,
                _UPGRADE.replace(b"\r\n\r\n", f"\r\n{resumable}\r\n\r\n".encode())]
    with trio.fail_after(TIMEOUT):
        async with serving_relay(relay) as port:
            for request in failures:
                sock = socket.create_connection((LOOPBACK, port))
                sock.sendall(request)
                if request.startswith(b"POST"):  # (logged in, waiting for the body)
                    await trio.testing.wait_all_tasks_blocked(0.05)
                _reset(sock)
                await trio.testing.wait_all_tasks_blocked(0.05)
            async with await trio.open_tcp_stream(LOOPBACK, port) as stalled:
                await stalled.send_all(_opening(b"x"))  # (its body never comes)
                assert await _status(stalled) == b""  # (closed after handshake_timeout)
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                await stream.send_all(_opening())
                assert await _status(stream) == b"200"
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert len(relay.stats.sessions) == 1 and len(relay.held) == 0


async def test_a_session_gives_its_place_back_when_it_ends() -> None:
    """An HTTP-transport session the agent closed gives its place back at once, not
    after the relay's last bytes for it had their time to be fetched (LINGER_TIMEOUT):
    the agent's next opening gets a session."""
    relay = _limited_relay()
    closing = TunnelProtocol(mux.Role.AGENT, framed=True)
    closing.close()
    body = bytes(closing.data_to_send())
    with trio.fail_after(TIMEOUT):
        async with serving_relay(relay) as port:
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                await stream.send_all(_opening())
                answer = (await stream.receive_some()).decode("latin-1")
            start = answer.lower().index(f"{SESSION_HEADER.lower()}: ") + len(SESSION_HEADER) + 2
            session_id = answer[start:].split("\r\n", 1)[0]
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                await stream.send_all("\r\n".join([
                    "POST /tunnel HTTP/1.1", "Host: x", f"{TRANSPORT_HEADER}: polling", _LOGIN,
                    f"{SESSION_HEADER}: {session_id}", "X-Wstunnel-Seq: 0",
                    f"Content-Length: {len(body)}", "", ""]).encode() + body)
                assert await _status(stream) == b"200"
            while relay.stats.sessions:
                await trio.testing.wait_all_tasks_blocked(0.01)
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                await stream.send_all(_opening())
                assert await _status(stream) == b"200"
