"""Opening the WebSocket to the relay, and reading an upgrade on the relay.

Every failure here becomes a ``HandshakeError`` (or ``SessionClosed``) whose
text says, in one line, what came back and what it means, because this is the
step that fails when a proxy or firewall sits in the way.

Each step (TCP connect, TLS, upgrade) ends a little before the caller's
deadline, as the proxy's CONNECT does (net/proxy.py), so a timeout says which
step stalled: no TCP connection (a wrong address, a firewall dropping
packets, a full accept queue) is not a relay that accepted and never answered
(stopped, overloaded, or a proxy holding the request). A scheme that does not
match the port is named as such: a ws:// upgrade that got no HTTP answer is
retried as a TLS hello on a second connection, and a TLS hello answered with
plain bytes means the relay serves ws:// there. What a failed connect means
for the agent's retry (``refused_on_purpose``), its log line
(``failure_reason``) and what a refusal tells the user (``refusal_message``)
is decided here too, beside the steps that fail.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import trio

from .. import ws
from ..addresses import join_host_port
from ..config import AgentConfig, RelayURL
from ..errors import AuthenticationError, ConfigError, HandshakeError
from ..net.plain_stream import take_over
from ..net.sockopts import tune_socket
from ..net.tls_stream import TLSSocketStream, start_tls
from ..security.auth import token_agent
from .explain import _RELAY_404, BLOCKING_STATUSES, brief, explain_rejection

__all__ = [
    "HandshakeTimeout",
    "check_tls_files",
    "UpgradeBlocked",
    "failure_reason",
    "open_stream",
    "open_websocket",
    "refusal_message",
    "refused_on_purpose",
]

READ_SIZE = 65536

_DEADLINE_MARGIN: Final = 0.05  # seconds kept back so a step's timeout message wins
_TLS_PROBE_TIMEOUT: Final = 2.0
_NO_TCP: Final = ("no TCP connection to {where} within {seconds} s: is the address right? a "
                  "firewall may be dropping packets, or the relay's accept queue is full")
_NO_ANSWER: Final = ("connected, but the relay did not answer {step} within {seconds} s: is it "
                     "overloaded or stopped? a firewall or proxy may also be holding the request")
#: OpenSSL's reasons for a first answer that is not a TLS record at all.
_NOT_TLS_REASONS: Final = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG",
                                     "UNKNOWN_PROTOCOL"})
#: What TLS servers say to plain HTTP (nginx: "The plain HTTP request was sent to
#: HTTPS port"; Go: "Client sent an HTTP request to an HTTPS server").
_PLAIN_TO_TLS_PORT: Final = re.compile(rb"HTTP request (was )?sent to (an )?HTTPS", re.IGNORECASE)
_TLS_RECORD_TYPES: Final = (0x15, 0x16)  # alert, handshake: a TLS server's first answer


class HandshakeTimeout(HandshakeError):
    """One step of opening the WebSocket outlasted the caller's deadline; says which.
    ``connected``: the TCP connection was made (something then held the request)."""

    def __init__(self, message: str, connected: bool = True) -> None:
        super().__init__(message)
        self.connected = connected


class UpgradeBlocked(HandshakeError):
    """Something on the path turned the upgrade into something else (answered 200,
    426, 400, closed...): plain HTTP requests may still pass. ``brief`` says what came
    back in a few words, for the line that says which transport is used instead."""

    def __init__(self, message: str, status: int | None, brief: str) -> None:
        super().__init__(message, status)
        self.brief = brief

#: Opens the TCP byte pipe to (host, port): directly, or through a proxy (net/proxy.py).
Dialer = Callable[[str, int], Awaitable[trio.SocketStream]]


async def open_websocket(
    relay: RelayURL,
    *,
    headers: list[tuple[str, str]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    dial: Dialer | None = None,
    host_header: str | None = None,
    pin: str | None = None,
    answer: dict[str, str] | None = None,
) -> tuple[trio.abc.Stream, bytes]:
    """Connect, wrap in TLS for wss://, upgrade; return (stream, trailing bytes).
    ``answer``, when given, receives the 101's headers (names in lower case).

    ``dial`` replaces the direct TCP connection (e.g. a ``ProxyDialer``).
    ``server_hostname`` replaces the URL's host in SNI, certificate checks and
    the Host header; ``host_header`` replaces only the Host header (shared
    front ends, CDNs); ``pin`` is a ``sha256:`` fingerprint the relay's
    certificate must have (checked before any HTTP is sent). The caller bounds
    the whole thing with a timeout; each step ends just before it.

    Raises:
        HandshakeError: with a one-line explanation (AuthenticationError on 401/403,
            tls.CertificateMismatch for a wrong pin, HandshakeTimeout naming the
            step that outlasted the caller's deadline).
        OSError: the TCP connection itself failed.
    """
    dial = dial or trio.open_tcp_stream
    deadline = trio.current_effective_deadline()
    late = _Late(relay.url, deadline)
    with late.step(_NO_TCP, where=join_host_port(relay.host, relay.port)):
        tcp = await dial(relay.host, relay.port)
    tune_socket(tcp, notsent_lowat=True)
    stream: trio.abc.Stream = tcp
    named = relay if server_hostname is None else relay._replace(host=server_hostname)
    try:  # (named: what SNI and Host carry)
        if relay.secure:
            with late.step(_NO_ANSWER, step="the TLS handshake"):
                stream = await _start_tls(tcp, named, ssl_context, pin, relay)
        else:
            stream = take_over(tcp)
        with late.step(_NO_ANSWER, step="the upgrade"):
            trailing = await _upgrade(stream, named, headers or [], host_header, answer)
    except BaseException as exc:
        await trio.aclose_forcefully(stream)
        if _no_http_answer(exc, relay) and await _speaks_tls(dial, relay, deadline):
            raise _use_tls(relay, "it closed the plain-HTTP upgrade, and answers a TLS "
                                  "hello", 0) from exc
        raise
    return stream, trailing


async def open_stream(
    relay: RelayURL,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    dial: Dialer | None = None,
    pin: str | None = None,
) -> trio.abc.Stream:
    """A connection to the relay for plain HTTP requests (the HTTP transports): TCP or
    ``dial``, then TLS for wss://, each step bounded as in ``open_websocket``."""
    dial = dial or trio.open_tcp_stream
    late = _Late(relay.url, trio.current_effective_deadline())
    with late.step(_NO_TCP, where=join_host_port(relay.host, relay.port)):
        tcp = await dial(relay.host, relay.port)
    tune_socket(tcp, notsent_lowat=True)
    if not relay.secure:
        return take_over(tcp)
    named = relay if server_hostname is None else relay._replace(host=server_hostname)
    try:
        with late.step(_NO_ANSWER, step="the TLS handshake"):
            return await _start_tls(tcp, named, ssl_context, pin, relay)
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise


class _Late:
    """Bounds each step of ``open_websocket`` a little before the caller's deadline,
    so the error names the step that stalled (the caller's own timeout would not)."""

    def __init__(self, url: str, deadline: float) -> None:
        self._url = url
        self._deadline = deadline
        self._seconds = f"{deadline - trio.current_time():.3g}"

    @contextlib.contextmanager
    def step(self, template: str, **names: str) -> Iterator[None]:
        with trio.move_on_at(self._deadline - _DEADLINE_MARGIN) as scope:
            yield
        if scope.cancelled_caught:
            text = template.format(seconds=self._seconds, **names)
            raise HandshakeTimeout(f"{self._url}: {text}", connected=template != _NO_TCP)


def _use_tls(relay: RelayURL, why: str, status: int) -> HandshakeError:
    wss = relay._replace(secure=True).url
    return HandshakeError(f"{relay.url}: this port speaks TLS ({why}): use {wss}", status)


def _no_http_answer(exc: BaseException, relay: RelayURL) -> bool:
    """A ws:// upgrade that got no HTTP at all (closed, or bytes that are not HTTP)."""
    return (not relay.secure and type(exc) in (HandshakeError, UpgradeBlocked)
            and getattr(exc, "status", None) == 0)


async def _speaks_tls(dial: Dialer, relay: RelayURL, deadline: float) -> bool:
    """Whether ``relay``'s address answers a TLS hello with a TLS record (a handshake
    or an alert), on a connection of its own; False when unsure."""
    hello = _client_hello(relay.host)
    deadline = min(deadline - _DEADLINE_MARGIN, trio.current_time() + _TLS_PROBE_TIMEOUT)
    with trio.move_on_at(deadline):
        try:
            async with await dial(relay.host, relay.port) as probe:
                await probe.send_all(hello)
                first = await _receive_exactly(probe, 2)
        except (OSError, trio.BrokenResourceError, HandshakeError):
            return False
        return len(first) == 2 and first[0] in _TLS_RECORD_TYPES and first[1] == 3
    return False


def _client_hello(server_hostname: str) -> bytes:
    """The first bytes a TLS client sends, made by OpenSSL in memory."""
    from ..security import tls  # (here and below: ws:// never loads it, e.g. --stdio)

    context = tls.client_context(tls.ClientTLS())
    outgoing = ssl.MemoryBIO()
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def _start_tls(
    tcp: trio.SocketStream, relay: RelayURL, context: ssl.SSLContext | None, pin: str | None,
    dialled: RelayURL,
) -> TLSSocketStream:
    from ..security import tls

    context = context or tls.client_context(tls.ClientTLS())
    try:
        stream = await start_tls(tcp, context, server_hostname=relay.host)
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise HandshakeError(
                f"{relay.url}: {tls.describe_verify_error(cause, relay.host)}"
            ) from exc
        if isinstance(cause, ssl.SSLError) and cause.reason in _NOT_TLS_REASONS:
            raise HandshakeError(
                f"{relay.url}: the relay does not speak TLS at "
                f"{join_host_port(dialled.host, dialled.port)} (it answered the TLS hello with "
                f"plain bytes): use {dialled._replace(secure=False).url}, or the port where "
                f"it serves TLS") from exc
        if isinstance(cause, ssl.SSLEOFError) or (
                isinstance(cause, ssl.SSLError) and cause.reason == "UNEXPECTED_EOF_WHILE_READING"):
            raise HandshakeError(
                f"{relay.url}: the connection closed during the TLS handshake: the relay, or "
                f"a proxy or firewall on the path, hung up (a proxy may accept CONNECT and then "
                f"fail to reach the relay)") from exc
        if isinstance(cause, ssl.SSLError):
            raise HandshakeError(f"{relay.url}: TLS handshake failed: {cause}") from exc
        raise
    if pin is not None:
        try:
            tls.check_pin(stream.getpeercert(binary_form=True), pin, relay.url)
        except BaseException:
            stream.close()
            raise
    return stream


async def _upgrade(
    stream: trio.abc.Stream, relay: RelayURL, headers: list[tuple[str, str]],
    host_header: str | None = None, answer: dict[str, str] | None = None,
) -> bytes:
    host = host_header or relay.host_header
    handshake = ws.ClientHandshake(host, relay.path, extra_headers=headers)
    await stream.send_all(handshake.data_to_send())
    while True:
        event = handshake.next_event()
        if isinstance(event, ws.HandshakeAccepted):
            if answer is not None:
                answer.update((name.lower(), value) for name, value in event.headers)
            return event.trailing_data
        if isinstance(event, ws.HandshakeRejected):
            raise _rejection(relay, event)
        data = await stream.receive_some(READ_SIZE)
        if data:
            handshake.receive_data(data)
        else:
            handshake.receive_eof()


def _rejection(relay: RelayURL, event: ws.HandshakeRejected) -> HandshakeError:
    where = f"{relay.url}"
    if event.status in (401, 403):
        return AuthenticationError(f"{where} {event.message}", event.status)
    if not relay.secure and event.status == 400 and _PLAIN_TO_TLS_PORT.search(event.body):
        return _use_tls(relay, "it answered 400: a plain HTTP request sent to a TLS port",
                        event.status)
    if event.status in BLOCKING_STATUSES and not (
            event.status == 404 and _RELAY_404 in event.body):
        return UpgradeBlocked(explain_rejection(where, event), event.status, brief(event))
    return HandshakeError(explain_rejection(where, event), event.status)


def check_tls_files(config: AgentConfig) -> None:
    """Fail at start (and refuse a reload: run.py), not at every reconnect, when a CA or
    client certificate file is bad."""
    from ..security import tls

    try:
        tls.client_context(config.client_tls)
    except (OSError, ValueError) as exc:
        key = "ca_file" if config.ca_file else "client_cert_file"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"cannot load {getattr(config, key)}: {reason}",
                          source=config.source, key_path=key) from exc


# -- what a failed connect means: for the retry, and for the log line ----------------

def refused_on_purpose(exc: BaseException) -> bool:
    """The relay turned us away on purpose (401/403/429): retrying soon will not help."""
    return isinstance(exc, AuthenticationError) or (
        isinstance(exc, HandshakeError) and exc.status == 429)


def refusal_message(exc: BaseException, relay: RelayURL, config: AgentConfig,
                    token: str | None) -> str:
    """What to fix when ``refused_on_purpose(exc)``: a token to set, or to check."""
    name = token_agent(token) if token else None
    if isinstance(exc, AuthenticationError) and name is None:
        return (f"the relay {relay.url} requires a token and we have none: set "
                f"token_file, token_env or token_credential")
    if isinstance(exc, AuthenticationError):
        return (f"the relay rejected the token for agent {name}: check the token "
                f"({_token_source(config)}) against the relay's agents entry for {name} "
                f"(wstunnel keygen --token {name} makes a new pair)")
    return f"{exc}"


def _token_source(config: AgentConfig) -> str:
    for key in ("token_file", "token_env", "token_credential"):
        if getattr(config, key):
            return f"{key} {getattr(config, key)}"
    return "no token configured"


def failure_reason(exc: BaseException) -> str:
    """One line saying why connecting failed, and what to check."""
    if isinstance(exc, trio.TooSlowError):  # (open_websocket names the step that stalled)
        return "not connected within handshake_timeout"
    if isinstance(exc, OSError):
        cause = _root_os_error(exc)
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused: is the relay running and listening there?"
        if cause.strerror:
            return cause.strerror.lower()
    if isinstance(exc, trio.BrokenResourceError):
        broke = exc.__cause__
        detail = f": {broke}" if broke is not None and str(broke) else ""
        return f"the connection broke during the TLS handshake or the upgrade{detail}"
    return str(exc) or type(exc).__name__


def _root_os_error(exc: OSError) -> OSError:
    """trio reports "all attempts failed" with the real errors in ``__cause__``."""
    cause = exc.__cause__
    grouped = getattr(cause, "exceptions", None)  # an exception group (3.11+ or backport)
    if grouped is not None:
        errors = [e for e in grouped if isinstance(e, OSError)]
        return errors[0] if errors else exc
    return cause if isinstance(cause, OSError) else exc
