"""Which transport carries the agent's session: WebSocket, else HTTP streaming, else polling.

Theory of operation: ``transport: auto`` tries a WebSocket first; when the
path turns the upgrade into something else (a proxy strips Upgrade and the
relay answers 426, a web server answers 200, a proxy refuses CONNECT to the
relay's port, the upgrade is held unanswered), the same session is opened
over HTTP streaming, whose probe (a PING that must come back with no gap of
``STREAM_PROBE_TIMEOUT`` in what comes down first) fails where a proxy
buffers bodies; then over HTTP polling, which passes wherever ordinary requests do. What worked is
remembered per relay URL and tried first at the next reconnect. Failures
that another transport cannot cure (a refused login, a relay that is down, a
bad certificate) end the attempt at once. One warning says which transport
is used, why, and the setting that goes straight to it (the memory ends with
the process: an ssh ProxyCommand's ``--stdio`` agent chooses at every run).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from .. import __version__
from ..addresses import bracketed
from ..config import AgentConfig, RelayURL
from ..errors import AuthenticationError, HandshakeError
from ..framing import HTTP_TRANSPORTS, POLLING, STREAMING
from .connect import Dialer, HandshakeTimeout, UpgradeBlocked, open_stream, open_websocket
from .proxy import ProxyDialer, ProxyError

if TYPE_CHECKING:  # (loaded when WebSocket does not pass: --stdio over ws:// never needs it)
    from .http_client import HttpRoute

__all__ = ["TransportChooser", "Opened", "WEBSOCKET", "ORDER", "DEFAULT_USER_AGENT"]

log = logging.getLogger("wstunnel.agent")

WEBSOCKET: Final = "websocket"
ORDER: Final = (WEBSOCKET, *HTTP_TRANSPORTS)
#: The HTTP streaming probe: long enough for a slow path, short enough to move on.
STREAM_PROBE_TIMEOUT: Final = 3.0
DEFAULT_USER_AGENT: Final = f"Mozilla/5.0 (compatible; wstunnel/{__version__})"
_NAMES: Final = {WEBSOCKET: "WebSocket", STREAMING: "HTTP streaming", POLLING: "HTTP polling"}
#: Proxy answers to CONNECT that no other transport cures: a login it refuses (it
#: refuses every request), a relay it cannot reach (500 from tinyproxy, 502, 503, 504:
#: nor will its forwarded requests).
_NO_CURE: Final = (None, 0, 401, 407, 500, 502, 503, 504)


@dataclass(frozen=True)
class Opened:
    """A session's stream and what was read on it already; ``transport`` names it."""

    stream: trio.abc.Stream
    trailing: bytes
    transport: str
    #: The WebSocket's 101 headers, names in lower case (empty for the HTTP transports).
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def framed(self) -> bool:
        """The records travel framed in a byte stream (framing.py), not as messages."""
        return self.transport != WEBSOCKET


@dataclass(frozen=True)
class Request:
    """Everything one attempt needs (the agent builds it per connect)."""

    config: AgentConfig
    relay: RelayURL
    dial: Dialer | None
    headers: list[tuple[str, str]]  # the configured ones and the login
    ssl_context: ssl.SSLContext | None


class TransportChooser:
    """Opens sessions by the configured transport, or the first that passes (auto)."""

    def __init__(self) -> None:
        self._worked: dict[str, str] = {}

    def remembered(self, relay: RelayURL) -> str | None:
        return self._worked.get(relay.url)

    async def open(self, request: Request, *, only: str | None = None) -> Opened:
        """One connect: each transport tried gets its own ``handshake_timeout``;
        ``only`` forces one (a resume reconnects by the transport it had).

        Raises:
            HandshakeError, OSError, trio.TooSlowError: from the last transport tried.
        """
        forced = only or request.config.transport
        if forced != "auto":
            return await _attempt(request, forced)
        remembered = self._worked.get(request.relay.url)
        order = ORDER if remembered is None else (
            remembered, *(name for name in ORDER if name != remembered))
        return await self._first_that_passes(request, order, remembered)

    async def _first_that_passes(self, request: Request, order: tuple[str, ...],
                                 remembered: str | None) -> Opened:
        """Each transport of ``order`` in turn, until one passes; the others' reasons
        are logged with the one chosen (``_chosen``)."""
        reasons: list[str] = []
        first: BaseException | None = None
        for index, name in enumerate(order):
            try:
                opened = await _attempt(request, name)
            except (HandshakeError, trio.TooSlowError) as exc:
                why = _passes_elsewhere(exc, request.relay, name)
                if why is None:
                    self._worked.pop(request.relay.url, None)
                    raise
                first = first or exc
                reasons.append(why)
                if index == len(order) - 1:
                    self._worked.pop(request.relay.url, None)
                    raise _none_passed(first, reasons) from exc
                # (info: the outcome's line repeats the reason, so where only warnings
                # show, as with --stdio, that one line says it all)
                log.info("%s; trying %s", why, _NAMES[order[index + 1]])
                continue
            self._chosen(request.relay, order[:index + 1], reasons, remembered)
            return opened
        raise AssertionError("unreachable")

    def _chosen(self, relay: RelayURL, tried: tuple[str, ...], reasons: list[str],
                remembered: str | None) -> None:
        *failed, name = tried
        self._worked[relay.url] = name
        if reasons:
            log.warning("%s; using %s (%s)", "; ".join(reasons), _NAMES[name],
                        _how_to_skip(failed, name))
        elif name != WEBSOCKET:
            log.info("using %s (it passed last time%s)", _NAMES[name],
                     "" if remembered == name else ", remembered")


async def _attempt(request: Request, name: str) -> Opened:
    """One transport's handshake, within ``handshake_timeout``: for HTTP streaming, up
    to the probe, which then extends it while bytes come down (a resume's replay).

    Raises:
        trio.TooSlowError: past the timeout.
    """
    config = request.config
    with trio.CancelScope(deadline=trio.current_time() + config.handshake_timeout) as limit:
        if name == WEBSOCKET:
            return await _websocket(request)
        from .http_transport import open_http_session

        answer: dict[str, str] = {}
        stream, trailing = await open_http_session(http_route(request), name,
                                                   probe_timeout=STREAM_PROBE_TIMEOUT,
                                                   answer=answer, limit=limit)
        return Opened(stream, trailing, name, answer)
    raise trio.TooSlowError


async def _websocket(request: Request) -> Opened:
    config = request.config
    headers = request.headers
    if config.user_agent is not None:
        headers = [("User-Agent", config.user_agent), *headers]
    answer: dict[str, str] = {}
    stream, trailing = await open_websocket(
        request.relay, dial=request.dial, headers=headers,
        ssl_context=request.ssl_context, server_hostname=config.server_name,
        host_header=config.host_header, pin=config.relay_fingerprint,
        answer=answer)
    return Opened(stream, trailing, WEBSOCKET, answer)


def http_route(request: Request) -> HttpRoute:
    """Where the HTTP transports' requests go, and with which headers: through a
    proxy, an http:// relay is reached by plain forwarded requests (absolute form, no
    CONNECT, which many proxies allow to port 443 only); wss:// through CONNECT."""
    from .http_client import HttpRoute

    config, relay, dial = request.config, request.relay, request.dial
    host = config.host_header or relay.host_header
    headers = [("Host", host), ("User-Agent", config.user_agent or DEFAULT_USER_AGENT),
               *request.headers]
    timeout = config.handshake_timeout
    if isinstance(dial, ProxyDialer) and not relay.secure:
        forwarder = dial

        origin = f"http://{bracketed(relay.host)}:{relay.port}"

        async def forwarded() -> trio.abc.Stream:
            with trio.fail_after(timeout):
                return await forwarder.open_forwarding(f"{origin}/health")
        target = f"{origin}{relay.path}"
        return HttpRoute(relay, forwarded, target,
                         (*headers, *forwarder.forwarding_headers()))

    async def direct() -> trio.abc.Stream:
        with trio.fail_after(timeout):
            return await open_stream(relay, ssl_context=request.ssl_context,
                                     server_hostname=config.server_name, dial=dial,
                                     pin=config.relay_fingerprint)
    return HttpRoute(relay, direct, relay.path, tuple(headers))


def _how_to_skip(failed: list[str], name: str) -> str:
    """The setting that goes straight to ``name``: what is remembered here is lost when
    the process ends (an ssh ProxyCommand's agent lives for one connection)."""
    attempts = " and ".join(_NAMES[tried] for tried in failed)
    return (f"set transport: {name} or --transport {name} to skip the {attempts} "
            f"attempt{'s' * (len(failed) > 1)}")


def _none_passed(first: BaseException, reasons: list[str]) -> HandshakeError:
    """The first transport's explanation (the WebSocket's says most), and why the
    others did not pass either."""
    status = getattr(first, "status", None)
    text = str(first) if not isinstance(first, trio.TooSlowError) else reasons[0]
    return HandshakeError(f"{text}; and then: {'; '.join(reasons[1:])}", status)


def _passes_elsewhere(exc: BaseException, relay: RelayURL, name: str) -> str | None:
    """Why ``name`` failed, if another transport may pass; None when none would."""
    from .http_transport import HttpBlocked

    if isinstance(exc, AuthenticationError) and exc.status == 403 and name == WEBSOCKET:
        # (the relay refuses a login with 401, never 403: this is the path's rule)
        return "the WebSocket upgrade was refused (403 Forbidden: a proxy or firewall " \
               "on the path may block WebSocket)"
    if isinstance(exc, AuthenticationError) or getattr(exc, "status", None) == 429:
        return None
    if isinstance(exc, (UpgradeBlocked, HttpBlocked)):
        return exc.brief if name == WEBSOCKET else f"{_NAMES[name]} did not pass ({exc.brief})"
    if isinstance(exc, ProxyError) and not relay.secure and exc.status not in _NO_CURE:
        return f"the proxy refused the WebSocket's CONNECT (status {exc.status})"
    if isinstance(exc, HandshakeTimeout) and exc.connected:
        return f"{_NAMES[name]}: no answer in time (a proxy may hold it)"
    if isinstance(exc, trio.TooSlowError):
        return f"{_NAMES[name]}: no answer within handshake_timeout"
    return None
