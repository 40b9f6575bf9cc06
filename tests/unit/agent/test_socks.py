"""The -D proxy handshake (agent/socks.py): SOCKS5, SOCKS4/4a and HTTP, bytes in, bytes out."""

from __future__ import annotations

import base64
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wstunnel.agent.socks import ProxyFailed, ProxyHandshake, ProxyRequest
from wstunnel.mux import OpenFailure

USERS = frozenset({("alice", "s3cret")})
SOCKS5_CONNECT_NAME = b"\x05\x01\x00\x03\x09localhost" + struct.pack("!H", 8080)


def _feed(handshake: ProxyHandshake, data: bytes, *, bytewise: bool
          ) -> tuple[ProxyRequest | ProxyFailed | None, bytes]:
    """Feed ``data`` whole or one byte at a time; the first event and all output."""
    out = b""
    pieces = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    for piece in pieces:
        handshake.receive_data(piece)
        event = handshake.next_event()
        out += handshake.data_to_send()
        if event is not None:
            return event, out
    return None, out


@pytest.fixture(params=[False, True], ids=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_socks5_no_auth_connect_by_name(bytewise: bool) -> None:
    """SOCKS5 CONNECT with a name: the name goes to the relay unresolved; the method
    choice is answered at once, success only after reply_opened; bytes behind the
    request are kept as early data."""
    handshake = ProxyHandshake()
    event, out = _feed(handshake, b"\x05\x01\x00" + SOCKS5_CONNECT_NAME + b"hi", bytewise=bytewise)
    assert isinstance(event, ProxyRequest)
    early = b"" if bytewise else b"hi"  # (bytewise, the request ends before "hi" arrives)
    assert (event.host, event.port, event.early) == ("localhost", 8080, early)
    assert out == b"\x05\x00"
    handshake.reply_opened()
    assert handshake.data_to_send() == b"\x05\x00\x00\x01" + bytes(6)


@pytest.mark.parametrize(("address", "host"), [
    (b"\x01\x7f\x00\x00\x01", "127.0.0.1"),
    (b"\x04" + bytes(15) + b"\x01", "::1"),
])
def test_socks5_ip_addresses(address: bytes, host: str, bytewise: bool) -> None:
    """IPv4 and IPv6 destinations are passed on as text."""
    event, _ = _feed(ProxyHandshake(), b"\x05\x01\x00\x05\x01\x00" + address + b"\x00\x50",
                     bytewise=bytewise)
    assert isinstance(event, ProxyRequest) and (event.host, event.port) == (host, 80)


def test_socks5_login_right_and_wrong(bytewise: bool) -> None:
    """RFC 1929: with users, username/password is chosen; the right pair gets 1 0
    and the request goes on, a wrong one 1 1 and a failure (then close)."""
    login = b"\x01\x05alice\x06s3cret"
    handshake = ProxyHandshake(USERS)
    event, out = _feed(handshake, b"\x05\x02\x00\x02" + login + SOCKS5_CONNECT_NAME,
                       bytewise=bytewise)
    assert isinstance(event, ProxyRequest) and out == b"\x05\x02\x01\x00"
    handshake = ProxyHandshake(USERS)
    event, out = _feed(handshake, b"\x05\x02\x00\x02\x01\x05alice\x05wrong", bytewise=bytewise)
    assert isinstance(event, ProxyFailed) and out == b"\x05\x02\x01\x01"


def test_socks5_without_an_acceptable_method() -> None:
    """A client offering no-auth only to a proxy with users gets 05 FF."""
    event, out = _feed(ProxyHandshake(USERS), b"\x05\x01\x00", bytewise=False)
    assert isinstance(event, ProxyFailed) and out == b"\x05\xff"


@pytest.mark.parametrize(("reason", "code"), [
    (OpenFailure.FORBIDDEN, 0x02), (OpenFailure.UNREACHABLE, 0x04),
    (OpenFailure.DNS_FAILURE, 0x04), (OpenFailure.REFUSED, 0x05),
    (OpenFailure.TIMEOUT, 0x01), (None, 0x01),
])
def test_socks5_refusals_map_to_reply_codes(reason: int | None, code: int) -> None:
    """The relay's reason becomes the SOCKS5 reply code clients show."""
    handshake = ProxyHandshake()
    _feed(handshake, b"\x05\x01\x00" + SOCKS5_CONNECT_NAME, bytewise=False)
    handshake.reply_refused(reason)
    assert handshake.data_to_send() == bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


def test_socks5_other_commands_are_not_supported() -> None:
    """BIND and UDP ASSOCIATE get 0x07 (command not supported)."""
    event, out = _feed(ProxyHandshake(), b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50",
                       bytewise=False)
    assert isinstance(event, ProxyFailed) and out == b"\x05\x00" + b"\x05\x07\x00\x01" + bytes(6)


def test_socks4_and_4a(bytewise: bool) -> None:
    """SOCKS4 (an IPv4 address) and 4a (0.0.0.x then a name); 0x5A once opened,
    0x5B when refused."""
    handshake = ProxyHandshake()
    event, _ = _feed(handshake, b"\x04\x01\x00\x50\x0a\x00\x00\x01me\0", bytewise=bytewise)
    assert isinstance(event, ProxyRequest) and (event.host, event.port) == ("10.0.0.1", 80)
    handshake.reply_opened()
    assert handshake.data_to_send()[:2] == b"\x00\x5a"
    handshake = ProxyHandshake()
    event, _ = _feed(handshake, b"\x04\x01\x01\xbb\0\0\0\x01\0example.com\0", bytewise=bytewise)
    assert isinstance(event, ProxyRequest) and (event.host, event.port) == ("example.com", 443)
    handshake.reply_refused(OpenFailure.FORBIDDEN)
    assert handshake.data_to_send()[:2] == b"\x00\x5b"


def test_socks4_is_refused_when_a_login_is_needed() -> None:
    """SOCKS4 carries no password: with users it is refused (0x5B)."""
    event, out = _feed(ProxyHandshake(USERS), b"\x04\x01\x00\x50\x0a\x00\x00\x01me\0",
                       bytewise=False)
    assert isinstance(event, ProxyFailed) and out[:2] == b"\x00\x5b"


def test_http_connect(bytewise: bool) -> None:
    """CONNECT host:port: 200 only after reply_opened; bytes after the head are kept."""
    handshake = ProxyHandshake()
    event, out = _feed(handshake, b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n"
                                  b"\r\n\x16\x03\x01", bytewise=bytewise)
    assert isinstance(event, ProxyRequest) and out == b""
    early = b"" if bytewise else b"\x16\x03\x01"
    assert (event.host, event.port, event.early) == ("localhost", 443, early)
    handshake.reply_opened()
    assert handshake.data_to_send().startswith(b"HTTP/1.1 200 ")


def test_http_absolute_form_is_sent_in_origin_form(bytewise: bool) -> None:
    """GET http://host:port/path: the destination gets GET /path with Connection:
    close and without the proxy's own headers; the body that followed is kept; no
    reply of ours on success (the server answers)."""
    handshake = ProxyHandshake()
    event, _ = _feed(handshake, b"POST http://example.com:8080/p?q=1 HTTP/1.1\r\n"
                                b"Host: example.com:8080\r\nProxy-Connection: keep-alive\r\n"
                                b"Content-Length: 2\r\n\r\nok", bytewise=bytewise)
    assert isinstance(event, ProxyRequest) and (event.host, event.port) == ("example.com", 8080)
    assert event.early == (b"POST /p?q=1 HTTP/1.1\r\nHost: example.com:8080\r\n"
                           b"Content-Length: 2\r\nConnection: close\r\n\r\n"
                           + (b"" if bytewise else b"ok"))
    handshake.reply_opened()
    assert handshake.data_to_send() == b""


@pytest.mark.parametrize("host_header", [b"", b"Host: elsewhere.example\r\n"])
def test_http_absolute_form_host_comes_from_the_url(host_header: bytes) -> None:
    """RFC 9112 section 3.2.2: a proxy MUST replace Host with the absolute URL's
    authority, so an HTTP/1.0 client that sends none (or a stale one) still
    reaches the right virtual host."""
    event, _ = _feed(ProxyHandshake(), b"GET http://[::1]:8080/x HTTP/1.0\r\nAccept: */*\r\n"
                     + host_header + b"\r\n", bytewise=False)
    assert isinstance(event, ProxyRequest) and (event.host, event.port) == ("::1", 8080)
    assert event.early == (b"GET /x HTTP/1.0\r\nHost: [::1]:8080\r\nAccept: */*\r\n"
                           b"Connection: close\r\n\r\n")


def test_http_forward_sends_one_request_and_only_this_hops_headers() -> None:
    """A plain HTTP request's early bytes are its head and body: a pipelined request
    behind it (with the client's proxy login) is not among them; headers the
    Connection header names, TE and Upgrade are this hop's and are dropped."""
    event, _ = _feed(ProxyHandshake(), b"POST http://a.example/x HTTP/1.1\r\nHost: a.example\r\n"
                     b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nTE: trailers\r\n"
                     b"Content-Length: 5\r\n\r\nhello"
                     b"GET http://b.example/ HTTP/1.1\r\nProxy-Authorization: Basic eDp5\r\n\r\n",
                     bytewise=False)
    assert isinstance(event, ProxyRequest) and event.body is not None and event.body.done
    assert event.early == (b"POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n"
                           b"Connection: close\r\n\r\nhello")


def test_an_http_head_over_the_limit_is_refused_however_it_arrives() -> None:
    """A head longer than max_request_size gets 431 also when it arrives whole in one
    read (the limit is the head's, not the buffer's before its end was seen)."""
    head = b"GET http://a.example/ HTTP/1.1\r\nX-Big: " + b"x" * 2000 + b"\r\n\r\n"
    event, reply = _feed(ProxyHandshake(max_request_size=1024), head, bytewise=False)
    assert isinstance(event, ProxyFailed) and reply.startswith(b"HTTP/1.1 431 ")


def test_a_socks4_request_over_the_limit_is_answered_0x5b() -> None:
    """A SOCKS4 user id with no end within max_request_size: the client hears
    "rejected" (0x5B), not a bare reset."""
    event, reply = _feed(ProxyHandshake(max_request_size=1024),
                         b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 2000, bytewise=False)
    assert isinstance(event, ProxyFailed) and reply == b"\x00\x5b" + bytes(6)


def test_an_http_url_with_port_0_is_a_bad_request() -> None:
    """Port 0 in a URL is refused, not read as the default port 80."""
    event, reply = _feed(ProxyHandshake(), b"GET http://a.example:0/ HTTP/1.1\r\n\r\n",
                         bytewise=False)
    assert isinstance(event, ProxyFailed) and reply.startswith(b"HTTP/1.1 400 ")


def test_http_forward_with_framing_a_proxy_cannot_trust_is_a_bad_request() -> None:
    """Transfer-Encoding beside Content-Length (request smuggling's shape): 400."""
    event, reply = _feed(ProxyHandshake(), b"POST http://a.example/ HTTP/1.1\r\n"
                         b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                         bytewise=False)
    assert isinstance(event, ProxyFailed) and reply.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(("reason", "status"), [
    (OpenFailure.FORBIDDEN, b"403"), (OpenFailure.REFUSED, b"502"),
    (OpenFailure.UNREACHABLE, b"502"), (OpenFailure.DNS_FAILURE, b"502"),
    (OpenFailure.TIMEOUT, b"504"), (None, b"502"),
])
def test_http_refusals_map_to_status_codes(reason: int | None, status: bytes) -> None:
    """403 forbidden, 502 refused/unreachable/DNS, 504 timeout; a one-line body."""
    handshake = ProxyHandshake()
    _feed(handshake, b"CONNECT a.example:443 HTTP/1.1\r\n\r\n", bytewise=False)
    handshake.reply_refused(reason)
    reply = handshake.data_to_send()
    assert reply.startswith(b"HTTP/1.1 " + status + b" ")
    body = reply.split(b"\r\n\r\n", 1)[1]
    assert body.count(b"\n") == 1 and body.endswith(b"\n")


def test_http_proxy_login() -> None:
    """With users, Proxy-Authorization: Basic is checked: 407 without or wrong."""
    good = base64.b64encode(b"alice:s3cret")
    event, _ = _feed(ProxyHandshake(USERS), b"CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: "
                                            b"Basic " + good + b"\r\n\r\n", bytewise=False)
    assert isinstance(event, ProxyRequest)
    event, out = _feed(ProxyHandshake(USERS), b"CONNECT h:1 HTTP/1.1\r\n\r\n", bytewise=False)
    assert isinstance(event, ProxyFailed) and out.startswith(b"HTTP/1.1 407 ")
    assert b"Proxy-Authenticate: Basic" in out


@pytest.mark.parametrize("data", [
    b"\x00garbage", b"GET /relative HTTP/1.1\r\n\r\n", b"GET https://x/ HTTP/1.1\r\n\r\n",
    b"CONNECT nohost HTTP/1.1\r\n\r\n", b"\x05\x01\x00\x05\x01\x00\x09\x00", b"G" * 20000,
])
def test_bad_requests_fail_cleanly(data: bytes) -> None:
    """Garbage, a relative or https:// URL without CONNECT, a CONNECT without a port,
    an unknown address type, an endless head: a failure (with a reply where the
    protocol has one), never an exception."""
    event, _ = _feed(ProxyHandshake(max_request_size=16384), data, bytewise=False)
    assert isinstance(event, ProxyFailed)


def test_eof_before_the_request_ends() -> None:
    """A client that closes mid-request fails the handshake."""
    handshake = ProxyHandshake()
    handshake.receive_data(b"\x05\x01")
    assert handshake.next_event() is None
    handshake.receive_eof()
    assert isinstance(handshake.next_event(), ProxyFailed)


@given(st.binary(max_size=300), st.sampled_from([b"", b"\x05", b"\x04", b"C", b"\x05\x01\x00"]),
       st.booleans())
def test_random_bytes_yield_a_request_a_failure_or_a_wait(data: bytes, prefix: bytes,
                                                         with_users: bool) -> None:
    """Whatever a client sends, the handshake answers with an event or waits for more;
    it never raises."""
    handshake = ProxyHandshake(USERS if with_users else None, max_request_size=256)
    event, _ = _feed(handshake, prefix + data, bytewise=len(data) % 2 == 0)
    assert event is None or isinstance(event, (ProxyRequest, ProxyFailed))


def test_socks5_udp_associate_request_and_reply() -> None:
    """RFC 1928 section 7: command 3 is a UDP ASSOCIATE request (port 0 allowed); the
    reply names the relay socket as an IPv4 address and port."""
    from wstunnel.agent.socks import ProxyHandshake, ProxyRequest

    handshake = ProxyHandshake()
    handshake.receive_data(b"\x05\x01\x00")
    assert handshake.next_event() is None
    assert handshake.data_to_send() == b"\x05\x00"
    handshake.receive_data(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    request = handshake.next_event()
    assert isinstance(request, ProxyRequest) and request.udp_associate
    assert (request.host, request.port) == ("0.0.0.0", 0)
    handshake.reply_associated("127.0.0.1", 4242)
    assert handshake.data_to_send() == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x10\x92"


def test_socks5_udp_datagram_headers() -> None:
    """The UDP header both ways: names, IPv4 and IPv6 parse; fragments, port 0 and
    truncated headers are dropped (None)."""
    from wstunnel.agent.socks import parse_udp_datagram, udp_datagram

    assert parse_udp_datagram(udp_datagram("ns.example", 53, b"q")) == ("ns.example", 53, b"q")
    assert parse_udp_datagram(udp_datagram("10.0.0.53", 53, b"")) == ("10.0.0.53", 53, b"")
    assert parse_udp_datagram(udp_datagram("fd00::1", 53, b"x")) == ("fd00::1", 53, b"x")
    fragment = b"\x00\x00\x01" + udp_datagram("10.0.0.53", 53, b"q")[3:]
    assert parse_udp_datagram(fragment) is None
    assert parse_udp_datagram(udp_datagram("10.0.0.53", 0, b"q")) is None
    assert parse_udp_datagram(b"\x00\x00\x00\x03\x09short") is None
