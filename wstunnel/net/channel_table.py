"""A session's open channels, and what the peer's channel events do to them.

Why a module of its own: the transport (net/transport.py) runs the session's
tasks; keeping its channels by id, reporting them to the ``SessionObserver``,
knowing when none is open, and turning a peer's FIN, RESET or OPEN_FAILED into
what the channel's user sees (end of stream, ``ChannelReset``,
``ChannelRefused``) is bookkeeping apart from that, done once per channel, never
per record. The transport's reader looks channels up in ``channels`` directly
(the same dict), so DATA costs no call here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import trio

from .. import mux
from ..errors import ChannelRefused, ChannelReset, SessionClosed
from .channel_stream import ChannelStream, OpenRetry

if TYPE_CHECKING:
    from .observer import SessionObserver

__all__ = ["SESSION_LOSS", "ChannelTable", "end_channel", "failure_name", "is_session_loss",
           "reset_name"]

log = logging.getLogger("wstunnel.session")

#: ``extra`` of the lines that say what a broken session does to its channels.
#: ``--stdio`` (cli) hides them: its one channel's fate is its one exit line.
#: (A leading ``_``: not printed as a field, service/logs.py.)
SESSION_LOSS: Final = {"_session_loss": True}


def is_session_loss(record: logging.LogRecord) -> bool:
    """A line logged with ``extra=SESSION_LOSS``."""
    return bool(getattr(record, "_session_loss", False))

#: The kinds of a channel that carries no data: a reverse forward's lease.
_LEASE_KINDS: Final = frozenset({mux.ChannelKind.TCP_LISTEN, mux.ChannelKind.UNIX_LISTEN,
                                 mux.ChannelKind.UDP_LISTEN})


class ChannelTable:
    """The channels open in one session, by channel id."""

    __slots__ = ("channels", "opened_total", "_observer", "_idle")

    def __init__(self, observer: SessionObserver | None) -> None:
        self.channels: dict[int, ChannelStream] = {}
        self.opened_total = 0  # (both ways, since the session began)
        self._observer = observer
        self._idle = trio.Event()
        self._idle.set()

    def add(self, channel: ChannelStream) -> None:
        self.channels[channel.channel_id] = channel
        self.opened_total += 1
        self._idle = trio.Event()
        if self._observer is not None:
            self._observer.channel_opened(channel)

    def remove(self, channel_id: int, pacer: mux.Pacer | None) -> None:
        """Forget a finished channel (ChannelClosed), and its rate limits in ``pacer``."""
        channel = self.channels.pop(channel_id, None)
        if pacer is not None:
            pacer.forget_channel(channel_id)
        if channel is not None:
            channel._forget()
            if self._observer is not None:
                self._observer.channel_closed(channel)
        if not self.channels:
            self._idle.set()

    def break_all(self, session: str, reason: str, *, clean: bool = False) -> None:
        """The session ended: every channel still open breaks with ``SessionClosed``,
        so its users see ``BrokenResourceError`` rather than hang.

        ``clean``: the session was closed on purpose (close handshake, GOAWAY). Then
        reverse-forward leases still open are no loss worth a warning: an agent that
        stops holds them to the end (the relay logs each listener it stops)."""
        if self.channels and not (clean and self._only_leases()):
            count = len(self.channels)
            log.warning("%s: session lost with %d channel%s open, all reset: %s", session,
                        count, "" if count == 1 else "s", reason, extra=SESSION_LOSS)
        error = SessionClosed(f"the session ended: {reason}", reason=reason)
        for channel in list(self.channels.values()):
            channel._break(error)
            if self._observer is not None:
                self._observer.channel_closed(channel)
        self.channels.clear()
        self._idle.set()

    def _only_leases(self) -> bool:
        return all(channel.kind in _LEASE_KINDS for channel in self.channels.values())

    async def wait_idle(self) -> None:
        """Wait until no channel is open."""
        await self._idle.wait()


def end_channel(session: str, observer: SessionObserver | None, channel: ChannelStream,
                event: mux.EndOfStream | mux.ChannelOpenFailed | mux.ChannelReset) -> None:
    """The peer ended ``channel`` (of the session named ``session``): its FIN, its
    refusal of our OPEN, or its RESET."""
    if isinstance(event, mux.EndOfStream):
        channel._deliver_eof()
    elif isinstance(event, mux.ChannelOpenFailed):
        text = event.text or failure_name(event.reason)
        if observer is not None:
            observer.open_failed(event.reason)
        refused = ChannelRefused(text, int(event.reason))
        if event.retry_data is not None:  # (GOING_AWAY: the peer never acted on the OPEN)
            channel._refused_for_retry(refused, OpenRetry(event.retry_data))
        else:
            channel._break(refused)
    else:
        text = f"reset by the peer ({reset_name(event.code)}" + (
            f": {event.text})" if event.text else ")")
        log.info("%s: channel %d to %s %s", session, channel.channel_id,
                 channel.destination, text)
        channel._break(ChannelReset(text, event.code))


def reset_name(code: int) -> str:
    """A RESET code in words, for logs ("connection reset", "code 77")."""
    try:
        return mux.ResetCode(code).name.lower().replace("_", " ")
    except ValueError:
        return f"code {code}"


def failure_name(reason: int) -> str:
    """An OPEN_FAILED reason in words ("forbidden", "failure code 77")."""
    try:
        return mux.OpenFailure(reason).name.lower().replace("_", " ")
    except ValueError:
        return f"failure code {reason}"
