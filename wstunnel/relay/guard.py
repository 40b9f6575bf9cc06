"""The relay's guard: TLS, the budget for slow login checks, and each session's limits.

Theory of operation
-------------------
``Gatekeeper`` (one per relay) owns what is shared between connections: the
current TLS context (swapped on SIGHUP; sessions keep the one they started
with), the ``Door`` (door.py: routing and the login decision, with the
failed-login counts, remembered tokens and sessions per agent it needs), and
the budget for scrypt checks. The door decides everything it can inline
(an ``hmac-sha256`` hash costs a microsecond, so a flood from any number of
addresses costs what its connections cost, and no queue forms for a correct
token to wait in). What it cannot, a ``scrypt`` hash (the older keygen
form) nobody has checked yet, ``authenticate`` runs under a fixed budget
(``_SlowChecks``: two threads, a short bounded queue, sources that keep
failing last); beyond it the answer is 503 with ``Retry-After: 1``, not a
longer queue.

``SessionGuard`` (one per session) answers, synchronously and before any
task is started, whether an OPEN may proceed: channel count, opens still
dialling, and bytes the session may have to buffer (live channels x the
window a channel opens with: mux's ``plan_windows``, 16 KiB once
``max_buffered_size`` cannot cover every channel at ``initial_window``).
A refusal is OPEN_FAILED "limit reached" for that channel only, plus a log
line.
"""

from __future__ import annotations

import itertools
import logging
import ssl
from collections.abc import Callable
from functools import partial
from typing import Final

import trio

from .. import mux, ws
from ..config import RelayConfig
from ..errors import ConfigError
from ..net.plain_stream import take_over
from ..net.tls_stream import start_tls
from ..security.auth import ANONYMOUS, expand_credentials, verify_token
from ..security.listen_policy import ListenPolicy
from ..security.policy import Policy
from ..security.tls import client_identity, server_context
from .door import Accepted, Answer, Door, Identity, NeedsLogin, session_limits

__all__ = ["Gatekeeper", "Identity", "SessionGuard"]

log = logging.getLogger("wstunnel.relay")

_HASH_WORKERS: Final = 2  # scrypt checks at once: ~40 ms of one core each
_MAX_WAITING: Final = 8  # waiting scrypt checks, relay-wide (~0.15 s of work)
_PER_SOURCE: Final = 2  # of those, from one source address


class Gatekeeper:
    """TLS context, authentication and per-agent session counts for one relay."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.door = Door(config)
        self.accounts = self.door.accounts
        self.ssl_context: ssl.SSLContext | None = None
        self._slow = _SlowChecks()
        self._anonymous = Identity(ANONYMOUS, config.policy)
        self.ssl_context = _tls_context(config)

    # -- TLS ------------------------------------------------------------------

    def current_policy(self, identity: Identity) -> Policy | None:
        """The agent's policy in the config as it is now (a reload may have changed it).

        None when the agent is no longer configured: its session may finish
        what is open, but opens nothing new. This runs on every OPEN, so it hands
        out the account's one ``Policy`` (built at load or reload), never a new
        one: its verdict cache then serves every channel of every session.
        """
        if identity.name == ANONYMOUS:
            return self._anonymous.policy
        account = self.accounts.get(identity.name)
        return None if account is None else account.policy

    def current_listen_policy(self, identity: Identity) -> ListenPolicy | None:
        """Where the agent's reverse forwards may listen, as configured now; None when
        the agent is no longer configured."""
        if identity.name == ANONYMOUS:
            return self.config.listen_policy
        account = self.accounts.get(identity.name)
        return None if account is None else account.listen_policy

    def reconfigure(self, config: RelayConfig) -> None:
        """A reloaded config: agents, tokens, policies and certificate for new logins.

        Sessions already up keep what they logged in with; failed-login counts
        and per-agent session counts carry over.

        Raises:
            ConfigError: the certificate or key does not load; nothing was changed.
        """
        context = _tls_context(config)  # (first: a bad certificate refuses the whole reload)
        had_tls = self.config.tls is not None
        self.config = config
        self.door.reconfigure(config)
        self.accounts = self.door.accounts
        self._anonymous = Identity(ANONYMOUS, config.policy)
        self.ssl_context = context
        if config.tls is not None:
            log.info("TLS certificate reloaded from %s; new connections use it",
                     config.tls.cert_file)
        elif had_tls:
            log.warning("the reloaded config has no tls section: new connections are plain ws://")

    async def secure(self, tcp: trio.SocketStream) -> tuple[trio.abc.Stream, str | None]:
        """The stream to speak HTTP on, and the client certificate's name (mutual TLS)."""
        context = self.ssl_context
        if context is None:
            return take_over(tcp), None
        stream = await start_tls(tcp, context, server_side=True)
        return stream, client_identity(stream.getpeercert())

    # -- authentication ---------------------------------------------------------

    async def authenticate(self, handshake: ws.ServerHandshake,
                           login: NeedsLogin) -> Answer | Accepted:
        """Run the scrypt check the door asked for, within the relay-wide budget; the door
        turns its outcome into the answer (a 503 when the budget had no room)."""
        check = partial(verify_token, login.token, login.account.token_hash)
        good = await self._slow.run(login.source, login.lane, check)
        return self.door.finish_login(handshake, login, good, now=trio.current_time())


class _Turn:
    """One scrypt check waiting for a worker."""

    __slots__ = ("lane", "seq", "source", "woken", "evicted")

    def __init__(self, lane: int, seq: int, source: str) -> None:
        self.lane, self.seq, self.source = lane, seq, source
        self.woken = trio.Event()
        self.evicted = False

    def order(self) -> tuple[int, int]:
        return self.lane, self.seq


class _SlowChecks:
    """The relay-wide budget for scrypt checks: a fixed cost, whoever floods.

    ``workers`` checks run at once (in threads) and at most ``max_waiting``
    wait, at most ``per_source`` of them from one source. Lane 0 (sources with
    nothing on their record) goes before lane 1, first come first served
    within a lane; when the queue is full, a lane-0 check takes the place of
    the latest lane-1 one. A check that finds no room is not run at all (the
    caller answers 503): a flood cannot build a queue, so a check never waits
    for more than about ``max_waiting / workers + 1`` others.
    """

    def __init__(self, *, workers: int = _HASH_WORKERS, max_waiting: int = _MAX_WAITING,
                 per_source: int = _PER_SOURCE) -> None:
        self._free = workers
        self._max_waiting = max_waiting
        self._per_source = per_source
        self._waiting: list[_Turn] = []  # short (max_waiting): scanning beats a heap
        self._seq = itertools.count()

    async def run(self, source: str, lane: int, check: Callable[[], bool]) -> bool | None:
        """``check()`` in a worker thread; None (not run) when there is no room."""
        if self._free > 0:  # (then nothing waits: a freed worker goes to a waiter first)
            self._free -= 1
        else:
            turn = _Turn(lane, next(self._seq), source)
            if not self._make_room(source, lane) or not await self._wait_turn(turn):
                return None
        try:
            return await trio.to_thread.run_sync(check)
        finally:
            self._hand_on()

    def _make_room(self, source: str, lane: int) -> bool:
        """Whether a check may wait, evicting a later-lane one when the queue is full."""
        if sum(turn.source == source for turn in self._waiting) >= self._per_source:
            return False
        if len(self._waiting) < self._max_waiting:
            return True
        last = max(self._waiting, key=_Turn.order)
        if last.lane <= lane:
            return False
        self._waiting.remove(last)
        last.evicted = True
        last.woken.set()
        return True

    async def _wait_turn(self, turn: _Turn) -> bool:
        """True once a worker is ours; False if a cleaner source's check took our place."""
        self._waiting.append(turn)
        try:
            await turn.woken.wait()
        except BaseException:
            if turn in self._waiting:
                self._waiting.remove(turn)
            elif not turn.evicted:
                self._hand_on()  # cancelled just as its turn came: pass the worker on
            raise
        return not turn.evicted

    def _hand_on(self) -> None:
        """A worker is free: give it to the first waiting check, or keep it."""
        if self._waiting:
            turn = min(self._waiting, key=_Turn.order)
            self._waiting.remove(turn)
            turn.woken.set()
        else:
            self._free += 1


def _tls_context(config: RelayConfig) -> ssl.SSLContext | None:
    """The server context for ``config.tls`` (None: plain ws://), read from its files now.

    Raises:
        ConfigError: a file is missing or unreadable, or not a PEM certificate and key.
    """
    tls = config.tls
    if tls is None:
        return None
    client_ca = expand_credentials(tls.client_ca_file) if tls.client_ca_file else None
    try:
        return server_context(expand_credentials(tls.cert_file),
                              expand_credentials(tls.key_file), client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {tls.cert_file} and key "
                          f"{tls.key_file}: {_ssl_reason(exc)}", source=config.source,
                          key_path="tls") from exc


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
        limits = session_limits(config)  # the session's own limits, to refuse first
        self._plan = mux.plan_windows(limits.max_channels, limits.initial_window,
                                      limits.max_buffered_size)

    def admit(self, open_channels: int) -> str | None:
        """None if one more channel may open now, else why not (OPEN_FAILED "limit reached").

        The text names the limit and stays the same for every refusal it
        causes, so the relay's log can count refusals by it.
        """
        config = self.config
        if open_channels >= config.max_channels:
            return f"max_channels {config.max_channels} reached"
        plan = self._plan
        if open_channels >= plan.max_channels:
            return (f"max_buffered_size {config.max_buffered_size} reached ({plan.max_channels} "
                    f"channels x the {plan.open_window}-byte window each opens with)")
        if self.pending >= config.max_pending_opens:
            return (f"max_pending_opens {config.max_pending_opens} reached (opens in flight: "
                    f"destinations still being dialled)")
        return None
