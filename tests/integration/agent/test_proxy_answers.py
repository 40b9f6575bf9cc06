"""What the agent says about a proxy's answer to CONNECT, one line per way it goes wrong."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from wstunnel.agent import transports
from wstunnel.agent.connect import open_websocket
from wstunnel.agent.proxy import ProxyDialer, ProxyError
from wstunnel.agent.transports import Opened, Request, TransportChooser
from wstunnel.config import AgentConfig
from wstunnel.config.proxy_url import parse_proxy_url
from wstunnel.errors import HandshakeError

TIMEOUT = 5


async def _dial_through(answer: bytes) -> ProxyError:
    """The ProxyError from a CONNECT to a proxy that answers ``answer``, then closes."""

    async def proxy(stream: trio.SocketStream) -> None:
        async with stream:
            seen = b""
            while b"\r\n\r\n" not in seen:
                seen += await stream.receive_some()
            await stream.send_all(answer)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, proxy, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(ProxyError) as caught:
                await ProxyDialer(parse_proxy_url(f"http://127.0.0.1:{port}"))(
                    "relay.example.com", 443)
            nursery.cancel_scope.cancel()
    return caught.value


async def test_a_proxy_that_closes_without_answering_is_not_called_a_non_http_proxy() -> None:
    """A proxy that hangs up on CONNECT (a filter dropping the destination) is named as
    such, not as something that does not speak HTTP."""
    error = await _dial_through(b"")
    assert "closed the connection without answering CONNECT to relay.example.com:443" in str(
        error)
    assert "not HTTP" not in str(error)


async def test_a_proxy_that_sends_half_an_answer_or_garbage_is_not_http() -> None:
    """Bytes that are not an HTTP answer (a SOCKS or SSH server on that port) say so."""
    for answer in (b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.1 200 Conn"):
        assert "something that is not HTTP" in str(await _dial_through(answer))


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_a_proxy_that_cannot_reach_the_relay_is_not_a_reason_to_fall_back(
        status: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """ws:// through a proxy that answers CONNECT 500 (tinyproxy)/502/503/504 (the relay
    is down or unreachable from it): the agent says so, once, instead of calling it a refused
    CONNECT and trying HTTP streaming and polling, which cannot pass either."""
    tried: list[str] = []

    async def attempt(request: Request, name: str) -> Opened:
        await trio.sleep(0)
        tried.append(name)
        raise ProxyError("the proxy ... could not connect to the relay", status)

    monkeypatch.setattr(transports, "_attempt", attempt)
    config = AgentConfig(relay="ws://127.0.0.1:9/tunnel", proxy="none")
    with pytest.raises(ProxyError):
        await TransportChooser().open(Request(config, config.relay_url, None, [], None))
    assert tried == ["websocket"]


async def test_forwarding_through_an_http_1_0_proxy_that_closes_after_each_answer() -> None:
    """The first forwarded connection's probe (GET /health) through a proxy that closes
    after every answer (HTTP/1.0, no keep-alive) is not "closed after the login": there
    was none, and a fresh connection carries the tunnel's request."""
    requests: list[bytes] = []

    async def proxy(stream: trio.SocketStream) -> None:
        async with stream:
            seen = b""
            while b"\r\n\r\n" not in seen:
                seen += await stream.receive_some()
            requests.append(seen.split(b"\r\n", 1)[0])
            await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, proxy, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            dialer = ProxyDialer(parse_proxy_url(f"http://127.0.0.1:{port}"))
            stream = await dialer.open_forwarding("http://relay.example.com:8080/health")
            await stream.send_all(b"POST http://relay.example.com:8080/tunnel HTTP/1.1\r\n"
                                  b"Host: relay.example.com:8080\r\n\r\n")
            assert await stream.receive_some() == b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert requests == [b"GET http://relay.example.com:8080/health HTTP/1.1",
                        b"POST http://relay.example.com:8080/tunnel HTTP/1.1"]


async def test_a_proxy_that_closes_right_after_accepting_connect_is_explained() -> None:
    """wss:// through a proxy that answers 200 and then hangs up (it accepted CONNECT
    before reaching the relay): one line that names the hang-up, not an OpenSSL EOF."""

    async def proxy(stream: trio.SocketStream) -> None:
        async with stream:
            seen = b""
            while b"\r\n\r\n" not in seen:
                seen += await stream.receive_some()
            await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await stream.receive_some()  # (the TLS hello, read so closing is a FIN, not a reset)

    relay = AgentConfig(relay="wss://relay.example.com/tunnel", proxy="none").relay_url
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, proxy, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            dialer = ProxyDialer(parse_proxy_url(f"http://127.0.0.1:{port}"))
            with pytest.raises(HandshakeError) as caught:
                await open_websocket(relay, dial=dialer)
            nursery.cancel_scope.cancel()
    assert str(caught.value) == (
        "wss://relay.example.com:443/tunnel: the connection closed during the TLS handshake: "
        "the relay, or a proxy or firewall on the path, hung up (a proxy may accept CONNECT "
        "and then fail to reach the relay)")
