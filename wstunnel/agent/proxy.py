"""Reaching the relay through an HTTP proxy with CONNECT (RFC 9110 §9.3.6).

Theory of operation: ``ProxyDialer`` stands in for ``trio.open_tcp_stream``
when the agent has a proxy. It opens TCP to the proxy, sends ``CONNECT
relay:port`` (with ``Proxy-Authorization: Basic`` when a user is set, RFC
7617), reads the answer with h11 and, on 2xx, hands back the same socket,
now a byte pipe to the relay; TLS (for wss://) and the WebSocket upgrade run
inside it exactly as on a direct connection.

Every way this step fails becomes a ``ProxyError`` that says which proxy,
what it answered and what to do (wrong password, CONNECT to a port the proxy
forbids, no answer in time, reset). The CONNECT exchange stops a little
before the caller's deadline so a silent proxy is reported as such rather
than as a generic handshake timeout.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import h11
import trio

from .. import __version__
from ..addresses import join_host_port
from ..config import AgentConfig
from ..config.proxy_url import NO_PROXY, ProxyURL, parse_proxy_url, proxy_from_environment
from ..errors import ConfigError, HandshakeError
from ..security.auth import expand_credentials
from .proxy_auth import INSTALL_HINT, ConnectionLogin, challenge, connection_schemes

__all__ = [
    "ProxyDialer",
    "ProxyError",
    "choose_proxy",
    "proxy_dialer",
    "proxy_environment",
    "read_password_file",
]

READ_SIZE: Final = 16384
MAX_ANSWER_SIZE: Final = 16384
_DEADLINE_MARGIN: Final = 0.05  # seconds kept back so our timeout message wins


class ProxyError(HandshakeError):
    """The proxy refused or broke the CONNECT; ``status`` is its HTTP status (0: none)."""


def choose_proxy(setting: str | None, host: str, port: int, secure: bool,
                 environ: Mapping[str, str]) -> ProxyURL | None:
    """The proxy to use: ``setting`` if given (``none``: direct), else the environment.

    Raises:
        ConfigError: the setting or an environment variable is not a usable proxy URL.
    """
    try:
        if setting is None:
            return proxy_from_environment(environ, host, port, secure)
        if setting.strip().lower() == NO_PROXY:
            return None
        return parse_proxy_url(setting)
    except ValueError as exc:
        key = "proxy" if setting is not None else None
        raise ConfigError(f"{exc}; set `proxy: none` (--no-proxy) to connect directly",
                          key_path=key) from exc


def read_password_file(path: str) -> str:
    """The password in ``path``: its text without the final line break.

    Raises:
        OSError: the file cannot be read.
    """
    text = Path(path).read_text(encoding="utf-8")
    return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")


class ProxyDialer:
    """Opens byte pipes to ``host:port`` through one HTTP proxy.

    Args:
        proxy: where the proxy is, with the user (and maybe password) to send.
        password_file: read at every connection, so a rotated password is
            picked up; it overrides a password in the URL.
    """

    def __init__(self, proxy: ProxyURL, password_file: str | None = None) -> None:
        self.proxy = proxy
        self.password_file = password_file
        #: The last NTLM/Negotiate login tried (its scheme and user name the refusal).
        self._login: ConnectionLogin | None = None
        self._pyspnego_missing = False
        #: Forwarded requests: whether a first connection found out if the proxy
        #: wants a login per connection (NTLM, Negotiate), and whether it does.
        self._probed = False
        self._per_connection = False

    def __str__(self) -> str:
        origin = f" (from {self.proxy.source})" if self.proxy.source != "proxy" else ""
        return f"{self.proxy}{origin}"

    async def __call__(self, host: str, port: int) -> trio.SocketStream:
        """A stream to ``host:port`` through the proxy.

        Raises:
            ProxyError: with one line saying what the proxy did and what to do.
        """
        target = join_host_port(host, port)
        headers = self._headers(target)
        deadline = trio.current_effective_deadline()
        with trio.move_on_at(deadline - _DEADLINE_MARGIN if math.isfinite(deadline) else deadline):
            stream = await self._open()
            try:
                await self._exchange(stream, headers, target)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return stream
        raise self._error(f"did not answer CONNECT to {target} within the handshake timeout "
                          "(is this the proxy's address and port?)")

    async def open_forwarding(self, probe: str) -> trio.SocketStream:
        """A connection to the proxy itself, for plain requests in absolute form (the
        HTTP transports to an http:// relay: what every proxy passes, CONNECT or not);
        send ``forwarding_headers()`` with each request. A proxy that logs in per
        connection (NTLM, Negotiate) gets the login here, with a ``GET probe`` (the
        relay's /health); the first connection finds out whether it does."""
        stream = await self._open()
        if self._probed and not self._per_connection:
            return stream
        try:
            kept = await self._probe(stream, probe)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if kept:
            return stream
        await trio.aclose_forcefully(stream)
        if self._per_connection:
            raise self._error("closed the connection after the login: it cannot forward "
                              "the tunnel's requests on it")
        return await self._open()  # (no login to keep: an HTTP/1.0 proxy closes after each)

    async def _probe(self, stream: trio.SocketStream, probe: str) -> bool:
        """Whether the connection stays open after the probe's answer."""
        client = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_SIZE)
        headers = self._headers(_host_of(probe))
        answer = await self._ask(stream, client, "GET", probe, headers)
        self._probed = True
        if answer.status_code == 407:
            self._per_connection = bool(connection_schemes(answer))
            answer = await self._log_in(stream, client, "GET", probe, headers, answer)
        if answer.status_code == 407:
            raise self._refusal(answer, probe)
        await _finish_answer(stream, client)
        return client.our_state is h11.DONE and client.their_state is h11.DONE

    def forwarding_headers(self) -> list[tuple[str, str]]:
        """``Proxy-Authorization`` for a request forwarded by the proxy, if it has a user."""
        credentials = self._credentials()
        if credentials is None:
            return []
        token = base64.b64encode(credentials.encode("utf-8")).decode("ascii")
        return [("Proxy-Authorization", f"Basic {token}")]

    # -- steps ------------------------------------------------------------------

    def _headers(self, target: str) -> list[tuple[str, str]]:
        headers = [("Host", target), ("User-Agent", f"wstunnel/{__version__}")]
        credentials = self._credentials()
        if credentials is not None and self._login is None:  # (not to an NTLM proxy)
            token = base64.b64encode(credentials.encode("utf-8")).decode("ascii")
            headers.append(("Proxy-Authorization", f"Basic {token}"))
        return headers

    def _credentials(self) -> str | None:
        proxy = self.proxy
        if proxy.username is None:
            return None
        password = proxy.password or ""
        if self.password_file is not None:
            try:
                password = read_password_file(expand_credentials(self.password_file))
            except ConfigError as exc:  # $CREDENTIALS_DIRECTORY used outside systemd
                raise self._error(f"needs a password, but {exc}") from exc
            except OSError as exc:
                raise self._error(f"needs a password, but proxy_password_file "
                                  f"{self.password_file} cannot be read: "
                                  f"{(exc.strerror or str(exc)).lower()}") from exc
        return f"{proxy.username}:{password}"

    async def _open(self) -> trio.SocketStream:
        try:
            return await trio.open_tcp_stream(self.proxy.host, self.proxy.port)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise self._error(f"cannot be reached: {reason}") from exc

    async def _exchange(self, stream: trio.SocketStream, headers: list[tuple[str, str]],
                        target: str) -> None:
        client = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_SIZE)
        answer = await self._ask(stream, client, "CONNECT", target, headers)
        if answer.status_code == 407:
            answer = await self._log_in(stream, client, "CONNECT", target, headers, answer)
        if 200 <= answer.status_code < 300:
            if client.trailing_data[0]:
                raise self._error("sent bytes after accepting CONNECT, before the relay spoke")
            return
        raise self._refusal(answer, target)

    async def _ask(self, stream: trio.SocketStream, client: h11.Connection, method: str,
                   target: str, headers: list[tuple[str, str]]) -> h11.Response:
        """Send one request on ``client``'s connection; the proxy's final answer."""
        request = client.send(h11.Request(method=method, target=target, headers=headers))
        request = (request or b"") + (client.send(h11.EndOfMessage()) or b"")
        try:
            await stream.send_all(request)
            answer = await _read_answer(stream, client)
        except trio.BrokenResourceError as exc:
            raise self._error(f"reset the connection while asked to {method} {target}") from exc
        except h11.RemoteProtocolError as exc:
            raise self._error(f"answered {method} with something that is not HTTP ({exc}): "
                              "is it an HTTP proxy (not SOCKS, not TLS)?") from exc
        if answer is None:
            raise self._error(f"closed the connection without answering {method} to {target}")
        return answer

    async def _log_in(self, stream: trio.SocketStream, client: h11.Connection, method: str,
                      target: str, headers: list[tuple[str, str]],
                      answer: h11.Response) -> h11.Response:
        """NTLM or Negotiate where the 407 offers it: the steps, on this connection
        (proxy_auth.py); the last answer. Other 407s come back as they are."""
        schemes = connection_schemes(answer)
        user = self.proxy.username
        if not schemes or user is None:
            return answer
        try:
            login = self._login = ConnectionLogin(schemes[0], user, self._password(),
                                                  self.proxy.host)
        except ImportError:
            self._pyspnego_missing = True
            return answer
        plain = [header for header in headers if header[0] != "Proxy-Authorization"]
        token: bytes | None = None
        while answer.status_code == 407 and login.steps < 3:
            if login.steps and token is None:
                break  # no challenge: the proxy started over, so it refused the login
            await _finish_answer(stream, client)
            if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                raise self._error(f"closed the connection in the middle of the "
                                  f"{login.scheme} login (it must stay open for it)", 407)
            client.start_next_cycle()
            authorization = ("Proxy-Authorization", login.header(token))
            answer = await self._ask(stream, client, method, target, [*plain, authorization])
            token = challenge(answer, login.scheme)
        return answer

    def _password(self) -> str:
        credentials = self._credentials() or ":"
        return credentials.split(":", 1)[1]

    # -- messages -----------------------------------------------------------------

    def _error(self, text: str, status: int = 0) -> ProxyError:
        origin = f" (from {self.proxy.source})" if self.proxy.source != "proxy" else ""
        return ProxyError(f"the proxy at {self.proxy.address}{origin} {text}", status)

    def _refusal(self, answer: h11.Response, target: str) -> ProxyError:
        status = answer.status_code
        said = f"{status} {answer.reason.decode('latin-1')}".rstrip()
        if status in (401, 407):
            return self._error(self._auth_text(answer, said), status)
        if status == 403:
            hint = "; many proxies allow CONNECT only to port 443" if not target.endswith(
                ":443") else ""
            return self._error(f"refused CONNECT to {target} ({said}{hint})", status)
        hint = {
            400: "it does not understand CONNECT: is this an HTTP proxy?",
            405: "it does not allow CONNECT: is this an HTTP proxy?",
            500: "it could not open the tunnel (tinyproxy: could not connect to the relay): "
                 "is the relay running and reachable?",
            501: "it does not implement CONNECT",
            502: "it could not connect to the relay: is the relay running and reachable?",
            503: "it could not connect to the relay: is the relay running and reachable?",
            504: "it timed out connecting to the relay",
        }.get(status, "it did not open the tunnel")
        return self._error(f"answered CONNECT to {target} with {said}: {hint}", status)

    def _auth_text(self, answer: h11.Response, said: str) -> str:
        schemes = [value.decode("latin-1").split(" ", 1)[0]
                   for name, value in answer.headers if name == b"proxy-authenticate"]
        user = self.proxy.username
        login = self._login
        if login is not None and login.steps:
            return (f"rejected the {login.scheme} login of user {login.username!r} ({said}): "
                    "check the user name (DOMAIN%5Cuser in the proxy URL) and the password "
                    "(proxy_password_file)")
        if self._pyspnego_missing:
            return (f"requires authentication with {', '.join(schemes)} ({said}); "
                    f"{INSTALL_HINT}")
        if schemes and not any(s.lower() in ("basic", "ntlm", "negotiate") for s in schemes):
            return (f"requires authentication with {', '.join(schemes)} ({said}); "
                    "wstunnel supports Basic, NTLM and Negotiate")
        if user is None:
            return (f"requires authentication ({said}): give a user in the proxy URL "
                    f"(http://USER@{self.proxy.address}) and the password in "
                    "proxy_password_file")
        return (f"rejected the credentials of user {user!r} ({said}): check the user name "
                "and the password (proxy_password_file or the proxy URL)")


async def _finish_answer(stream: trio.SocketStream, client: h11.Connection) -> None:
    """Read the rest of an answer (its body), so the connection can carry another request."""
    while True:
        event = client.next_event()
        if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some(READ_SIZE))


def _host_of(url: str) -> str:
    """``host:port`` of an absolute-form target (the Host header of a forwarded request)."""
    return url.partition("://")[2].partition("/")[0]


async def _read_answer(stream: trio.SocketStream, client: h11.Connection) -> h11.Response | None:
    """The proxy's final response to CONNECT, or None if it closed before a byte of it
    (h11 calls that a protocol error, but it is a proxy hanging up, not one that is
    not HTTP)."""
    answered = False
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(READ_SIZE)
            if not data and not answered:
                return None
            answered = True
            client.receive_data(data)  # b"" marks EOF
            continue
        # InformationalResponse (1xx) precedes the real answer: keep reading.


def proxy_environment() -> Mapping[str, str]:
    """The process environment (a seam for tests)."""
    return os.environ


def proxy_dialer(config: AgentConfig, environ: Mapping[str, str]) -> ProxyDialer | None:
    """The dialer the agent uses for ``config``: through a proxy, or None for direct.

    Raises:
        ConfigError: the ``proxy`` setting or an environment variable is unusable.
    """
    relay = config.relay_url
    proxy = config.proxy_url or choose_proxy(config.proxy, relay.host, relay.port,
                                             relay.secure, environ)
    if proxy is None:
        return None
    if config.proxy_password_file is not None and proxy.username is None:
        raise ConfigError(f"proxy_password_file is set but the proxy {proxy} "
                          f"(from {proxy.source}) has no user name: write "
                          f"http://USER@{proxy.address}", key_path="proxy_password_file")
    return ProxyDialer(proxy, config.proxy_password_file)
