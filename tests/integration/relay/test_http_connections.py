"""The HTTP transports' connections on the relay (relay/http_front.py), raw on loopback.

A front end (nginx, haproxy) keeps connections to the relay alive and sends
whatever request comes next on one: each must be answered as on a fresh
connection. An opening request whose client is gone before its answer is
written must leave nothing behind in the relay (no session in its registry,
no held resumable session).
"""

from __future__ import annotations

import socket
import struct

import trio
import trio.testing

from wstunnel import mux
from wstunnel.framing import SESSION_HEADER, TRANSPORT_HEADER
from wstunnel.protocol import TunnelProtocol
from wstunnel.relay import Relay

from ..tunnel_helpers import LOOPBACK, relay_config, serving_relay

TIMEOUT = 10.0


_UPGRADE = "\r\n".join([
    "GET /tunnel HTTP/1.1", "Host: x", "Upgrade: websocket", "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
    "Sec-WebSocket-Protocol: wstunnel.v1", "", ""]).encode()


def _opening(mode: str = "polling", *headers: str) -> bytes:
    return "\r\n".join(["POST /tunnel HTTP/1.1", "Host: x", f"{TRANSPORT_HEADER}: {mode}",
                        "Content-Length: 0", *headers, "", ""]).encode()


def _post(session_id: str, body: bytes) -> bytes:
    """A polling POST (number 0) carrying ``body``."""
    return "\r\n".join([
        "POST /tunnel HTTP/1.1", "Host: x", f"{TRANSPORT_HEADER}: polling",
        f"{SESSION_HEADER}: {session_id}", "X-Wstunnel-Seq: 0",
        f"Content-Length: {len(body)}", "", ""]).encode() + body


async def _answer(stream: trio.SocketStream, buffered: bytearray) -> bytes:
    """One whole answer (head and its Content-Length body) from ``stream``; what
    comes after it stays in ``buffered``."""
    while b"\r\n\r\n" not in buffered:
        data = await stream.receive_some()
        assert data, f"closed with no answer after {bytes(buffered)!r}"
        buffered += data
    head_end = buffered.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(buffered[:head_end]).split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(buffered) < head_end + length:
        data = await stream.receive_some()
        assert data, f"closed in the middle of {bytes(buffered)!r}"
        buffered += data
    answer = bytes(buffered[:head_end + length])
    del buffered[:head_end + length]
    return answer


async def _open_session(port: int) -> str:
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(_opening())
        answer = (await _answer(stream, bytearray())).decode("latin-1")
    assert answer.startswith("HTTP/1.1 200 "), answer
    start = answer.lower().index(f"{SESSION_HEADER.lower()}: ") + len(SESSION_HEADER) + 2
    return answer[start:].split("\r\n", 1)[0]


def _first_records() -> bytes:
    opening = TunnelProtocol(mux.Role.AGENT, framed=True)
    opening.ping(b"x")
    return bytes(opening.data_to_send())


async def test_a_health_check_on_a_kept_alive_polling_connection_is_answered() -> None:
    """A front end that reuses a kept-alive polling connection for its health check
    (or any other request) gets the answer a fresh connection gets: 200 for
    /health (also with a body, or HTTP/1.0), 404 for another path, 426 for a plain
    GET of the tunnel path, 400 for bytes that are no request; an upgrade gets a 400
    that says to use a new connection (all of them used to get the connection closed)."""
    with trio.fail_after(TIMEOUT):
        async with serving_relay(Relay(relay_config())) as port:
            session_id = await _open_session(port)
            for request, status in [
                    (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b" 200 "),
                    (b"GET /health HTTP/1.0\r\n\r\n", b" 200 "),
                    (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi", b" 200 "),
                    (b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n", b" 404 "),
                    (b"GET /tunnel HTTP/1.1\r\nHost: x\r\n\r\n", b" 426 "),
                    (_UPGRADE, b" 400 "),  # (a fresh one would switch; this one says why not)
                    (b"NOT HTTP AT ALL\r\n\r\n", b" 400 ")]:
                async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                    buffered = bytearray()
                    await stream.send_all(_post(session_id, _first_records()))  # (2nd: a retry)
                    assert (await _answer(stream, buffered)).startswith(b"HTTP/1.1 200 ")
                    await stream.send_all(request)
                    answer = await _answer(stream, buffered)
                    assert answer.startswith(b"HTTP/1.1" + status), answer


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_an_opening_whose_client_is_gone_leaves_no_session_behind() -> None:
    """An opening POST whose client resets before the answer is written (the answer
    fails to send) leaves no session in the relay's registry and no held resumable
    session (they used to stay for the relay's lifetime)."""
    relay = Relay(relay_config(resume_grace=30.0))
    with trio.fail_after(TIMEOUT):
        async with serving_relay(relay) as port:
            for headers in [(), ("X-Wstunnel-Resume: new",)]:
                sock = socket.create_connection((LOOPBACK, port))
                sock.sendall(_opening("polling", *headers))
                _reset(sock)
                await trio.testing.wait_all_tasks_blocked(0.05)
                assert len(relay.http.sessions) == 0
                assert len(relay.held) == 0
            await _open_session(port)  # (the relay serves on; this one stays)
            assert len(relay.http.sessions) == 1


async def _send_chunks(stream: trio.SocketStream, head: bytes, total: int) -> None:
    """``head`` (chunked), then ``total`` bytes of body in 64 KiB chunks, unless the
    relay stops reading first (a refusal ends the connection after a bounded read)."""
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    try:
        await stream.send_all(head)
        for _ in range(total // 0x10000):
            await stream.send_all(chunk)
        await stream.send_all(b"0\r\n\r\n")
    except trio.BrokenResourceError:
        pass


async def test_a_request_body_the_relay_does_not_need_is_bounded() -> None:
    """An opening POST or a polling GET must have (next to) no body: a chunked one that
    goes on gets 413 once past a bound, instead of being read, and held in memory, to
    its end; a polling POST whose Content-Length is contradicted by a chunked
    Transfer-Encoding (unbounded, and a request-smuggling vector behind a proxy) gets
    400."""
    with trio.fail_after(TIMEOUT):
        async with serving_relay(Relay(relay_config())) as port:
            session_id = await _open_session(port)
            get = _post(session_id, b"").replace(b"POST", b"GET", 1)
            chunked = b"Transfer-Encoding: chunked"
            for head, status in [(_opening(), b" 413 "), (get, b" 413 "),
                                 (_post(session_id, b""), b" 400 ")]:
                framing = chunked if status == b" 413 " else b"Content-Length: 5\r\n" + chunked
                head = head.replace(b"Content-Length: 0", framing)
                async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_send_chunks, stream, head, 8 << 20)
                        answer = await _answer(stream, bytearray())
                        nursery.cancel_scope.cancel()
                assert answer.startswith(b"HTTP/1.1" + status), answer


async def test_an_upgrade_whose_client_is_gone_leaves_no_held_session_behind() -> None:
    """The same over WebSocket: a resumable session asked for by an upgrade whose
    client resets before the 101 is written is not held (it used to stay held, with
    no session and no expiry, for the relay's lifetime)."""
    relay = Relay(relay_config(resume_grace=30.0))
    upgrade = _UPGRADE.replace(b"\r\n\r\n", b"\r\nX-Wstunnel-Resume: new\r\n\r\n")
    with trio.fail_after(TIMEOUT):
        async with serving_relay(relay) as port:
            sock = socket.create_connection((LOOPBACK, port))
            sock.sendall(upgrade)
            _reset(sock)
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert len(relay.held) == 0


async def test_requests_still_open_when_their_session_ends_are_closed(
        autojump_clock: trio.abc.Clock) -> None:
    """A polling POST whose body stalls (its agent gone, the connection half-open) is
    closed when its session ends (here: no pong within the keepalive's timeout),
    not left open, with its task, for the relay's lifetime."""
    with trio.fail_after(600):
        async with serving_relay(Relay(relay_config(ping_interval=5.0, ping_timeout=5.0))) as port:
            session_id = await _open_session(port)
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                await stream.send_all(_post(session_id, b"x" * 100)[:-99])  # (1 of 100)
                buffered = bytearray()
                while data := await stream.receive_some():
                    buffered += data
            assert buffered == b""  # (closed: it had no answer to give)
