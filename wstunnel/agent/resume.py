"""The agent's side of session resumption: reconnect, and hand the session its new carrier.

Theory of operation
-------------------
The relay offered a resumable session (``X-Wstunnel-Resumable``: id, secret,
grace; relay/resume.py). When its carrier is lost without a close handshake
(a path cut, a proxy restart, a NAT that forgot the mapping, no answer to
pings), the session's transport asks ``AgentResumer.new_carrier``: the agent
keeps its local sockets and channels and reconnects, by whichever transport
passes now (transports.py: the one that worked last first, so a proxy that
began stripping Upgrade moves the session to the HTTP fallback), through
whatever proxy it is configured for, with backoff, until the relay's grace is
over. Each attempt carries ``X-Wstunnel-Resume: ID SECRET
RECEIVED``. The relay answers ``X-Wstunnel-Resumed: COUNT`` (both sides then
replay what the other missed, replay.py) or ``no; why`` with a fresh session:
the old one then ends (its channels are reset, as net/ending.py says a lost
session's are) and the fresh connection becomes the agent's next session at
once. A refused login ends it too, with the reason in one line.

A daemon agent also says which process of which agent it is
(``X-Wstunnel-Instance``, ``this_instance``): the identity is a digest of what
tells two daemons apart and stays across a restart (the host, the user, the
config file, the forwards), the generation the process's start time. The
relay then ends at once the held sessions of the process this one replaced,
instead of keeping their channels for a resume that cannot come.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from ..config import AgentConfig
from ..errors import AuthenticationError, HandshakeError
from ..net.resumption import NewCarrier, Resumable
from ..replay import RESUME_HEADER, RESUMED_HEADER, Instance, Ticket
from .transports import Opened

__all__ = ["AgentResumer", "this_instance"]

log = logging.getLogger("wstunnel.agent")

#: Reconnect attempts while resuming: quick at first (a path cut is often short).
FIRST_RETRY = 0.1
MAX_RETRY = 1.0

#: Opens a connection to the relay with these extra headers, by this transport.
Reconnect = Callable[[list[tuple[str, str]], "str | None"], Awaitable[Opened]]


class AgentResumer:
    """One resumable session's way back to the relay."""

    def __init__(self, ticket: Ticket, reconnect: Reconnect,
                 fresh: Callable[[Opened], Awaitable[bool]]) -> None:
        """``reconnect`` opens a connection (to the relay that holds the session);
        ``fresh`` takes a new session the relay gave instead of the old one (the
        agent's next session), or declines it (False: it is closed here)."""
        self.ticket = ticket
        self._reconnect = reconnect
        self._fresh = fresh

    @property
    def grace(self) -> float:
        return self.ticket.grace

    async def new_carrier(self, transport: Resumable, lost: str) -> NewCarrier | str:
        replay = transport.protocol.replay
        assert replay is not None, "only a resumable session has a resumer"
        deadline = trio.current_time() + self.grace
        delay, attempt = FIRST_RETRY, 0
        while True:
            attempt += 1
            header = [(RESUME_HEADER, self.ticket.request(replay.received))]
            # (the grace is our scope's deadline: an attempt's own TooSlowError, an
            # HTTP transport's handshake_timeout, is one failed attempt, not the end)
            try:
                with trio.move_on_at(deadline) as grace:  # (by any transport that passes)
                    opened = await self._reconnect(header, None)
            except AuthenticationError as exc:
                return f"{lost}; the relay refused the resume: {exc}"
            except (OSError, HandshakeError, trio.BrokenResourceError,
                    trio.TooSlowError) as exc:
                wait = min(delay, max(0.0, deadline - trio.current_time()))
                log.info("resuming the session: attempt %d failed (%s); again in %.1f s",
                         attempt, str(exc) or "no answer within handshake_timeout", wait)
                await trio.sleep(wait * random.uniform(0.8, 1.0))
                delay = min(MAX_RETRY, delay * 2)
                continue
            if grace.cancelled_caught:
                return (f"{lost}; not reconnected within the relay's resume grace "
                        f"({self.grace:g} s, {attempt} attempts)")
            answer = opened.headers.get(RESUMED_HEADER.lower(), "")
            if answer.isascii() and answer.isdigit():  # (not "²", a digit to str)
                return NewCarrier(opened.stream, opened.trailing, int(answer),
                                  framed=opened.framed)
            if not await self._fresh(opened):
                await trio.aclose_forcefully(opened.stream)
            why = answer.partition(";")[2].strip() or "it did not say why"
            return f"{lost}; the relay could not resume the session: {why}"


def this_instance(config: AgentConfig) -> Instance:
    """This process of the daemon agent ``config`` configures: the same identity
    after a restart on the same host with the same configuration, another for a
    daemon elsewhere, of another user, config file or forwards (a digest: the
    relay learns none of them); the generation is the start time (nanoseconds)."""
    source = Path(config.source)
    parts = [socket.gethostname(), _machine_id(), str(os.getuid()),
             str(source.resolve()) if source.is_file() else config.source,
             *sorted(str(forward) for forward in config.forwards)]
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).digest()
    identity = base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")
    return Instance(identity, time.time_ns())


def _machine_id() -> str:
    """/etc/machine-id where there is one: two hosts may share a host name."""
    try:
        return Path("/etc/machine-id").read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""
