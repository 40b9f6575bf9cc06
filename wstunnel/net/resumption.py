"""Resumption (replay.py): a session whose carrier is lost waits for the next one.

A lost carrier (``_lost``: no close handshake) of a session with a ``Resumer`` is
replaced: ``_resume`` asks the resumer for a ``NewCarrier`` (the agent
reconnects, agent/resume.py; the relay waits for the agent's resume request,
relay/resume.py), resumes the protocol on it (what the peer has not received is
sent again) and the session goes on with its channels. Meanwhile the session is
``resuming``: records queue for the next carrier. The relay stops a carrier a
resume request replaces with ``detach``.

``Resumable`` is the base class of ``TunnelTransport`` (net/transport.py), over
``CarrierIO`` (net/carrier_io.py): resuming swaps the stream under the reader and
writer, and they read it without a hop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from ..errors import LocalProtocolError
from ..protocol import TunnelEvent, TunnelProtocol
from .carrier_io import CarrierIO
from .channel_table import SESSION_LOSS
from .keepalive import KeepaliveTimer, SessionKeepalive

if TYPE_CHECKING:
    from .channel_stream import ChannelStream

__all__ = ["NewCarrier", "Resumable", "Resumer"]

log = logging.getLogger("wstunnel.session")


@dataclass(frozen=True)
class NewCarrier:
    """A reconnected stream for a resumable session, and the peer's received count."""

    stream: trio.abc.Stream
    trailing: bytes
    peer_received: int
    #: The records travel framed (an HTTP transport) or as WebSocket messages; None:
    #: as on the carrier before.
    framed: bool | None = None


class Resumer(Protocol):
    """Brings a resumable session its next carrier (the agent reconnects, the relay
    waits for the agent's resume request)."""

    @property
    def grace(self) -> float:
        """How long a lost session waits for its next carrier."""

    async def new_carrier(self, transport: Resumable, lost: str) -> NewCarrier | str:
        """The next carrier for ``transport`` (a ``TunnelTransport``); or why there is
        none (the session then ends)."""


class Resumable(CarrierIO):
    """A session whose lost carrier ``resumer`` may replace (None: a lost carrier ends it)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: TunnelProtocol,
        *,
        resumer: Resumer | None,
        name: str,
        channels: dict[int, ChannelStream],
        dispatch_other: Callable[[TunnelEvent], None],
        keepalive: SessionKeepalive,
        keepalive_timer: KeepaliveTimer | None,
    ) -> None:
        super().__init__(stream, protocol, name=name, channels=channels,
                         dispatch_other=dispatch_other, keepalive=keepalive,
                         keepalive_timer=keepalive_timer)
        #: Who brings a new carrier when this one is lost.
        self.resumer = resumer
        self._resuming = False
        self._detached = trio.Event()  # set while resuming: the old carrier has stopped
        self._carrier_up = trio.Event()  # set while a carrier runs, and once the session ends
        self._carrier_up.set()

    async def _resume(self) -> bool:
        """After a carrier ended: True when a new one is in place (the session goes
        on), False when the session is over (``_end_reason`` says why)."""
        resumer, protocol = self.resumer, self.protocol
        if resumer is None or not self._lost or not self._resumable():
            return False
        lost = self._end_reason or "connection lost"
        count = len(self.channels)
        log.warning("%s: %s; keeping %d channel%s open to resume (up to %g s)", self.name,
                    lost, count, "" if count == 1 else "s", resumer.grace, extra=SESSION_LOSS)
        old_stream = self.stream
        self._end_reason, self._resuming = None, True
        self._carrier_up = trio.Event()
        protocol.carrier_broken()
        self._detached.set()
        try:  # (resuming until the new carrier is in place: no checkpoint in between)
            carrier = await resumer.new_carrier(self, lost)
            if not isinstance(carrier, str):
                try:
                    protocol.resume(carrier.trailing, carrier.peer_received,
                                    framed=carrier.framed)
                except LocalProtocolError as exc:
                    await trio.aclose_forcefully(carrier.stream)
                    carrier = str(exc)
                else:
                    self.stream = carrier.stream
                    self._last_received = trio.current_time()
        finally:
            self._resuming = False
            self._detached = trio.Event()
            self._carrier_up.set()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(old_stream)
        if isinstance(carrier, str):
            self._end_reason = carrier
            return False
        count = len(self.channels)
        log.info("%s: session resumed; %d channel%s on", self.name, count,
                 " carries" if count == 1 else "s carry")
        self.dispatch_local_events()  # (records that came with the answer: trailing data)
        if self._pump is not None:
            self._pump.flush()  # (as the reader does after each read's events)
        self._wake.set()
        return True

    async def wait_carrier(self) -> None:
        """Wait until the session is no longer resuming (resumed, or over)."""
        await self._carrier_up.wait()

    async def detach(self, reason: str) -> bool:
        """Stop the current carrier as lost (a resume request is here to replace it)
        and wait until it has stopped, so that nothing more is counted as received on
        it; False when the session ended instead."""
        if not self._resuming:
            self._lost = True
            self._end(reason)
        await self._detached.wait()  # (also set when the session ends)
        return self._resuming

    @property
    def is_open(self) -> bool:
        """The session is up (its carrier may be lost while it resumes: records then
        wait for the next one)."""
        if self._resuming:
            return True
        if self._end_reason is None:
            return not self.protocol.closed
        return self._lost and self._resumable()

    @property
    def resuming(self) -> bool:
        """The carrier is lost and a new one is awaited (or about to be)."""
        return self._resuming or (self._end_reason is not None and self._lost
                                  and self._resumable())

    def _resumable(self) -> bool:
        """A lost carrier would be replaced: not for a session that is over. One going
        away (GOAWAY) is: a draining relay still takes resumes of its own sessions,
        and its channels finish there (docs/PROTOCOL.md §12)."""
        protocol = self.protocol
        return (self.resumer is not None and not self._closing and protocol.replay is not None
                and protocol.session.failure is None)
