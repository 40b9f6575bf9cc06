"""An HTTP-transport session serves at most MAX_REQUESTS_IN_PROGRESS requests at once
(docs/SECURITY.md, "Memory per session"): polling POSTs whose bodies never finish
would otherwise each hold up to MAX_POST_SIZE in the relay, as many as an agent sends."""

from __future__ import annotations

import trio
import trio.testing

from wstunnel.framing import SESSION_HEADER, TRANSPORT_HEADER
from wstunnel.relay import Relay
from wstunnel.relay.http_front import MAX_POST_SIZE
from wstunnel.relay.http_sessions import MAX_REQUESTS_IN_PROGRESS

from ..tunnel_helpers import LOOPBACK, relay_config

TIMEOUT = 10.0


def _request(method: str, session_id: str | None, length: int) -> bytes:
    lines = [f"{method} /tunnel HTTP/1.1", "Host: x", f"{TRANSPORT_HEADER}: polling",
             "X-Wstunnel-Seq: 0", f"Content-Length: {length}"]
    if session_id is not None:
        lines.append(f"{SESSION_HEADER}: {session_id}")
    return "\r\n".join([*lines, "", ""]).encode()


async def _head(stream: trio.SocketStream) -> str:
    """The status line and headers of the answer on ``stream``."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = await stream.receive_some()
        assert got, f"closed with no answer after {data!r}"
        data += got
    return data.partition(b"\r\n\r\n")[0].decode("latin-1")


async def test_requests_in_progress_per_session_are_capped() -> None:
    """MAX_REQUESTS_IN_PROGRESS polling POSTs whose MAX_POST_SIZE bodies stall: the next request
    of that session is answered 429 at once; once one of them goes, requests are
    served again."""
    relay = Relay(relay_config())
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
            await nursery.start(trio.serve_listeners, relay.handle_connection, listeners)
            port = listeners[0].socket.getsockname()[1]
            async with await trio.open_tcp_stream(LOOPBACK, port) as opening:
                await opening.send_all(_request("POST", None, 0))
                head = await _head(opening)
            start = head.lower().index(f"{SESSION_HEADER.lower()}: ") + len(SESSION_HEADER) + 2
            session_id = head[start:].split("\r\n")[0]
            stalled = []
            for _ in range(MAX_REQUESTS_IN_PROGRESS):
                stream = await trio.open_tcp_stream(LOOPBACK, port)
                await stream.send_all(_request("POST", session_id, MAX_POST_SIZE)
                                      + bytes(1024))
                stalled.append(stream)
            await trio.testing.wait_all_tasks_blocked(0.05)
            async with await trio.open_tcp_stream(LOOPBACK, port) as one_more:
                await one_more.send_all(_request("GET", session_id, 0))
                head = await _head(one_more)
                assert head.startswith("HTTP/1.1 429 "), head
            await stalled.pop().aclose()
            await trio.testing.wait_all_tasks_blocked(0.05)
            async with await trio.open_tcp_stream(LOOPBACK, port) as again:
                await again.send_all(_request("GET", session_id, 0))  # (SETTINGS wait)
                assert (await _head(again)).startswith("HTTP/1.1 200 ")
            for stream in stalled:
                await stream.aclose()
            nursery.cancel_scope.cancel()
