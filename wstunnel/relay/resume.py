"""The relay's side of session resumption: resumable sessions, and their next carriers.

Theory of operation
-------------------
An agent that asks for a resumable session (``X-Wstunnel-Resume: new``) gets
an id and a secret (``X-Wstunnel-Resumable``), registered here with the
agent's name. When the session's carrier is lost, its transport asks
``RelayResumer.new_carrier`` and waits up to ``resume_grace`` for the agent's
resume request, keeping the channels and their destination sockets (the
socket pump reads only as much as the windows allow). A resume request is
first a login like any other; then its id must be known, its agent the same
and its secret right (compared in constant time): otherwise the answer is a
bad login's, so that nobody learns whether an id exists. An id the relay no
longer knows (grace over, relay restarted) gets a fresh session and
``X-Wstunnel-Resumed: no; why``: the agent resets the old channels at once.

A resume request may arrive before the relay has noticed that the old
carrier is gone (the agent saw it first): the old carrier is then stopped
(``TunnelTransport.detach``) before the relay says how many records it has
received, so that no late record on the old connection is counted after
the count was sent (it would be replayed, and arrive twice). The connection
that brought the new carrier stays open until the session moves on from it
(``Held.carrier_done``).

A held session of an agent process that died can never be resumed (its secret
died with it). A daemon agent names itself and its process (``Instance``:
``X-Wstunnel-Instance``); a new session of the same agent with the same
identity and a later generation is that process's successor, so it ends at
once every session of an older generation that waits for a resume, and one
lost later ends as it is lost. Sessions whose carrier is up are never touched
(only a lost one is), nor those of another identity: a live sibling's resume
is coming. Sessions without an instance (``--stdio``, older agents) wait out
their grace.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass, field

import trio

from ..net.resumption import NewCarrier, Resumable
from ..net.transport import TunnelTransport
from ..replay import Instance, Ticket

__all__ = ["Admission", "Held", "HeldSessions", "RelayResumer"]

log = logging.getLogger("wstunnel.relay")


@dataclass(eq=False)
class Held:
    """One resumable session."""

    ticket: Ticket
    agent: str
    instance: Instance | None = None
    transport: TunnelTransport | None = None
    pending: NewCarrier | None = None
    arrived: trio.Event = field(default_factory=trio.Event)
    #: Set when the session no longer uses the carrier ``pending`` brought.
    carrier_done: trio.Event = field(default_factory=trio.Event)
    #: Set while the session waits for a resume (its carrier is lost).
    waiting: bool = False
    #: Why it ends without waiting any longer (its agent's process restarted).
    ended: str | None = None

    def end(self, reason: str) -> None:
        """Stop waiting for a resume: the session ends with ``reason``."""
        self.ended = reason
        self.arrived.set()


@dataclass(eq=False)
class Admission:
    """The answer to an agent's X-Wstunnel-Resume: refuse it (``refused``: why, for
    the log), resume a held session (``resumes``, with the agent's count), or start a
    new one (``held``: resumable); ``headers`` go in the answer."""

    refused: str | None = None
    resumes: Held | None = None
    peer_received: int = 0
    held: Held | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


class HeldSessions:
    """Every resumable session of this relay, by id."""

    def __init__(self) -> None:
        self._held: dict[str, Held] = {}
        #: The sessions that named an instance, by (agent, identity).
        self._by_identity: dict[tuple[str, str], set[Held]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def new(self, agent: str, grace: float, instance: Instance | None = None) -> Held:
        """A new resumable session; with ``instance``, the held sessions of its older
        generations (processes that restarted) end at once."""
        ticket = Ticket(secrets.token_urlsafe(18), secrets.token_urlsafe(24), grace)
        held = Held(ticket, agent, instance)
        self._held[ticket.session_id] = held
        if instance is not None:
            siblings = self._by_identity.setdefault((agent, instance.identity), set())
            for older in siblings:
                if older.waiting and _older(older, instance):
                    older.end(_RESTARTED)
            siblings.add(held)
        return held

    def successor(self, held: Held) -> bool:
        """A session of a later process of ``held``'s agent exists (it restarted)."""
        instance = held.instance
        if instance is None:
            return False
        siblings = self._by_identity.get((held.agent, instance.identity), ())
        return any(_older(held, other.instance) for other in siblings
                   if other.instance is not None)

    def drop(self, held: Held) -> None:
        if self._held.get(held.ticket.session_id) is held:
            del self._held[held.ticket.session_id]
        if held.instance is not None:
            key = (held.agent, held.instance.identity)
            siblings = self._by_identity.get(key, set())
            siblings.discard(held)
            if not siblings:
                self._by_identity.pop(key, None)
        held.carrier_done.set()

    def find(self, session_id: str, agent: str, secret: str) -> Held | str | None:
        """The session to resume; a str (why, for the log only) when the request is
        not this agent's or its secret is wrong; None when the id is unknown."""
        held = self._held.get(session_id)
        if held is None:
            return None
        if held.agent != agent:
            return f"agent {agent} asked to resume a session of agent {held.agent}"
        if not hmac.compare_digest(held.ticket.secret.encode(), secret.encode()):
            return f"agent {agent} gave a wrong secret to resume session {session_id}"
        return held

    def deliver(self, held: Held, carrier: NewCarrier) -> trio.Event:
        """Hand ``carrier`` to the held session (``detach`` it first); returns the event
        set when the session is done with it (its bringer keeps the connection open
        until then)."""
        held.carrier_done.set()  # (a carrier before this one: its bringer may close)
        held.carrier_done = done = trio.Event()
        held.pending = carrier
        held.arrived.set()
        return done


class RelayResumer:
    """A held session's side of ``Resumer``: wait for the agent's resume request."""

    def __init__(self, held: Held, sessions: HeldSessions) -> None:
        self.held = held
        self.sessions = sessions

    @property
    def grace(self) -> float:
        return self.held.ticket.grace

    async def new_carrier(self, transport: Resumable, lost: str) -> NewCarrier | str:
        held = self.held
        if self.sessions.successor(held):
            return f"{lost}; {_RESTARTED}"
        held.waiting = True
        try:
            with trio.move_on_after(self.grace):
                while held.pending is None:
                    if held.ended is not None:
                        return f"{lost}; {held.ended}"
                    await held.arrived.wait()
                    held.arrived = trio.Event()
                carrier, held.pending = held.pending, None
                return carrier
        finally:
            held.waiting = False
        return f"{lost}; the agent did not resume within resume_grace ({self.grace:g} s)"


#: Why a held session ends before its grace is over.
_RESTARTED = ("ended at once, not kept for a resume: its agent restarted (a new process "
              "of it, same host and configuration, opened a session)")


def _older(held: Held, instance: Instance | None) -> bool:
    """``held`` is of an earlier process than ``instance`` (both of one identity)."""
    return (held.instance is not None and instance is not None
            and held.instance.generation < instance.generation)
