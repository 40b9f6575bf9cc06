"""The relay's door: TLS, who an agent is, and the limits each session lives under.

Theory of operation
-------------------
``Gatekeeper`` (one per relay) owns what is shared between connections: the
current TLS context (swapped on SIGHUP; sessions keep the one they started
with), the per-source rate limiter for failed logins, and the count of
sessions per agent. ``authenticate`` turns a good upgrade request into an
``Identity`` or into the HTTP answer to send instead:

* a source over its failure budget gets 429 with ``Retry-After`` before any
  hashing happens;
* a missing, malformed, unknown or wrong token gets the same 401 (the log
  line, for the operator, says which); scrypt runs in a worker thread, at
  most two at a time, so logins never stall the event loop;
* an agent already holding ``max_sessions_per_agent`` sessions gets 429.

With mutual TLS the certificate's common name names the agent; a token, if
sent, must belong to the same agent (and is required when the agent's entry
has a ``token_hash``).

``SessionGuard`` (one per session) answers, synchronously and before any
task is started, whether an OPEN may proceed: channel count, opens still
dialling, and bytes the session may have to buffer (live channels x window).
A refusal is OPEN_FAILED "limit reached" for that channel only, plus a log
line.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections import Counter
from dataclasses import dataclass
from typing import Final

import trio

from . import ws
from .auth import ANONYMOUS, RateLimiter, bearer_token, expand_credentials, token_agent
from .auth import verify_token as _verify_token
from .config import AgentAccount, RelayConfig
from .errors import ConfigError
from .net.plain_stream import take_over
from .net.tls_stream import start_tls
from .policy import Policy
from .tls import client_identity, server_context

__all__ = ["Gatekeeper", "Identity", "SessionGuard"]

log = logging.getLogger("wstunnel.relay")

_HASH_WORKERS: Final = 2
_AUTH_HEADERS: Final = (("WWW-Authenticate", 'Bearer realm="wstunnel"'),)


@dataclass(frozen=True)
class Identity:
    """Who a session belongs to, and where it may connect."""

    name: str
    policy: Policy


class Gatekeeper:
    """TLS context, authentication and per-agent session counts for one relay."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.accounts = {account.name: account for account in config.agents}
        self.limiter = RateLimiter()
        self.sessions: Counter[str] = Counter()
        self.ssl_context: ssl.SSLContext | None = None
        self._hashing = trio.CapacityLimiter(_HASH_WORKERS)
        self._anonymous = Identity(ANONYMOUS, config.policy)
        self._quiet_until: dict[str, float] = {}
        if config.tls is not None:
            try:
                self.ssl_context = self._load_tls()
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load the TLS certificate {config.tls.cert_file} and "
                                  f"key {config.tls.key_file}: {_ssl_reason(exc)}",
                                  source=config.source, key_path="tls") from exc

    # -- TLS ------------------------------------------------------------------

    def _load_tls(self) -> ssl.SSLContext:
        tls = self.config.tls
        assert tls is not None
        client_ca = expand_credentials(tls.client_ca_file) if tls.client_ca_file else None
        return server_context(expand_credentials(tls.cert_file),
                              expand_credentials(tls.key_file), client_ca)

    def reload_tls(self) -> bool:
        """Re-read the certificate and key for new connections; keep the old ones on error."""
        if self.config.tls is None:
            log.info("reload requested, but the relay serves plain ws:// (no tls section)")
            return False
        try:
            self.ssl_context = self._load_tls()
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS reload failed, still serving the previous certificate: %s",
                      _ssl_reason(exc))
            return False
        log.info("TLS certificate reloaded from %s; new connections use it",
                 self.config.tls.cert_file)
        return True

    def current_policy(self, identity: Identity) -> Policy | None:
        """The agent's policy in the config as it is now (a reload may have changed it).

        None when the agent is no longer configured: its session may finish
        what is open, but opens nothing new.
        """
        if identity.name == ANONYMOUS:
            return self._anonymous.policy
        account = self.accounts.get(identity.name)
        return None if account is None else account.policy

    def reconfigure(self, config: RelayConfig) -> None:
        """A reloaded config: agents, tokens, policies and certificate for new logins.

        Sessions already up keep what they logged in with; failed-login counts
        and per-agent session counts carry over.
        """
        had_tls = self.config.tls is not None
        self.config = config
        self.accounts = {account.name: account for account in config.agents}
        self._anonymous = Identity(ANONYMOUS, config.policy)
        if config.tls is not None:
            self.reload_tls()
        elif had_tls:
            log.warning("the reloaded config has no tls section: new connections are plain ws://")
            self.ssl_context = None

    async def secure(self, tcp: trio.SocketStream) -> tuple[trio.abc.Stream, str | None]:
        """The stream to speak HTTP on, and the client certificate's name (mutual TLS)."""
        context = self.ssl_context
        if context is None:
            return take_over(tcp), None
        stream = await start_tls(tcp, context, server_side=True)
        return stream, client_identity(stream.getpeercert())

    # -- authentication ---------------------------------------------------------

    async def authenticate(self, handshake: ws.ServerHandshake, request: ws.RequestReceived,
                           peer: str, source: str, cert_name: str | None) -> Identity | bytes:
        """The session's identity, or the HTTP answer (401/429) to send instead."""
        if self.config.no_auth:
            return self._anonymous
        now = trio.current_time()
        wait = self.limiter.retry_after(source, now)
        if wait > 0:
            if self._quiet_until.get(source, 0.0) <= now:  # one line per source per wait
                self._quiet_until[source] = now + wait
                log.warning("%s: too many failed logins from %s; answering 429 for %.0f s",
                            peer, source, wait)
            return handshake.reject(429, "too many failed attempts; try again later",
                                    (("Retry-After", str(math.ceil(wait))),))
        account, problem = await self._check(request, cert_name)
        if account is None:
            self.limiter.charge(source, trio.current_time())
            if len(self._quiet_until) > self.limiter.max_keys:
                self._quiet_until.clear()
            log.warning("%s: authentication failed from %s: %s", peer, source, problem)
            return handshake.reject(401, "authentication failed", _AUTH_HEADERS)
        if self.sessions[account.name] >= self.config.max_sessions_per_agent:
            log.warning("%s: agent %s already has %d sessions (max_sessions_per_agent); "
                        "refused", peer, account.name, self.sessions[account.name])
            return handshake.reject(429, f"agent {account.name} has too many sessions",
                                    (("Retry-After", "30"),))
        return Identity(account.name, account.policy)

    async def _check(self, request: ws.RequestReceived,
                     cert_name: str | None) -> tuple[AgentAccount | None, str]:
        """(account, "") on success, else (None, what was wrong: for the log only)."""
        header = request.header("authorization")
        token = bearer_token(header)
        if cert_name is not None:
            account = self.accounts.get(cert_name)
            if account is None:
                return None, f"client certificate for unknown agent {cert_name!r}"
            if token is None and account.token_hash is None:
                return account, ""
        if token is None:
            what = "no Authorization header" if header is None else "not a Bearer token"
            return None, what
        name = token_agent(token)
        account = self.accounts.get(name) if name is not None else None
        if cert_name is not None and name != cert_name:
            account = None
        stored = account.token_hash if account is not None else None
        async with self._hashing:
            good = await trio.to_thread.run_sync(_verify_token, token, stored)
        if not good:
            return None, (f"wrong token for agent {name!r}" if account is not None
                          else f"token for unknown agent {name!r}")
        return account, ""

    # -- sessions ---------------------------------------------------------------

    def session_started(self, identity: Identity) -> None:
        self.sessions[identity.name] += 1

    def session_ended(self, identity: Identity) -> None:
        self.sessions[identity.name] -= 1
        if self.sessions[identity.name] <= 0:
            del self.sessions[identity.name]


def _ssl_reason(exc: OSError) -> str:
    """One readable line for a file or OpenSSL error."""
    if isinstance(exc, ssl.SSLError):
        return (f"{exc.reason or exc} (is it a PEM certificate chain and the matching "
                f"unencrypted private key?)")
    return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)


class SessionGuard:
    """Per-session limits on OPENs; see the module docstring."""

    def __init__(self, identity: Identity, config: RelayConfig) -> None:
        self.identity = identity
        self.config = config
        self.pending = 0

    def admit(self, open_channels: int) -> str | None:
        """None if one more channel may open now, else why not (OPEN_FAILED "limit reached")."""
        config = self.config
        if open_channels >= config.max_channels:
            return f"limit reached: {open_channels} channels open (max_channels)"
        if (open_channels + 1) * config.initial_window > config.max_buffered_size:
            return f"limit reached: {open_channels} channels fill max_buffered_size"
        if self.pending >= config.max_pending_opens:
            return f"limit reached: {self.pending} opens in flight (max_pending_opens)"
        return None
