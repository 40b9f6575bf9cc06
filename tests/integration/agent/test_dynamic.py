"""``-D``: real curl through the agent's SOCKS5/HTTP proxy to local HTTP and HTTPS servers."""

from __future__ import annotations

import os
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import trio

from wstunnel.addresses import HostPort
from wstunnel.config import Forward

from ..log_watch import LogWatch
from ..real_peers import Pki
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    receive_all,
    relay_config,
    start_agent,
    start_relay,
)

BODY = os.urandom(200_000).hex().encode()  # 400 KB: several records and pump turns
FORBIDDEN = "192.0.2.1"  # TEST-NET-1: outside the test relay's policy (127.0.0.1 only)
CURL_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


async def _http_handler(seen: list[bytes], stream: trio.abc.Stream) -> None:
    """A one-request HTTP/1.1 server: records the request head, answers BODY."""
    head = b""
    with trio.move_on_after(5):
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(65536)
            if not data:
                return
            head += data
    seen.append(head)
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                          % len(BODY) + BODY)
    await stream.aclose()


@asynccontextmanager
async def _setup(pki: Pki, **forward: object) -> AsyncIterator[tuple[int, int, int, list[bytes]]]:
    """(proxy port, http port, https port, request heads seen by the servers)."""
    seen: list[bytes] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert, pki.key)
    async with trio.open_nursery() as nursery:
        handler = partial(_http_handler, seen)
        http = await nursery.start(partial(trio.serve_tcp, handler, 0, host=LOOPBACK))
        https = await nursery.start(partial(trio.serve_ssl_over_tcp, handler, 0, context,
                                            host=LOOPBACK))
        relay = await start_relay(nursery, relay_config())
        dynamic = Forward.dynamic(HostPort(LOOPBACK, 0), **forward)  # type: ignore[arg-type]
        agent = await start_agent(nursery, replace(agent_config(relay.ports[0], []),
                                                   forwards=(dynamic,)))
        try:
            yield (agent.ports[0], http[0].socket.getsockname()[1],
                   https[0].transport_listener.socket.getsockname()[1], seen)
        finally:
            agent.stop.set()
            relay.stop.set()
            await agent.finished.wait()
            await relay.finished.wait()
            nursery.cancel_scope.cancel()


async def _curl(*args: str) -> tuple[int, bytes, bytes]:
    with trio.fail_after(20):
        done = await trio.run_process(["curl", "-sS", "--max-time", "15", *args],
                                      capture_stdout=True, capture_stderr=True, check=False,
                                      env=CURL_ENV)
    return done.returncode, done.stdout, done.stderr


async def test_curl_socks5_hostname_and_http_proxy_fetch_by_name(pki: Pki) -> None:
    """curl through -D reaches HTTP and HTTPS servers by the name "localhost", resolved
    by the relay: SOCKS5 (--socks5-hostname), HTTP CONNECT (https://) and a plain
    absolute-form GET (http://), which reaches the server in origin form; each body
    arrives byte-exact."""
    async with _setup(pki) as (proxy, http, https, seen):
        ca = ("--cacert", str(pki.ca))
        for args in (("--socks5-hostname", f"localhost:{proxy}", f"http://localhost:{http}/a"),
                     ("--socks5-hostname", f"localhost:{proxy}", *ca,
                      f"https://localhost:{https}/b"),
                     ("-x", f"http://127.0.0.1:{proxy}", *ca, f"https://localhost:{https}/c"),
                     ("-x", f"http://127.0.0.1:{proxy}", f"http://localhost:{http}/d?q=1")):
            code, out, err = await _curl(*args)
            assert (code, err) == (0, b""), args
            assert out == BODY, args
        assert seen[-1].startswith(b"GET /d?q=1 HTTP/1.1\r\n")
        assert b"\r\nConnection: close\r\n" in seen[-1]
        assert b"proxy-connection" not in seen[-1].lower()


async def test_a_destination_outside_the_relay_policy_is_not_allowed(
        pki: Pki, logs: LogWatch) -> None:
    """A destination the relay's policy refuses: curl reports SOCKS5 "not allowed"
    (reply 0x02) and HTTP 403 with a one-line body, and the relay logs the refusal."""
    async with _setup(pki) as (proxy, _, _, _):
        code, _, err = await _curl("--socks5-hostname", f"127.0.0.1:{proxy}",
                                   f"http://{FORBIDDEN}:80/")
        # (curl 7.88 shows the reply code, "(2)"; newer ones say "not allowed")
        assert code == 97 and (b"(2)" in err or b"not allowed" in err), err
        await logs.wait_for("not allowed by the relay's policy")
        code, out, err = await _curl("-x", f"http://127.0.0.1:{proxy}", "-w", "%{http_code}",
                                     "-o", "/dev/null", f"http://{FORBIDDEN}:80/")
        assert out == b"403"
        code, out, err = await _curl("-x", f"http://127.0.0.1:{proxy}", "-p",
                                     f"https://{FORBIDDEN}:443/")
        assert code == 56 and b"403" in err, err


async def _socks5_login(port: int, user: bytes, password: bytes, host: bytes,
                        target_port: int) -> tuple[bytes, trio.SocketStream]:
    """A Firefox-style SOCKS5 handshake (offers no-auth and username/password)."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    await stream.send_all(b"\x05\x02\x00\x02")
    answer = await _receive_exactly(stream, 2)
    assert answer == b"\x05\x02"
    await stream.send_all(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
    login = await _receive_exactly(stream, 2)
    if login != b"\x01\x00":
        return login, stream
    await stream.send_all(b"\x05\x01\x00\x03" + bytes([len(host)]) + host
                          + struct.pack("!H", target_port))
    return await _receive_exactly(stream, 10), stream


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = await stream.receive_some(size - len(data))
        if not piece:
            break
        data += piece
    return data


async def test_socks5_username_password_login(pki: Pki, tmp_path: Path) -> None:
    """With a users file, a SOCKS5 client that logs in (RFC 1929) gets its
    destination, and bytes sent right behind the request are not lost; a wrong
    password gets 1 1 and the connection closed; curl's HTTP proxy login works."""
    users = frozenset({("alice", "s3cret")})
    async with _setup(pki, users=users) as (proxy, http, _, seen):
        with trio.fail_after(10):
            reply, stream = await _socks5_login(proxy, b"alice", b"s3cret", b"localhost", http)
            assert reply[:2] == b"\x05\x00"
            await stream.send_all(b"GET /e HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = b""
            while piece := await stream.receive_some(65536):
                response += piece
            assert response.endswith(BODY) and seen[-1].startswith(b"GET /e ")
            await stream.aclose()
            reply, stream = await _socks5_login(proxy, b"alice", b"wrong", b"localhost", http)
            assert reply == b"\x01\x01"
            assert await stream.receive_some(10) == b""
            await stream.aclose()
        code, out, _ = await _curl("-x", f"http://alice:s3cret@127.0.0.1:{proxy}",
                                   f"http://localhost:{http}/f")
        assert (code, out) == (0, BODY)
        code, out, _ = await _curl("-x", f"http://alice:nope@127.0.0.1:{proxy}", "-w",
                                   "%{http_code}", "-o", "/dev/null",
                                   f"http://localhost:{http}/g")
        assert out == b"407"


async def test_socks4a_by_name(pki: Pki) -> None:
    """SOCKS4a (name in the request, resolved by the relay): 0x5A once connected."""
    async with _setup(pki) as (proxy, http, _, seen):
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(LOOPBACK, proxy)
            await stream.send_all(b"\x04\x01" + struct.pack("!H", http) + b"\0\0\0\x01user\0"
                                  + b"localhost\0" + b"GET /h HTTP/1.1\r\n\r\n")
            reply = await _receive_exactly(stream, 8)
            assert reply[:2] == b"\x00\x5a"
            response = b""
            while piece := await stream.receive_some(65536):
                response += piece
            assert response.endswith(BODY) and seen[-1].startswith(b"GET /h ")
            await stream.aclose()


async def _ask_and_read_to_end(port: int, request: bytes) -> bytes:
    """Send ``request`` to the proxy, read until it closes; a reset fails the test."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    try:
        await stream.send_all(request)
        return await receive_all(stream)
    finally:
        await stream.aclose()


async def test_no_session_is_answered_in_the_clients_protocol() -> None:
    """With no session to the relay (none within connect_wait_timeout), each client
    still hears a failure in its own protocol (SOCKS5 0x01, SOCKS4 0x5B, HTTP 502),
    then a clean close, rather than a connection reset."""
    with trio.socket.socket() as unused:  # (a port nothing listens on: refused at once)
        await unused.bind((LOOPBACK, 0))
        relay_port = unused.getsockname()[1]
        async with trio.open_nursery() as nursery:
            agent = await start_agent(nursery, replace(
                agent_config(relay_port, [], connect_wait_timeout=0.2),
                forwards=(Forward.dynamic(HostPort(LOOPBACK, 0)),)))
            try:
                with trio.fail_after(10):
                    socks5 = await _ask_and_read_to_end(
                        agent.ports[0], b"\x05\x01\x00" + b"\x05\x01\x00\x03\x09localhost\x00\x50")
                    assert socks5 == b"\x05\x00" + b"\x05\x01\x00\x01" + bytes(6)
                    socks4 = await _ask_and_read_to_end(
                        agent.ports[0], b"\x04\x01\x00\x50\0\0\0\x01\0localhost\0")
                    assert socks4 == b"\x00\x5b" + bytes(6)
                    http = await _ask_and_read_to_end(
                        agent.ports[0], b"CONNECT localhost:80 HTTP/1.1\r\n\r\n")
                    assert http.startswith(b"HTTP/1.1 502 ")
                    assert b"see the agent's log" in http  # (not "the relay could not")
            finally:
                agent.stop.set()
                await agent.finished.wait()


async def test_a_pipelined_request_never_reaches_the_first_requests_server() -> None:
    """A plain HTTP request through -D reaches its server with its body; requests the
    client pipelines behind it, in the same write or later, with its proxy login, do
    not (they could be for another host): the server sees one request, and the client
    gets its answer and a clean end."""
    received = bytearray()
    answered = trio.Event()

    async def server(stream: trio.SocketStream) -> None:
        while b"hello" not in received:  # (the head and the 5-byte body)
            data = await stream.receive_some(65536)
            if not data:
                return
            received.extend(data)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                              b"Connection: close\r\n\r\nok")
        answered.set()
        while data := await stream.receive_some(65536):  # (all else, until the EOF)
            received.extend(data)
        await stream.aclose()

    login = b"Proxy-Authorization: Basic c2VjcmV0\r\n\r\n"
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server, 0, host=LOOPBACK))
        url = b"http://%s:%d" % (LOOPBACK.encode(), listeners[0].socket.getsockname()[1])
        relay = await start_relay(nursery, relay_config())
        agent = await start_agent(nursery, replace(
            agent_config(relay.ports[0], []), forwards=(Forward.dynamic(HostPort(LOOPBACK, 0)),)))
        try:
            with trio.fail_after(10):
                client = await trio.open_tcp_stream(LOOPBACK, agent.ports[0])
                await client.send_all(b"POST " + url + b"/one HTTP/1.1\r\nContent-Length: 5\r\n"
                                      b"\r\nhello" + b"GET " + url + b"/two HTTP/1.1\r\n" + login)
                await answered.wait()
                await client.send_all(b"GET " + url + b"/three HTTP/1.1\r\n" + login)
                await client.send_eof()
                answer = await receive_all(client)
                await client.aclose()
            assert answer.endswith(b"\r\n\r\nok")
            assert bytes(received) == (b"POST /one HTTP/1.1\r\nHost: " + url[7:] +
                                       b"\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        finally:
            agent.stop.set()
            relay.stop.set()
            await agent.finished.wait()
            await relay.finished.wait()
            nursery.cancel_scope.cancel()
