"""What the peer's control records do to a session: every event but DATA and WINDOW.

The transport's reader hands DATA and WINDOW to their channels itself (once per
record, net/carrier_io.py ``_dispatch``) and everything else to
``PeerEvents.dispatch``: a channel's end (FIN, RESET, OPEN_FAILED) or opening, the
peer's GOAWAY, the warnings a session logs at most once a minute, the OPENs its
multiplexer refused by itself. It holds what only these need (the GOAWAY, the
warnings). A peer's OPEN goes back to the transport (``incoming``): it makes the
channel and starts its task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .. import mux
from ..protocol import TunnelEvent, TunnelProtocol
from ..replay import ReplayLimitReached
from .budget_warning import BudgetWarning
from .channel_table import ChannelTable, end_channel

if TYPE_CHECKING:
    from .observer import SessionObserver

__all__ = ["PeerEvents"]

log = logging.getLogger("wstunnel.session")


class PeerEvents:
    """Acts on ``session``'s control events (``dispatch``); its peer's OPENs go to
    ``incoming``."""

    def __init__(
        self,
        session: object,
        channel_table: ChannelTable,
        protocol: TunnelProtocol,
        *,
        name: str,
        observer: SessionObserver | None,
        incoming: Callable[[mux.ChannelOpenRequested], None],
    ) -> None:
        self._session = session  # (for the observer)
        self._channel_table = channel_table
        self.channels = channel_table.channels
        self.protocol = protocol
        self.name = name
        self.observer = observer
        self._incoming = incoming
        self.goaway_received = False
        self.goaway = trio.Event()  # (set with goaway_received: wait_goaway)
        self._budget_warning = BudgetWarning()
        self._replay_warning = BudgetWarning()

    def dispatch(self, event: TunnelEvent) -> None:
        """Everything but DATA and WINDOW. A channel is usable from open_channel on
        (early data), and a refusal arrives as its own event: ChannelOpened only
        marks the channel for the few that wait for it (``wait_opened``, a SOCKS
        proxy). SETTINGS, pongs (any input counts for the keepalive) and the close
        (the reader and writer see the protocol closed) need nothing."""
        if isinstance(event, (mux.EndOfStream, mux.ChannelOpenFailed, mux.ChannelReset)):
            channel = self.channels.get(event.channel_id)
            if channel is not None:
                end_channel(self.name, self.observer, channel, event)
        elif isinstance(event, mux.ChannelOpened):
            channel = self.channels.get(event.channel_id)
            if channel is not None:
                channel._opened()
        elif isinstance(event, mux.ChannelClosed):
            self._channel_table.remove(event.channel_id, self.protocol.pacer)
        elif isinstance(event, mux.ChannelOpenRequested):
            self._incoming(event)
        elif isinstance(event, mux.GoAwayReceived):
            self.goaway_received = True
            self.goaway.set()
            log.info("%s: the peer is going away (%s); no new channels", self.name,
                     event.text or "no reason")
        elif isinstance(event, mux.OutboundBudgetExhausted):
            self._budget_warning.report(self.name, event)
        elif isinstance(event, ReplayLimitReached):
            self._replay_warning.report(self.name, event)
        elif isinstance(event, mux.PeerOpenRefused):
            if self.observer is not None:
                self.observer.peer_open_refused(self._session, event.reason)
        elif isinstance(event, mux.SessionFailed):
            log.warning("%s: multiplexer protocol error from the peer: %s", self.name, event.text)
