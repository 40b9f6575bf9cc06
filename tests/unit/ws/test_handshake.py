"""The opening handshake (RFC 6455 section 4) on both sides, whole and bytewise."""

from __future__ import annotations

import pytest

from tests.helpers import counting_random_bytes, feed_bytewise
from wstunnel.errors import LocalProtocolError
from wstunnel.ws import (
    SUBPROTOCOL,
    ClientHandshake,
    HandshakeAccepted,
    HandshakeFailed,
    HandshakeRejected,
    RequestReceived,
    ServerHandshake,
    accept_key,
)


def request_bytes(**kwargs: object) -> bytes:
    client = ClientHandshake(
        "relay.example:443", "/tunnel", random_bytes=counting_random_bytes(), **kwargs  # type: ignore[arg-type]
    )
    return client.data_to_send()


def parse_request(data: bytes, *, bytewise: bool = False, **kwargs: int) -> object:
    server = ServerHandshake(**kwargs)  # type: ignore[arg-type]
    if bytewise:
        feed_bytewise(server, data)
    else:
        server.receive_data(data)
    return server.next_event()


def handshake(server_reply: bytes, *, bytewise: bool = False, **kwargs: object) -> object:
    """Run a client against a scripted server reply."""
    client = ClientHandshake("h", "/", random_bytes=counting_random_bytes(), **kwargs)  # type: ignore[arg-type]
    client.data_to_send()
    if bytewise:
        feed_bytewise(client, server_reply)
    else:
        client.receive_data(server_reply)
    event = client.next_event()
    if event is None:
        client.receive_eof()
        event = client.next_event()
    return event


def plain_request(headers: str, method: str = "GET", version: str = "1.1") -> bytes:
    return f"{method} /tunnel HTTP/{version}\r\nHost: h\r\n{headers}\r\n".encode()


def upgrade_headers(**overrides: str | None) -> str:
    fields: dict[str, str | None] = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    fields.update(overrides)
    return "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)


def test_accept_key_matches_rfc_example() -> None:
    """RFC 6455 1.3: the sample nonce gives s3pPLMBiTxaQ9kYGzzhZRbK+xOo=."""
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_client_request_has_required_headers() -> None:
    """The request carries GET, Host, Upgrade, Connection, a 16-byte key, version 13."""
    data = request_bytes(extra_headers=[("Authorization", "Bearer t")])
    head = data.decode()
    assert head.startswith("GET /tunnel HTTP/1.1\r\n")
    for line in (
        "Host: relay.example:443",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Protocol: {SUBPROTOCOL}",
        "Authorization: Bearer t",
        "Sec-WebSocket-Key: AAECAwQFBgcICQoLDA0ODw==",
    ):
        assert f"\r\n{line}\r\n" in head
    assert head.endswith("\r\n\r\n")


def test_client_without_subprotocol_offers_none() -> None:
    """subprotocol=None sends no Sec-WebSocket-Protocol header."""
    assert b"Sec-WebSocket-Protocol" not in request_bytes(subprotocol=None)


def test_client_rejects_header_injection() -> None:
    """Caller headers containing CR/LF raise LocalProtocolError."""
    with pytest.raises(LocalProtocolError):
        ClientHandshake("h", "/", extra_headers=[("X", "a\r\nEvil: 1")])


@pytest.mark.parametrize("bytewise", [False, True])
def test_full_handshake_with_trailing_frames(bytewise: bool) -> None:
    """Server accepts our client; bytes behind request and 101 are kept for frames."""
    client = ClientHandshake("h", "/tunnel")
    server = ServerHandshake()
    request = client.data_to_send() + b"\x82\x80abcd"
    feed_bytewise(server, request) if bytewise else server.receive_data(request)
    event = server.next_event()
    assert isinstance(event, RequestReceived)
    assert event.is_upgrade and event.upgrade_problem is None
    assert event.subprotocols == [SUBPROTOCOL]
    assert event.header("HOST") == "h"
    reply = server.accept(extra_headers=[("X-Relay", "1")]) + b"\x81\x02hi"
    assert server.trailing_data == b"\x82\x80abcd"
    feed_bytewise(client, reply) if bytewise else client.receive_data(reply)
    accepted = client.next_event()
    assert isinstance(accepted, HandshakeAccepted)
    assert accepted.subprotocol == SUBPROTOCOL
    assert accepted.trailing_data == b"\x81\x02hi"
    assert ("x-relay", "1") in accepted.headers


def test_server_omits_subprotocol_not_offered() -> None:
    """If the client did not offer our subprotocol, the 101 carries none."""
    server = ServerHandshake()
    server.receive_data(plain_request(upgrade_headers()))
    event = server.next_event()
    assert isinstance(event, RequestReceived) and event.subprotocols == []
    assert b"Sec-WebSocket-Protocol" not in server.accept()


def test_server_accept_matches_rfc_sample() -> None:
    """The 101 echoes the RFC sample key's accept value."""
    server = ServerHandshake(subprotocol=None)
    server.receive_data(plain_request(upgrade_headers()))
    server.next_event()
    reply = server.accept()
    assert reply.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in reply


@pytest.mark.parametrize("bytewise", [False, True])
def test_plain_get_gets_426(bytewise: bool) -> None:
    """A plain GET is not an upgrade; default_response is 426 with the upgrade headers."""
    server = ServerHandshake()
    data = plain_request("")
    feed_bytewise(server, data) if bytewise else server.receive_data(data)
    event = server.next_event()
    assert isinstance(event, RequestReceived) and not event.is_upgrade
    reply = server.default_response()
    assert reply.startswith(b"HTTP/1.1 426 ")
    assert b"\r\nUpgrade: websocket\r\n" in reply
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in reply
    body = reply.split(b"\r\n\r\n", 1)[1]
    assert body.count(b"\n") == 1 and body.strip()
    with pytest.raises(LocalProtocolError):
        server.accept()


@pytest.mark.parametrize(
    ("request_data", "needs_version"),
    [
        (plain_request(upgrade_headers(**{"Sec-WebSocket-Key": "c2hvcnQ="})), False),
        (plain_request(upgrade_headers(**{"Sec-WebSocket-Key": None})), False),
        (plain_request(upgrade_headers(Connection="keep-alive")), False),
        (plain_request(upgrade_headers(**{"Sec-WebSocket-Version": "8"})), True),
        (plain_request(upgrade_headers(**{"Sec-WebSocket-Version": None})), True),
        (plain_request(upgrade_headers(), method="POST"), False),
        (plain_request(upgrade_headers(), version="1.0"), False),
    ],
)
def test_malformed_upgrade_gets_400(request_data: bytes, needs_version: bool) -> None:
    """A malformed upgrade is reported and answered 400 (+ version header if wrong)."""
    server = ServerHandshake()
    server.receive_data(request_data)
    event = server.next_event()
    assert isinstance(event, RequestReceived)
    assert event.is_upgrade and event.upgrade_problem
    reply = server.default_response()
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert (b"Sec-WebSocket-Version: 13" in reply) == needs_version


def test_reject_any_status() -> None:
    """reject() builds a closing response with a one-line body and extra headers."""
    server = ServerHandshake()
    server.receive_data(plain_request(upgrade_headers()))
    server.next_event()
    reply = server.reject(401, "who are you?\nreally", [("WWW-Authenticate", "Bearer")])
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 401 Unauthorized")
    assert b"\r\nConnection: close" in head and b"\r\nWWW-Authenticate: Bearer" in head
    assert body == b"who are you? really\n"
    assert f"Content-Length: {len(body)}".encode() in head


def test_oversized_header_block_gets_431() -> None:
    """A header block over max_header_size fails with 431, split or whole."""
    big = plain_request(upgrade_headers() + "X-Pad: " + "a" * 2000 + "\r\n")
    for bytewise in (False, True):
        event = parse_request(big, bytewise=bytewise, max_header_size=1024)
        assert isinstance(event, HandshakeFailed) and event.status == 431
        assert event.response.startswith(b"HTTP/1.1 431 ")


def test_too_many_headers_gets_431() -> None:
    """More than max_headers header lines fail with 431."""
    many = plain_request("".join(f"X-{i}: v\r\n" for i in range(20)))
    event = parse_request(many, max_headers=10)
    assert isinstance(event, HandshakeFailed) and event.status == 431


def test_garbage_request_fails_400_without_echoing_it() -> None:
    """Unparseable input gives 400; the response does not repeat the peer's bytes."""
    event = parse_request(b"\x16\x03\x01garbage\r\n\r\n")
    assert isinstance(event, HandshakeFailed) and event.status == 400
    assert b"garbage" not in event.response


def test_server_eof_before_request_is_none_and_midway_is_failure() -> None:
    """A clean EOF before any byte gives None; EOF inside the headers fails."""
    server = ServerHandshake()
    server.receive_eof()
    assert server.next_event() is None
    server = ServerHandshake()
    server.receive_data(b"GET / HTTP/1.1\r\nHo")
    assert server.next_event() is None
    server.receive_eof()
    assert isinstance(server.next_event(), HandshakeFailed)


@pytest.mark.parametrize("bytewise", [False, True])
def test_client_reports_rejection_with_body(bytewise: bool) -> None:
    """A non-101 answer is reported with status, headers and the body's start."""
    reply = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 12\r\nX-Why: nope\r\n\r\nbad token\r\n!"
    event = handshake(reply, bytewise=bytewise)
    assert isinstance(event, HandshakeRejected)
    assert (event.status, event.reason) == (403, "Forbidden")
    assert ("x-why", "nope") in event.headers
    assert event.body == b"bad token\r\n!"
    assert event.message == "answered 403 Forbidden: bad token !"


def test_client_keeps_only_start_of_long_body() -> None:
    """A long body is cut at ~1 KiB without waiting for the rest."""
    reply = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 100000\r\n\r\n" + b"x" * 2000
    event = handshake(reply)
    assert isinstance(event, HandshakeRejected) and event.status == 502
    assert len(event.body) == 1024


def test_client_close_delimited_body_ends_at_eof() -> None:
    """A body without length ends at EOF and is still reported."""
    event = handshake(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\nmissing")
    assert isinstance(event, HandshakeRejected)
    assert event.message == "answered 404 Not Found: missing"


def test_client_no_answer_is_status_0() -> None:
    """EOF or garbage instead of HTTP gives status 0 with an explanation."""
    for reply in (b"", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-"):
        event = handshake(reply)
        assert isinstance(event, HandshakeRejected) and event.status == 0
        assert event.message


def good_101(key: str, **overrides: str | None) -> bytes:
    fields: dict[str, str | None] = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Accept": accept_key(key),
        "Sec-WebSocket-Protocol": SUBPROTOCOL,
    }
    fields.update(overrides)
    lines = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    return f"HTTP/1.1 101 Switching Protocols\r\n{lines}\r\n".encode()


KEY = "AAECAwQFBgcICQoLDA0ODw=="  # counting_random_bytes() nonce


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"Sec-WebSocket-Accept": "d3Jvbmc="}, "Sec-WebSocket-Accept is wrong"),
        ({"Upgrade": None}, "Upgrade"),
        ({"Connection": "keep-alive"}, "Connection"),
        ({"Sec-WebSocket-Protocol": "other"}, "did not offer"),
        ({"Sec-WebSocket-Protocol": None}, "subprotocol"),
        ({"Sec-WebSocket-Extensions": "permessage-deflate"}, "extensions"),
    ],
)
def test_client_validates_101(overrides: dict[str, str | None], fragment: str) -> None:
    """RFC 6455 4.1: a 101 with wrong headers is a rejection naming the problem."""
    event = handshake(good_101(KEY, **overrides))
    assert isinstance(event, HandshakeRejected) and event.status == 101
    assert event.message.startswith("answered 101 but ") and fragment in event.message


def test_client_accepts_valid_101_after_100_continue() -> None:
    """Interim 1xx responses are skipped; a valid 101 is accepted."""
    event = handshake(b"HTTP/1.1 100 Continue\r\n\r\n" + good_101(KEY), bytewise=True)
    assert isinstance(event, HandshakeAccepted)


def test_data_to_send_once() -> None:
    """The request is handed out exactly once."""
    client = ClientHandshake("h", "/")
    assert client.data_to_send().startswith(b"GET / HTTP/1.1")
    assert client.data_to_send() == b""
