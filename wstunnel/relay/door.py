"""The relay's door: what to answer an upgrade request, and whose login it is, without I/O.

Theory of operation
-------------------
Everything the relay decides between reading an HTTP request and switching
to WebSocket is here, over values and bytes: the caller reads the request
(``upgrade.read_request``), hands it to ``Door.enter`` with who sent it
(``Visitor``) and the time, and gets one of three results:

* ``Answer``: the HTTP response to send before closing: the health check,
  404 for another path, 503 while draining, 426/400 for a request that is
  not a good upgrade, 401/429/503 for a refused login;
* ``NeedsLogin``: a ``scrypt`` token nobody has checked yet (~40 ms of one
  core). The caller runs that check under the relay-wide budget (guard.py,
  the one part that needs threads and waiting) and passes the outcome to
  ``finish_login``, which returns an ``Answer`` or an ``Accepted``;
* ``Accepted``: the session's ``Identity``; ``Door.start_session`` then gives
  the 101 answer and the relay's end of the tunnel protocol.

Each result carries its ``LogLine``s, which the caller logs in order: the
door never logs, reads a clock or touches a socket, so unit and fuzz tests
drive it with bytes alone (``now`` is an argument).

The login rules:

* every token is checked, whatever else came from the same address: a
  stranger behind the same NAT (or every client, behind a proxy that is not
  in ``trusted_proxies``) cannot lock a correct token out. Failures are
  counted per source (the X-Forwarded-For client when trusted proxies vouch
  for it) only to log a source that keeps failing once per interval, not
  once per attempt, and to queue its scrypt checks behind the others;
* a missing, malformed, unknown or wrong token gets the same 401 (the log
  line, for the operator, says which);
* an ``hmac-sha256`` hash is checked inline (a microsecond); a ``scrypt``
  one once per token: a token that passed is remembered, so a returning
  agent costs an HMAC;
* with mutual TLS the certificate's common name names the agent; a token, if
  sent, must belong to the same agent (and is required when the agent's
  entry has a ``token_hash``);
* an agent already holding ``max_sessions_per_agent`` sessions gets 429. The
  check takes the place it grants (a ``Seat``) in the same step, so a session
  still being opened (its body not yet read, its 101 not yet sent) counts and
  logins racing it cannot pass the limit; the relay gives the place back when
  the session ends, or when the opening fails. A request joining a session
  the agent holds, or resuming one, takes none (docs/PROTOCOL.md §12); a relay
  with ``no_auth`` has no per-agent limit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeAlias

from .. import mux, ws
from ..framing import HTTP_TRANSPORTS, SESSION_HEADER, TRANSPORT_HEADER
from ..protocol import SessionLimits, TunnelProtocol
from ..replay import RESUME_HEADER
from ..security.auth import (
    ANONYMOUS,
    RateLimiter,
    VerifiedTokens,
    bearer_token,
    token_agent,
    verify_token,
)
from ..security.forwarded import client_address

if TYPE_CHECKING:
    from ..config import AgentAccount, RelayConfig
    from ..security.policy import Policy

__all__ = [
    "DRAINING",
    "DRAINING_HEALTH",
    "Accepted",
    "Answer",
    "Door",
    "Identity",
    "LogLine",
    "NeedsLogin",
    "Outcome",
    "Seat",
    "Visitor",
    "http_transport",
    "server_handshake",
    "session_limits",
]

MAX_HEADER_SIZE: Final = 16384  # request line and headers of an upgrade (431 beyond)
MAX_HEADERS: Final = 100
BUSY_LOG_INTERVAL: Final = 10.0  # at most one "scrypt checks are saturated" line per this
#: The 503 to a new session while the relay drains (agent/explain.py knows its start) ...
DRAINING: Final = ("the relay is shutting down and takes no new session (it lets its sessions "
                   "finish): connect to another relay, or try again once this one is back")
#: ... and its GET /health meanwhile: 404, which a balancer takes as "no new sessions, but
#: still the ones stuck to it" (haproxy: http-check disable-on-404), its resumes taken.
DRAINING_HEALTH: Final = ("draining: shutting down; only resumes of the sessions this relay "
                          "holds are taken")
_AUTH_HEADERS: Final = (("WWW-Authenticate", 'Bearer realm="wstunnel"'),)


@dataclass(frozen=True)
class Identity:
    """Who a session belongs to, and where it may connect."""

    name: str
    policy: Policy


@dataclass(frozen=True, slots=True)
class Visitor:
    """Who knocked: the TCP peer as logs name it ("host:port"), its address, and the
    agent named by its client certificate (mutual TLS; None without one)."""

    peer: str
    peer_host: str
    cert_name: str | None = None


class Seat:
    """One connection's place among its agent's ``max_sessions_per_agent`` sessions.

    The door takes it when it lets a new session in; whoever holds the
    connection gives it back (``release``, idempotent) when the session ends or
    when it never starts: the answer not sent, the client gone, cancelled.
    """

    __slots__ = ("_agent", "_held")

    def __init__(self) -> None:
        self._agent: str | None = None
        self._held: Counter[str] | None = None

    @property
    def taken(self) -> bool:
        return self._agent is not None

    def take(self, held: Counter[str], agent: str) -> None:
        """Count one more session of ``agent`` in ``held`` (the door's count) until
        ``release``; a place this seat already held is given back first."""
        self.release()
        held[agent] += 1
        self._agent, self._held = agent, held

    def release(self) -> None:
        agent, held = self._agent, self._held
        if agent is None or held is None:
            return
        self._agent = self._held = None
        held[agent] -= 1
        if held[agent] <= 0:
            del held[agent]


@dataclass(frozen=True, slots=True)
class LogLine:
    """A line for the relay's log (``level`` as in ``logging``), already worded."""

    level: int
    text: str


@dataclass(frozen=True, slots=True)
class Answer:
    """Send ``response`` and close. ``failed_login``: a 401 (counted in the metrics)."""

    status: int
    response: bytes
    log: tuple[LogLine, ...] = ()
    failed_login: bool = False


@dataclass(frozen=True, slots=True)
class NeedsLogin:
    """Check ``token`` against ``account``'s scrypt hash, then call ``Door.finish_login``.

    ``source`` is the client's address (what failures are counted by) and
    ``lane`` its place in the queue: 0 for a source with a clean record, 1
    for one that failed lately. ``peer`` names the client in logs.
    """

    account: AgentAccount
    token: str
    source: str
    lane: int
    peer: str
    log: tuple[LogLine, ...] = ()
    joining: bool = False  # an HTTP-transport request for a session the agent holds
    seat: Seat = field(default_factory=Seat, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Accepted:
    """Switch to WebSocket (``start_session``) for agent ``identity``, or serve the HTTP
    transport request; ``peer`` names the client in the session's logs ("client via
    proxy" behind a trusted proxy), ``source`` is its address (failures count by it).
    ``seat``: taken when this is a new session (release it when it ends, or fails)."""

    identity: Identity
    peer: str
    log: tuple[LogLine, ...] = ()
    source: str = ""
    seat: Seat = field(default_factory=Seat, compare=False, repr=False)


Outcome: TypeAlias = Answer | NeedsLogin | Accepted


@dataclass(frozen=True, slots=True)
class _Login:
    """One login being decided: the client's address, its name for logs, the time,
    whether it joins (or resumes) a session the agent holds, the connection's seat."""

    source: str
    peer: str
    now: float
    joining: bool
    seat: Seat


def server_handshake() -> ws.ServerHandshake:
    """The parser for one upgrade request, with the relay's limits."""
    return ws.ServerHandshake(max_header_size=MAX_HEADER_SIZE, max_headers=MAX_HEADERS)


def session_limits(config: RelayConfig) -> SessionLimits:
    """The limits every session of the relay runs under (built per load or reload)."""
    return SessionLimits(
        max_message_size=config.max_message_size,
        initial_window=config.initial_window,
        max_chunk_size=config.max_chunk_size,
        max_send_window=config.max_send_window,
        max_queued_size=config.max_queued_size,
        max_channels=config.max_channels + 1,  # SessionGuard refuses first, and logs
        max_buffered_size=config.max_buffered_size,
    )


class Door:
    """The relay's routing and login decisions, and what they remember between connections.

    One per relay. It remembers failed logins per source, tokens that passed a
    scrypt check and how many sessions each agent holds (the ``Seat``s taken and
    not yet released); ``reconfigure`` replaces the config and keeps all three.
    """

    def __init__(self, config: RelayConfig) -> None:
        self._sessions: Counter[str] = Counter()
        self._limiter = RateLimiter()
        self._verified = VerifiedTokens()
        self._quiet_until: dict[str, float] = {}
        self._busy_count = 0
        self._busy_logged_at = -math.inf
        self.reconfigure(config)

    def reconfigure(self, config: RelayConfig) -> None:
        """Path, agents, tokens, policies and session limits for requests from now on."""
        self.config = config
        self.accounts = {account.name: account for account in config.agents}
        self.limits = session_limits(config)
        self._anonymous = Identity(ANONYMOUS, config.policy)

    def enter(self, handshake: ws.ServerHandshake, request: ws.RequestReceived | ws.HandshakeFailed,
              visitor: Visitor, *, now: float, stopping: bool = False,
              seat: Seat | None = None) -> Outcome:
        """What to do with one request: answer it, check its scrypt token, or accept it.

        Args:
            handshake: the parser that read ``request``; it words the answers.
            request: what it read.
            visitor: who sent it.
            now: the time, in seconds (for counting failed logins).
            stopping: the relay is draining (503 to new sessions).
            seat: the connection's place, taken here for a new session (and
                carried in ``NeedsLogin`` and ``Accepted``); a new one if None.

        Returns:
            An ``Answer`` to send, a ``NeedsLogin`` to check and hand to
            ``finish_login``, or ``Accepted`` (call ``start_session``).
        """
        if isinstance(request, ws.HandshakeFailed):
            line = LogLine(logging.INFO, f"{visitor.peer}: bad HTTP request ({request.message})")
            return Answer(request.status, request.response, (line,))
        source, log = self._client(request, visitor)
        peer = visitor.peer if source == visitor.peer_host else f"{source} via {visitor.peer}"
        joining = (http_transport(request) is not None and request.header(
            SESSION_HEADER) is not None) or resuming(request)
        outcome: Outcome | None = self._route(handshake, request, peer, stopping=stopping,
                                              joining=joining)
        if outcome is None:
            login = _Login(source, peer, now, joining, seat or Seat())
            outcome = self._log_in(handshake, request, visitor.cert_name, login)
        if isinstance(outcome, Answer) and request.method == "HEAD":  # (RFC 9110 9.3.2)
            head = outcome.response.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
            outcome = dataclasses.replace(outcome, response=head)
        return dataclasses.replace(outcome, log=log + outcome.log) if log else outcome

    def finish_login(self, handshake: ws.ServerHandshake, login: NeedsLogin, good: bool | None,
                     *, now: float) -> Answer | Accepted:
        """The outcome once ``login``'s scrypt check ran (``good``: the token matched) or
        found no room in the budget (None: 503, try again)."""
        account = login.account
        if good is None:
            return self._busy(handshake, account.name, now)
        if good and account.token_hash is not None:
            self._verified.remember(account.name, account.token_hash, login.token)
        return self._verdict(handshake, account.name, account, good,
                             _Login(login.source, login.peer, now, login.joining, login.seat))

    def refuse_session(self, handshake: ws.ServerHandshake, accepted: Accepted, problem: str,
                       *, now: float) -> Answer:
        """The answer to an HTTP-transport request for a session that does not exist or
        is not this agent's: exactly a bad login's (``problem`` goes to the log only)."""
        return self._refused(handshake, problem, accepted.source or accepted.peer,
                             accepted.peer, now)

    def start_session(self, handshake: ws.ServerHandshake,
                      extra_headers: Sequence[tuple[str, str]] = (), *,
                      resumable: bool = False) -> tuple[bytes, TunnelProtocol]:
        """The 101 answer to an ``Accepted`` request, and the relay's end of the session it
        starts (already fed with any bytes the agent sent after its request; a
        resumable one counts them, replay.py)."""
        response = handshake.accept(extra_headers)
        protocol = TunnelProtocol(mux.Role.RELAY, limits=self.limits)
        if resumable:
            protocol.enable_resume()
        if handshake.trailing_data:
            protocol.receive_data(handshake.trailing_data)
        return response, protocol

    def _client(self, request: ws.RequestReceived,
                visitor: Visitor) -> tuple[str, tuple[LogLine, ...]]:
        """The client's address: from X-Forwarded-For only when trusted proxies vouch for it.

        It names the client in logs and is what failed logins are counted by.
        """
        forwarded_for = request.header("x-forwarded-for")
        if forwarded_for is None:
            return visitor.peer_host, ()
        client = client_address(visitor.peer_host, forwarded_for, self.config.trusted_proxies)
        if client != visitor.peer_host:
            return client, ()
        return client, (LogLine(logging.DEBUG, f"{visitor.peer}: X-Forwarded-For "
                                f"{forwarded_for!r} ignored (peer not in trusted_proxies)"),)

    def _route(self, handshake: ws.ServerHandshake, request: ws.RequestReceived, peer: str, *,
               stopping: bool, joining: bool) -> Answer | None:
        """The HTTP answer for anything that is not a good upgrade, else None. While the
        relay drains (``stopping``) it takes only requests for sessions it holds
        (``joining``: a resume, an HTTP transport's next request)."""
        path = _origin_path(request.target)
        if path == "/health" and not request.is_upgrade:  # (404 draining: haproxy's NOLB)
            return _answer(handshake, 404, DRAINING_HEALTH) if stopping else _answer(
                handshake, 200, "ok")
        if path != self.config.path:
            return _answer(handshake, 404, f"nothing here; the tunnel is at {self.config.path}")
        if stopping and not joining:
            return _answer(handshake, 503, DRAINING)
        transport = request.header(TRANSPORT_HEADER.lower())
        if not request.is_upgrade and transport is not None:
            if http_transport(request) is None:
                return _answer(handshake, 400, f"unknown {TRANSPORT_HEADER}: use one of "
                                               f"{', '.join(HTTP_TRANSPORTS)}")
            return None  # an HTTP-transport request: logged in like an upgrade
        if not request.is_upgrade or request.upgrade_problem is not None:
            problem = request.upgrade_problem or "plain HTTP request on the tunnel path"
            status = 400 if request.is_upgrade else 426  # (ws: RFC 6455 4.2.2, 4.4)
            return Answer(status, handshake.default_response(),
                          (LogLine(logging.INFO, f"{peer}: {problem}"),))
        if ws.SUBPROTOCOL not in request.subprotocols:
            return _answer(handshake, 400,
                           f"this is a wstunnel relay; use subprotocol {ws.SUBPROTOCOL}")
        return None

    def _log_in(self, handshake: ws.ServerHandshake, request: ws.RequestReceived,
                cert_name: str | None, login: _Login) -> Outcome:
        """Who the agent is, from its client certificate and its token (with ``no_auth``
        anybody, with no per-agent limit)."""
        if self.config.no_auth:
            return Accepted(self._anonymous, login.peer, source=login.source, seat=login.seat)
        header = request.header("authorization")
        token = bearer_token(header)
        if cert_name is not None:
            account = self.accounts.get(cert_name)
            if account is None:
                problem = f"client certificate for unknown agent {cert_name!r}"
                return self._refused(handshake, problem, login.source, login.peer, login.now)
            if token is None and account.token_hash is None:
                return self._admitted(handshake, account, login)
        if token is None:
            problem = "no Authorization header" if header is None else "not a Bearer token"
            return self._refused(handshake, problem, login.source, login.peer, login.now)
        return self._check_token(handshake, token, cert_name, login)

    def _check_token(self, handshake: ws.ServerHandshake, token: str, cert_name: str | None,
                     login: _Login) -> Outcome:
        """Check a token inline, or say it needs a scrypt check (never remembered as wrong)."""
        name = token_agent(token)
        account = self.accounts.get(name) if name is not None else None
        if cert_name is not None and name != cert_name:
            account = None
        stored = account.token_hash if account is not None else None
        if account is None or stored is None or not stored.slow:
            good = verify_token(token, stored)  # a microsecond: no queue, no thread
        elif self._verified.known(account.name, stored, token):
            good = True
        else:
            source, now = login.source, login.now
            lane = 0 if self._limiter.is_clean(source, now) else 1
            self._limiter.charge(source, now)  # at once: a flood's next try from here is lane 1
            return NeedsLogin(account, token, source, lane, login.peer, joining=login.joining,
                              seat=login.seat)
        return self._verdict(handshake, name, account, good, login)

    def _verdict(self, handshake: ws.ServerHandshake, name: str | None,
                 account: AgentAccount | None, good: bool, login: _Login) -> Answer | Accepted:
        if not good or account is None:
            return self._refused(handshake, self._token_problem(name, account), login.source,
                                 login.peer, login.now)
        return self._admitted(handshake, account, login)

    def _token_problem(self, name: str | None, account: AgentAccount | None) -> str:
        """For the log: what was wrong with a refused token (never the token itself)."""
        if account is not None:
            return f"wrong token for agent {name!r}"
        if name is None:
            return "not a wstunnel token (NAME.SECRET)"
        if name in self.accounts:  # (only when a client certificate names another agent)
            return f"token for agent {name!r} with another agent's client certificate"
        return f"token for unknown agent {name!r}"

    def _admitted(self, handshake: ws.ServerHandshake, account: AgentAccount,
                  login: _Login) -> Answer | Accepted:
        """The agent is who it says: in, its seat taken, unless it has too many sessions
        already (a request joining or resuming a session it holds is not a new one)."""
        if not login.joining:
            refusal = self._take_seat(handshake, login.seat, account.name, login.peer)
            if refusal is not None:
                return refusal
        return Accepted(Identity(account.name, account.policy), login.peer, source=login.source,
                        seat=login.seat)

    def admit_new_session(self, handshake: ws.ServerHandshake, accepted: Accepted, *,
                          stopping: bool) -> Answer | None:
        """A resume let in past the drain and the session limit that gets a new session
        instead (the relay no longer knows it): a new session must pass both (the
        limit takes ``accepted.seat``)."""
        if stopping:
            return _answer(handshake, 503, DRAINING)
        if self.config.no_auth:
            return None
        return self._take_seat(handshake, accepted.seat, accepted.identity.name, accepted.peer)

    def _take_seat(self, handshake: ws.ServerHandshake, seat: Seat, name: str,
                   peer: str) -> Answer | None:
        """Take ``seat`` for agent ``name``; 429 when it holds its limit already.
        (Check and take are one step: no other login can pass in between.)"""
        held = self._sessions[name]
        if held < self.config.max_sessions_per_agent:
            seat.take(self._sessions, name)
            return None
        line = LogLine(logging.WARNING, f"{peer}: agent {name} already has {held} "
                                        f"sessions (max_sessions_per_agent); refused")
        response = handshake.reject(429, f"agent {name} has too many sessions",
                                    (("Retry-After", "30"),))
        return Answer(429, response, (line,))

    def _refused(self, handshake: ws.ServerHandshake, problem: str, source: str, peer: str,
                 now: float) -> Answer:
        """401, the same whatever was wrong; ``problem`` goes to the log only."""
        response = handshake.reject(401, "authentication failed", _AUTH_HEADERS)
        return Answer(401, response, self._failure_log(peer, source, problem, now),
                      failed_login=True)

    def _failure_log(self, peer: str, source: str, problem: str,
                     now: float) -> tuple[LogLine, ...]:
        """One line per failure while ``source`` is within its budget, then one per interval."""
        limiter = self._limiter
        text = f"{peer}: authentication failed from {source}: {problem}"
        if limiter.retry_after(source, now) > 0:
            if self._quiet_until.get(source, 0.0) > now:
                text = ""
            else:
                self._quiet_until[source] = now + limiter.interval
                if len(self._quiet_until) > limiter.max_keys:
                    self._quiet_until.clear()
                text += (f"; more failures from {source} are logged at most one per "
                         f"{limiter.interval:.0f} s")
        limiter.charge(source, now)
        return (LogLine(logging.WARNING, text),) if text else ()

    def _busy(self, handshake: ws.ServerHandshake, name: str, now: float) -> Answer:
        """503: no room for one more scrypt check; logged once per ``BUSY_LOG_INTERVAL``."""
        self._busy_count += 1
        log: tuple[LogLine, ...] = ()
        if now >= self._busy_logged_at + BUSY_LOG_INTERVAL:
            log = (LogLine(logging.WARNING, (
                f"scrypt token checks are saturated ({self._busy_count} logins answered 503 "
                f"busy since the last such line; the latest for agent {name}): give agents "
                f"tokens from `wstunnel keygen --token NAME`, whose hmac-sha256 hashes cost "
                f"nothing")),)
            self._busy_count = 0
            self._busy_logged_at = now
        response = handshake.reject(503, "the relay is busy checking logins; try again in a "
                                         "second", (("Retry-After", "1"),))
        return Answer(503, response, log)


def _origin_path(target: str) -> str:
    """The path of a request target, also in absolute form (``http://host:port/path``,
    which a server must accept: RFC 9112 §3.2.2), without the query."""
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        target = "/" + rest.partition("/")[2]
    return target.split("?", 1)[0]


def resuming(request: ws.RequestReceived) -> bool:
    """An upgrade or HTTP-transport request that resumes a session the agent holds (not
    a new session: it does not count against max_sessions_per_agent, and passes while
    the relay drains, on every transport: docs/PROTOCOL.md §12)."""
    value = request.header(RESUME_HEADER.lower())
    carrier = request.is_upgrade or http_transport(request) is not None
    return carrier and value is not None and value.strip() != "new"


def http_transport(request: ws.RequestReceived) -> str | None:
    """The HTTP transport a request that is not an upgrade asks for (its
    ``X-Wstunnel-Transport`` header), or None."""
    value = request.header(TRANSPORT_HEADER.lower())
    if value is None or request.is_upgrade:
        return None
    value = value.strip().lower()
    return value if value in HTTP_TRANSPORTS else None


def _answer(handshake: ws.ServerHandshake, status: int, text: str) -> Answer:
    return Answer(status, handshake.reject(status, text))
