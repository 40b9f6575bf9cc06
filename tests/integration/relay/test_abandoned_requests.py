"""Requests whose client gave up before the relay read them are dropped, not acted on.

A relay stopped (SIGSTOP, a long GC pause, a swapped-out host) for longer than
the agent's handshake timeout finds, when it continues, the agent's abandoned
resume attempts and new-session requests in its backlog: the kernel accepted
them and kept their bytes, then the client's FIN. Each test hands the relay
such a connection (request and FIN sent before the relay accepts it: no race)
and checks that no session is opened, resumed or taken from its carrier, and
that the relay serves the next agent as usual.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from wstunnel.framing import TRANSPORT_HEADER
from wstunnel.relay import Relay
from wstunnel.relay.upgrade import read_request
from wstunnel.replay import RESUMABLE_HEADER, RESUME_HEADER, parse_ticket

from ..log_watch import LogWatch
from ..security_helpers import write_self_signed
from ..tunnel_helpers import LOOPBACK, http_status, relay_config, serving_relay

TIMEOUT = 5.0
GAVE_UP = "the client gave up before the answer; ignored"
#: What the relay logs when it acts on a request: a new session (upgrade, HTTP), a resume;
#: or when it fails on the way (under TLS the stream itself may notice the FIN late).
ACTED = ("session up for agent", "session for agent", "resumes its session",
         "TLS handshake failed")


def _upgrade(resume: str = "new") -> bytes:
    return ("GET /tunnel HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: wstunnel.v1\r\n"
            f"{RESUME_HEADER}: {resume}\r\n\r\n").encode()


def _opening(mode: str) -> bytes:
    return (f"POST /tunnel HTTP/1.1\r\nHost: relay\r\n{TRANSPORT_HEADER}: {mode}\r\n"
            f"{RESUME_HEADER}: new\r\nContent-Length: 0\r\n\r\n").encode()


def _relay() -> Relay:
    return Relay(relay_config(resume_grace=60.0))


class _FirstLine(logging.Handler):
    """Catches the first wstunnel log line, from now on, that contains one of ``texts``."""

    def __init__(self, *texts: str) -> None:
        super().__init__(logging.DEBUG)
        self.texts = texts
        self.line = ""
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if not self.seen.is_set() and any(text in line for text in self.texts):
            self.line = line
            self.seen.set()


@contextmanager
def _first_decision() -> Iterator[_FirstLine]:
    """Catches what the relay does first with a request: ignore it, or act on it."""
    catch = _FirstLine(GAVE_UP, *ACTED)
    logging.getLogger("wstunnel").addHandler(catch)
    try:
        yield catch
    finally:
        logging.getLogger("wstunnel").removeHandler(catch)


async def _ignored(catch: _FirstLine) -> None:
    await catch.seen.wait()
    assert GAVE_UP in catch.line, f"the relay did not ignore an abandoned request: {catch.line!r}"


async def _abandoned(relay: Relay, request: bytes) -> None:
    """Hand the relay a connection whose client sent ``request`` and ended its side
    before the relay accepted it (what a stopped relay finds in its backlog): it must
    say it ignored it before it does anything else (the ``logs`` fixture: DEBUG on)."""
    listener = (await trio.open_tcp_listeners(0, host=LOOPBACK))[0]
    with _first_decision() as catch:
        async with listener, trio.open_nursery() as nursery:
            client = await trio.open_tcp_stream(LOOPBACK, listener.socket.getsockname()[1])
            async with client:
                await client.send_all(request)
                await client.send_eof()
                nursery.start_soon(relay.handle_connection, await listener.accept())
                await _ignored(catch)
                nursery.cancel_scope.cancel()  # (the relay's handler has returned already)


async def _serves_an_agent(relay: Relay, logs: LogWatch) -> None:
    async with serving_relay(relay) as port:
        assert await http_status(port, _upgrade()) == 101
        await logs.wait_for("session up for agent")


async def test_an_abandoned_upgrade_opens_no_session(logs: LogWatch) -> None:
    relay = _relay()
    with trio.fail_after(TIMEOUT):
        await _abandoned(relay, _upgrade())
        assert any(GAVE_UP in line for line in logs.lines)
        assert not any("session up" in line for line in logs.lines)
        assert len(relay.held) == 0 and not relay.sessions
        await _serves_an_agent(relay, logs)


async def test_an_abandoned_http_opening_opens_no_session(logs: LogWatch) -> None:
    relay = _relay()
    with trio.fail_after(TIMEOUT):
        for mode in ("streaming", "polling"):
            await _abandoned(relay, _opening(mode))
            assert len(relay.http.sessions) == 0 and len(relay.held) == 0
        assert sum(GAVE_UP in line for line in logs.lines) == 2
        assert not any("session for agent" in line for line in logs.lines)
        await _serves_an_agent(relay, logs)


async def test_an_abandoned_resume_leaves_the_session_on_its_carrier(logs: LogWatch) -> None:
    """The resume of a live session, given up on, does not take it from its carrier."""
    relay = _relay()
    with trio.fail_after(TIMEOUT):
        async with serving_relay(relay) as port, await trio.open_tcp_stream(
                LOOPBACK, port) as carrier:
            await carrier.send_all(_upgrade())
            head = b""
            while b"\r\n\r\n" not in head:
                head += await carrier.receive_some()
            await logs.wait_for("session up for agent")
            offer = next(line.partition(b":")[2] for line in head.split(b"\r\n")
                         if line.lower().startswith(RESUMABLE_HEADER.lower().encode()))
            ticket = parse_ticket(offer.decode())
            assert ticket is not None
            await _abandoned(relay, _upgrade(ticket.request(0)))
            assert any(GAVE_UP in line for line in logs.lines)
            assert not any("resumes its session" in line for line in logs.lines)
            assert len(relay.sessions) == 1 and len(relay.held) == 1


async def test_an_abandoned_upgrade_over_tls_opens_no_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: LogWatch) -> None:
    """Under TLS the client's FIN comes after its records: still seen. The relay's
    reading of the request is held until the client has ended its side."""
    cert = write_self_signed(tmp_path, "relay", ["127.0.0.1"])
    closed = trio.Event()

    async def held_read(*args: object) -> object:
        await closed.wait()
        return await read_request(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("wstunnel.relay.relay.read_request", held_read)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with trio.fail_after(TIMEOUT):
        relay = Relay(relay_config(resume_grace=60.0, tls=cert.relay_tls))
        async with serving_relay(relay) as port:
            tls = trio.SSLStream(await trio.open_tcp_stream(LOOPBACK, port), context)
            try:
                await tls.do_handshake()
                await tls.send_all(_upgrade())
                await tls.transport_stream.send_eof()
                with _first_decision() as catch:
                    closed.set()
                    await _ignored(catch)
            finally:
                await trio.aclose_forcefully(tls)
    assert len(relay.held) == 0 and not relay.sessions
