"""NTLM and Negotiate proxy logins (agent/proxy_auth.py) against a real NTLM server.

The proxy here is a small one written for the test; its login side is
pyspnego's NTLM acceptor (the same library the agent uses, run as a server,
with its credential file in NTLM_USER_FILE), so the challenge the agent
answers is a real NTLM challenge and a wrong password is refused by real NTLM
verification. After the login, CONNECT opens a byte pipe and other requests
are forwarded one by one to the relay. What is not tested: Kerberos (no KDC
here: Negotiate falls back to NTLM inside SPNEGO, which is tested), and
commercial proxies' quirks.
"""

from __future__ import annotations

import base64
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from ..log_watch import LogWatch
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_handler,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
)

spnego = pytest.importorskip("spnego", reason="pyspnego (the ntlm extra) is not installed")

USER, PASSWORD = "DOM\\alice", "s3cret"
TIMEOUT = 30


class NtlmProxy:
    """An HTTP proxy that logs connections in with ``scheme`` (NTLM or Negotiate)."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.logins = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        server: Any = None
        while True:
            request, body = await _read(stream, conn)
            if request is None:
                return
            authorization = _header(request, b"proxy-authorization")
            if server is None or not server.complete:
                if not authorization or not authorization.startswith(self.scheme + " "):
                    server = spnego.server(protocol=self.scheme.lower())
                    await _reply(stream, conn, 407, [(b"Proxy-Authenticate", self.scheme)])
                    continue
                token = base64.b64decode(authorization.split(" ", 1)[1])
                try:
                    out = server.step(token)
                except spnego.exceptions.SpnegoError:
                    server = None
                    await _reply(stream, conn, 407, [(b"Proxy-Authenticate", self.scheme)])
                    continue
                if not server.complete:
                    value = f"{self.scheme} {base64.b64encode(out).decode()}"
                    await _reply(stream, conn, 407, [(b"Proxy-Authenticate", value)])
                    continue
                self.logins += 1
            if request.method == b"CONNECT":
                await self._tunnel(stream, conn, request)
                return
            await self._forward(stream, conn, request, body)

    async def _tunnel(self, stream: trio.SocketStream, conn: h11.Connection,
                      request: h11.Request) -> None:
        host, _, port = request.target.decode().rpartition(":")
        upstream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])))
        leftover = conn.trailing_data[0]
        async with upstream:
            if leftover:
                await upstream.send_all(leftover)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy, stream, upstream, nursery.cancel_scope)
                nursery.start_soon(_copy, upstream, stream, nursery.cancel_scope)

    async def _forward(self, stream: trio.SocketStream, conn: h11.Connection,
                       request: h11.Request, body: bytes) -> None:
        """One request to the origin (origin form, no proxy headers), its answer back."""
        rest = request.target.decode().partition("://")[2]
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.rpartition(":")
        headers = [(n, v) for n, v in request.headers
                   if not n.startswith(b"proxy-") and n != b"connection"]
        async with await trio.open_tcp_stream(host, int(port)) as upstream:
            client = h11.Connection(h11.CLIENT)
            data = client.send(h11.Request(method=request.method, target="/" + path,
                                           headers=headers))
            if body:
                data += client.send(h11.Data(data=body))
            await upstream.send_all(data + client.send(h11.EndOfMessage()))
            answer, answer_body = await _read(upstream, client)
        assert isinstance(answer, h11.Response)
        kept = [(n, v) for n, v in answer.headers if n not in (b"connection",)]
        await stream.send_all(conn.send(h11.Response(status_code=answer.status_code,
                                                     headers=kept))
                              + conn.send(h11.Data(data=answer_body))
                              + conn.send(h11.EndOfMessage()))
        conn.start_next_cycle()


async def _read(stream: trio.SocketStream, conn: h11.Connection) -> tuple[Any, bytes]:
    """One whole message (head and body); (None, b"") when the peer closed."""
    head: Any = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, (h11.Request, h11.Response)):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return head, body
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def _reply(stream: trio.SocketStream, conn: h11.Connection, status: int,
                 headers: list[tuple[bytes, Any]]) -> None:
    body = b"login required\n"
    await stream.send_all(
        conn.send(h11.Response(status_code=status, headers=[
            *headers, (b"Content-Length", str(len(body)))]))
        + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    conn.start_next_cycle()


async def _copy(source: trio.abc.Stream, sink: trio.abc.Stream, scope: trio.CancelScope) -> None:
    try:
        async for data in source:
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


@pytest.fixture
def ntlm_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The proxy's credential store (pyspnego's NTLM_USER_FILE) and the agent's
    password file."""
    store = tmp_path / "ntlm-users"
    store.write_text("DOM:alice:s3cret\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(store))
    password = tmp_path / "proxy-password"
    password.write_text(PASSWORD + "\n")
    return password


async def _echo(port: int) -> None:
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(b"through the NTLM proxy")
        echoed = b""
        while len(echoed) < 22:
            data = await stream.receive_some()
            assert data
            echoed += data
        assert echoed == b"through the NTLM proxy"


@pytest.mark.parametrize(("scheme", "transport"), [
    ("NTLM", "websocket"), ("Negotiate", "websocket"), ("NTLM", "polling")])
async def test_proxy_login_with_a_real_challenge(scheme: str, transport: str,
                                                 ntlm_users: Path) -> None:
    """The proxy offers only ``scheme``: the agent logs in on the kept-alive connection
    (three steps), then carries the session: WebSocket through CONNECT, polling through
    forwarded requests on connections it logged in first."""
    proxy = NtlmProxy(scheme)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            listeners = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0,
                                                    host=LOOPBACK))
            proxy_port = listeners[0].socket.getsockname()[1]
            config = agent_config(relay.ports[0], [target], transport=transport,
                                  proxy=f"http://DOM%5Calice@{LOOPBACK}:{proxy_port}",
                                  proxy_password_file=str(ntlm_users))
            agent = await start_agent(nursery, config)
            await _echo(agent.ports[0])
            nursery.cancel_scope.cancel()
    assert proxy.logins >= 1


async def test_a_wrong_password_is_refused_and_named(ntlm_users: Path, tmp_path: Path,
                                                    logs: LogWatch) -> None:
    """Real NTLM verification refuses a wrong password: the agent's line names the
    scheme and the user, never the password."""
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    proxy = NtlmProxy("NTLM")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0,
                                                    host=LOOPBACK))
            proxy_port = listeners[0].socket.getsockname()[1]
            config = agent_config(9, [9], transport="websocket",
                                  proxy=f"http://DOM%5Calice@{LOOPBACK}:{proxy_port}",
                                  proxy_password_file=str(wrong))
            await start_agent(nursery, config)
            line = await logs.wait_for("(attempt 1)")
            nursery.cancel_scope.cancel()
    assert "rejected the NTLM login of user 'DOM\\\\alice' (407" in line
    assert "not-the-password" not in "\n".join(logs.lines)
    assert proxy.logins == 0
