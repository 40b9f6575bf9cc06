"""A session's control records, both ways: SETTINGS, OPEN and its answers, FIN,
RESET, GOAWAY; and failure.  Once per channel or per session, never per chunk
(the data path, DATA and WINDOW, is session.py's).

Theory of operation
-------------------
Ordering (enforced by :class:`Outbox`): SETTINGS is queued in the constructor,
so it is the first record out, and the peer's must be the first record in.
Control records leave before DATA.  None may overtake its channel's data
except RESET (which discards that data): a FIN is queued only once the data
has drained, and an OPEN or OPEN_OK is always queued before any DATA of its
channel.  A RESET ``after_data`` waits for the data like a FIN, in its place.

Ids (:class:`ChannelTable`): the agent opens odd ids, the relay even ones,
each strictly increasing.  A record for an id that was used but is no longer
live is one of the races in docs/PROTOCOL.md and is dropped; a record for an
id never opened is a protocol error.

Peer violations never raise out of ``receive_record``: the session keeps the
exception in :attr:`failure`, replaces pending output with a GOAWAY carrying
the error code (never our message text), emits :class:`SessionFailed` and
ignores further input.  Every channel the application knew of ends with one
:class:`ChannelClosed`, except when the session fails.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from ..errors import LocalProtocolError, RemoteProtocolError, SessionClosed
from . import wire
from .channel import PIECE_OVERHEAD_SIZE, Action, Channel, Input, ReceiveState, SendState
from .events import (
    ChannelOpened,
    ChannelOpenFailed,
    ChannelOpenRequested,
    ChannelReset,
    EndOfStream,
    GoAwayReceived,
    PeerOpenRefused,
    SessionFailed,
    SettingsReceived,
    WindowUpdated,
)
from .session_state import SessionState
from .wire import ChannelKind, ErrorCode, OpenFailure, ResetCode, encode_record

__all__ = ["SessionControl"]

_WINDOW: Final = int(wire.RecordType.WINDOW)
_pack_window: Final = struct.Struct("!BII").pack
_SEND_OPEN: Final = SendState.OPEN
_RECEIVE_OPEN: Final = ReceiveState.OPEN
_KINDS: Final = frozenset(int(kind) for kind in ChannelKind)
_ERROR_CODES: Final = frozenset(int(code) for code in ErrorCode)


class SessionControl(SessionState):
    """Channels opening and ending, the session's SETTINGS, GOAWAY and failure."""

    if TYPE_CHECKING:  # the data path's (session.py), for open_channel's early data
        def send_data(self, channel_id: int, data: bytes | bytearray | memoryview) -> None: ...

    @property
    def closed(self) -> bool:
        """True once terminal: failed, or GOAWAY either way and no live channel.

        Drain :meth:`next_record` (the GOAWAY, final RESETs) before closing.
        """
        if self.failure is not None:
            return True
        return (self._goaway_sent or self._goaway_received) and not self._channels

    # -- records from the peer -----------------------------------------------------

    def _apply_settings(self, settings: wire.Settings) -> None:
        """Adopt the peer's limits; top up channels opened on the assumed window."""
        self.peer_settings = settings
        self._running = True
        self._peer_window = settings.initial_window
        self._outbox.chunk_size = min(self.max_chunk_size, settings.max_chunk_size)
        self._outbox.solo_chunk_size = min(self.max_receive_chunk_size, settings.max_chunk_size)
        if not self._fixed_quantum:
            self._drr.set_quantum(self._outbox.chunk_size)
        self._events.append(SettingsReceived(settings.version, settings.initial_window,
                                             settings.max_chunk_size))
        for ch in self._channels.values():  # all ours: the peer could not open any yet
            if ch.credit.resize(self._peer_window) and ch.send_state is SendState.OPEN:
                self._events.append(WindowUpdated(ch.channel_id, self._budget.capacity(ch)))
            if ch.ready():
                self._drr.add(ch.channel_id)

    def _dispatch(self, record: wire.Record) -> None:
        """Every record but the first (SETTINGS), DATA and WINDOW: receive_record
        takes each well-formed DATA and WINDOW record itself, so they never get
        here (a malformed one fails to decode)."""
        if isinstance(record, wire.Settings):
            raise RemoteProtocolError("SETTINGS sent twice", code=int(ErrorCode.PROTOCOL_ERROR))
        if isinstance(record, wire.GoAway):
            self._goaway_received = True
            self._events.append(GoAwayReceived(record.code, record.text, record.last_channel_id))
            self._refuse_crossed(record.last_channel_id)
            return
        if isinstance(record, wire.Open):
            self._receive_open(record)
            return
        ch = self._channels.get(record.channel_id)
        if ch is None:
            self._table.check_known(record.channel_id)  # a documented late-record race
        elif isinstance(record, wire.Fin):
            ch.receive(Input.FIN)
            self._events.append(EndOfStream(ch.channel_id))
            if ch.finished:
                self._forget(ch)
        elif isinstance(record, wire.Reset):
            ch.receive(Input.RESET)
            self._events.append(ChannelReset(ch.channel_id, record.code, record.text))
            self._forget(ch)
        elif isinstance(record, wire.OpenOk):
            ch.receive(Input.OPEN_OK)
            self._budget.release_early(ch)
            self._events.append(ChannelOpened(ch.channel_id))
            self._top_up(ch)
        elif isinstance(record, wire.OpenFailed):
            ch.receive(Input.OPEN_FAILED)
            self._events.append(self._open_failed(ch, record))
            self._forget(ch)

    def _refuse_crossed(self, last_channel_id: int) -> None:
        """Our OPENs above the GOAWAY's last channel id crossed it: the peer never acts
        on them (PROTOCOL.md section 7). Each is refused here and now with GOING_AWAY,
        as the peer's answer would be, so that it may be made again on another
        session even if the peer closes before its answer comes (an idle relay that
        stops closes at once). The peer's own OPEN_FAILED, if it comes, is then a
        record for a gone channel (section 8)."""
        crossed = [ch for channel_id, ch in self._channels.items()
                   if channel_id > last_channel_id and ch.early is not None]
        for ch in crossed:  # (``early``: ours, not answered yet)
            ch.receive(Input.OPEN_FAILED)
            self._events.append(self._open_failed(ch, wire.OpenFailed(
                ch.channel_id, OpenFailure.GOING_AWAY, "it crossed the peer's GOAWAY")))
            self._forget(ch)

    def _open_failed(self, ch: Channel, record: wire.OpenFailed) -> ChannelOpenFailed:
        """The event for a refused OPEN of ours. GOING_AWAY means the peer never acted
        on it (PROTOCOL.md section 7): the bytes given to send_data since, and
        whether send_eof was called, go with it, to be sent again on another session
        (not if a local reset is pending: the opener's side is already gone)."""
        retry = None
        if (record.reason == OpenFailure.GOING_AWAY
                and ch.channel_id not in self._resets_after_data):
            retry = ch.unsent_since_open()
        return ChannelOpenFailed(ch.channel_id, record.reason, record.text, retry_data=retry,
                                 retry_eof=retry is not None and ch.send_state is not _SEND_OPEN)

    def _receive_open(self, record: wire.Open) -> None:
        channel_id = record.channel_id
        self._table.claim_remote(channel_id)
        reason = self._open_refusal(record.kind)
        if reason is not None:  # answered here: the application never hears of it
            self._control.append(encode_record(wire.OpenFailed(channel_id, reason, reason.name)))
            self.refused_opens[reason] = self.refused_opens.get(reason, 0) + 1
            self._events.append(PeerOpenRefused(channel_id, reason))
            return
        self._channels[channel_id] = Channel(
            channel_id, opener=False, send_window=self._peer_window,
            receive_window=self.open_window)
        self._events.append(ChannelOpenRequested(channel_id, ChannelKind(record.kind),
                                                 record.host, record.port))

    def _open_refusal(self, kind: int) -> OpenFailure | None:
        """Why a peer OPEN is refused without asking the application, if it is."""
        if self._goaway_sent or self._goaway_received:
            return OpenFailure.GOING_AWAY
        if len(self._channels) >= self.max_channels:
            return OpenFailure.LIMIT_REACHED
        if kind not in _KINDS:
            return OpenFailure.UNSUPPORTED_KIND
        return None

    def fail(self, exc: RemoteProtocolError) -> None:
        """The layer above found that the peer broke a rule (a bad ACK, replay.py):
        fail as for a bad record (GOAWAY with ``exc.code``, SessionFailed)."""
        if self.failure is None:
            self._fail(exc)

    def _fail(self, exc: RemoteProtocolError) -> None:
        """Go terminal: keep SETTINGS if still unsent, then only our GOAWAY goes out."""
        self.failure = exc
        self._running = False
        keep_settings = bool(self._control) and self._control[0] is self._settings
        self._outbox.clear()
        self._budget.clear()
        if keep_settings:
            self._control.append(self._settings)
        code = exc.code if exc.code in _ERROR_CODES else int(ErrorCode.PROTOCOL_ERROR)
        text = ErrorCode(code).name.lower().replace("_", " ")  # never our exception text
        self._control.append(encode_record(wire.GoAway(self._table.last_remote_id, code, text)))
        self._goaway_sent = True
        self._channels.clear()
        self._resets_after_data.clear()
        self._windows.clear()
        self._events.append(SessionFailed(code, str(exc)))

    # -- local actions ---------------------------------------------------------------

    def open_channel(self, host: str, port: int, *, kind: ChannelKind = ChannelKind.TCP,
                     early_data: bytes = b"") -> int:
        """Open a channel to ``host:port`` at the peer; returns its id.

        ``early_data`` (at most the peer's initial window, or MIN_WINDOW until
        its SETTINGS arrive, and what ``max_send_window`` and the outbound
        budget leave) goes right behind the OPEN, saving a round trip.
        Then drain :meth:`next_record`; expect ChannelOpened or ChannelOpenFailed.

        Raises:
            SessionClosed: the session failed, or GOAWAY was sent or received.
            ChannelRefused: the channel limit is reached (reason LIMIT_REACHED).
            LocalProtocolError: bad host, port or kind, or too much early data.
        """
        if self.failure is not None or self._goaway_sent or self._goaway_received:
            raise SessionClosed("the session accepts no new channels (GOAWAY or failure)")
        room = min(self._peer_window, self.max_send_window,
                   self.max_queued_size - self._outbox.held_size - PIECE_OVERHEAD_SIZE)
        if early_data and memoryview(early_data).nbytes > room:
            raise LocalProtocolError("early data exceeds what a new channel may queue "
                                     f"({room} bytes: the peer's initial window, "
                                     "max_send_window or the outbound budget)")
        channel_id = self._table.next_local_id
        record = encode_record(wire.Open(channel_id, kind, host, port))  # validates first
        self._table.claim_local(self.max_channels)
        self._channels[channel_id] = Channel(channel_id, opener=True,
                                             send_window=self._peer_window,
                                             receive_window=self.open_window)
        self._control.append(record)
        if early_data:
            self.send_data(channel_id, early_data)
        return channel_id

    def accept_channel(self, channel_id: int) -> None:
        """Accept a ChannelOpenRequested channel: queues OPEN_OK.

        A no-op if the channel is already gone (the opener reset it while we
        were connecting: ChannelReset is in the events).

        Raises:
            LocalProtocolError: not a channel awaiting an answer.
        """
        ch = self._channels.get(channel_id)
        if ch is None:
            self._check_gone(channel_id)
            return
        ch.send(Input.ACCEPT)
        self._control.append(encode_record(wire.OpenOk(channel_id)))
        self._top_up(ch)

    def _top_up(self, ch: Channel) -> None:
        """A channel just opened at open_window: add the rest of initial_window
        (one WINDOW) while the pool has it (WindowBudget.top_up).  Sent once the
        peer knows the channel is open both ways (after our OPEN_OK or its
        OPEN_OK): the acceptor's send half is PENDING until then, where WINDOW is
        illegal."""
        if ch.receive_state is _RECEIVE_OPEN:  # (no WINDOW after the peer's FIN)
            extra = self._windows.top_up(ch.window)
            if extra:
                self._control.append(_pack_window(_WINDOW, ch.channel_id, extra))

    def refuse_channel(self, channel_id: int, reason: OpenFailure, text: str = "") -> None:
        """Refuse a ChannelOpenRequested channel: queues OPEN_FAILED, emits ChannelClosed.

        A no-op if the channel is already gone, like :meth:`accept_channel`.
        """
        ch = self._channels.get(channel_id)
        if ch is None:
            self._check_gone(channel_id)
            return
        ch.send(Input.REFUSE)
        self._control.append(encode_record(wire.OpenFailed(channel_id, reason, text)))
        self._forget(ch)

    def send_eof(self, channel_id: int) -> None:
        """Half-close: FIN goes out after the queued data (idempotent)."""
        ch = self._live(channel_id)
        if ch.send(Input.SEND_EOF) is Action.QUEUE_FIN and not ch.queued_size:
            self._queue_fin(ch)

    def reset_channel(self, channel_id: int, code: ResetCode = ResetCode.CANCELLED,
                      text: str = "", *, after_data: bool = False) -> None:
        """Abort the channel both ways: queued data is dropped, RESET goes out first.

        ``after_data``: the data already queued goes out first and the RESET
        follows it in place of a FIN (the send half accepts nothing more from
        now on). That is how a local socket that was reset after it sent data
        reaches the far end: those bytes, then the reset, as TCP delivers them.
        Queued data never exceeds the credit, so it cannot hold the RESET back
        for want of WINDOW.

        A no-op for a channel that is already gone (resets race freely).

        Raises:
            LocalProtocolError: the channel awaits accept/refuse (refuse it instead).
        """
        ch = self._channels.get(channel_id)
        if ch is None:
            self._check_gone(channel_id)
            return
        if after_data and ch.queued_size and (ch.send_state is _SEND_OPEN
                                               or ch.send_state is SendState.FIN_QUEUED):
            self._resets_after_data[channel_id] = encode_record(
                wire.Reset(channel_id, code, text))
            ch.send(Input.SEND_EOF)  # (FIN_QUEUED: no more data; nothing else changes)
            return
        ch.send(Input.RESET_SENT)
        self._control.append(encode_record(wire.Reset(channel_id, code, text)))
        self._forget(ch)

    def go_away(self, code: int = 0, text: str = "") -> None:
        """Announce that no new channels will be accepted; existing ones finish."""
        if self._goaway_sent:
            return
        self._goaway_sent = True
        self._control.append(encode_record(wire.GoAway(self._table.last_remote_id, code, text)))
