"""One tunnel session after the HTTP upgrade: WebSocket framing + multiplexer.

Theory of operation: the agent is the WebSocket client, the relay the server.
Every multiplexer record travels as one binary WebSocket message. Input bytes
go through the WebSocket connection; each complete binary message is handed to
the mux session. Output is pulled: ``data_to_send`` first takes what the
WebSocket layer already queued (pongs, close frames), then pulls records from
the session's scheduler and frames them until ``max_size`` is reached, so the
I/O layer never holds more than one write's worth of bytes.

The WebSocket is the session's one *record carrier* today: ``RecordCarrier``
names what the mux session needs from whatever carries its records, so that
another carrier (records in plain HTTP requests and responses) can be put
beside it without touching the session or the I/O layer above.

A multiplexer protocol error from the peer sends the session's GOAWAY with
its error code, then closes the WebSocket with 1002; a text message (not part
of wstunnel.v1) closes it with 1003.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

from . import mux, ws
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import FramedConnection
from .replay import ACK, ReplayLimitReached, ReplayLog, parse_ack

__all__ = ["TunnelProtocol", "SessionLimits", "TunnelEvent", "RecordCarrier",
           "DEFAULT_WRITE_SIZE"]

DEFAULT_WRITE_SIZE: Final = 256 * 1024
_DATA_HEADER_SIZE: Final = mux.wire.DATA_HEADER_SIZE
#: (a global, not an attribute lookup through the enum class: checked per read and write)
_WS_OPEN: Final = ws.ConnectionState.OPEN

#: What ``TunnelProtocol.events_received`` yields: the multiplexer's events, and
#: from the carrier a pong (keepalive), the peer's close and the terminal close.
TunnelEvent: TypeAlias = (mux.Event | ws.PongReceived | ws.CloseReceived | ws.ConnectionClosed
                          | ReplayLimitReached)


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Every limit of one session, built once from the configuration (per load or
    reload) and passed to each ``TunnelProtocol``; ``mux.Session`` checks the
    ranges (``LocalProtocolError``). The fields are ``mux.Session``'s arguments
    of the same names, plus the carrier's message limit.

    ``solo_chunk_size`` None: as large as the message limit allows, at most
    ``mux.DEFAULT_SOLO_CHUNK_SIZE`` and at least ``max_chunk_size``.
    """

    max_message_size: int = ws.DEFAULT_MAX_MESSAGE_SIZE
    initial_window: int = mux.DEFAULT_INITIAL_WINDOW
    max_chunk_size: int = mux.DEFAULT_MAX_CHUNK_SIZE
    max_channels: int = mux.DEFAULT_MAX_CHANNELS
    max_send_window: int = mux.DEFAULT_MAX_SEND_WINDOW
    max_queued_size: int = mux.DEFAULT_MAX_QUEUED_SIZE
    solo_chunk_size: int | None = None
    max_buffered_size: int | None = None
    max_window: int | None = None
    quantum: int | None = None

    def session(self, role: mux.Role) -> mux.Session:
        """A multiplexer session with these limits."""
        return mux.Session(
            role, initial_window=self.initial_window, max_chunk_size=self.max_chunk_size,
            max_channels=self.max_channels, max_buffered_size=self.max_buffered_size,
            quantum=self.quantum, max_window=self.max_window,
            solo_chunk_size=self._solo_chunk_size(), max_send_window=self.max_send_window,
            max_queued_size=self.max_queued_size)

    def _solo_chunk_size(self) -> int:
        """Accept (and send alone) big chunks only as far as the message limit allows."""
        if self.solo_chunk_size is not None:
            return self.solo_chunk_size
        room = self.max_message_size - _DATA_HEADER_SIZE
        return max(self.max_chunk_size, min(mux.DEFAULT_SOLO_CHUNK_SIZE, room))


DEFAULT_LIMITS: Final = SessionLimits()


class RecordCarrier(Protocol):
    """What the mux session runs over: one record in, one record out, in order.

    ``ws.WebSocketConnection`` is the one carrier today (a record is one binary
    message). The same sans-IO contract as the rest of the core: bytes in
    (``receive_data``, or ``receive_buffer`` + ``buffer_filled`` for a zero-copy
    read; ``receive_eof``), events out (a record arrives as ``ws.BytesMessage``;
    ``ws.TextMessage`` is a violation; then ``PongReceived``, ``CloseReceived``,
    and ``ConnectionClosed`` last), bytes out (``data_to_send_parts``). States
    follow ``ws.ConnectionState``: records are sent only while OPEN.
    """

    @property
    def state(self) -> ws.ConnectionState: ...
    @property
    def failure(self) -> Exception | None: ...
    @property
    def close_code(self) -> int | None: ...
    @property
    def close_reason(self) -> str: ...
    @property
    def should_close_transport(self) -> bool: ...
    @property
    def has_output(self) -> bool: ...

    def receive_data(self, data: bytes | bytearray | memoryview) -> None: ...
    def receive_buffer(self) -> memoryview | None: ...
    def buffer_filled(self, size: int) -> None: ...
    def receive_eof(self) -> None: ...
    def events_received(self) -> list[ws.Event]: ...
    def send_binary_parts(self, prefix: bytes, payload: bytes | bytearray | memoryview
                          ) -> None: ...
    def data_to_send(self) -> bytes | bytearray: ...
    def data_to_send_parts(self) -> list[bytes | bytearray | memoryview]: ...
    def ping(self, payload: bytes = b"") -> None: ...
    def close(self, code: int = 1000, reason: str = "") -> None: ...


class TunnelProtocol:
    """ws + mux for one session; the same sans-IO contract as its parts."""

    def __init__(
        self,
        role: mux.Role,
        *,
        limits: SessionLimits = DEFAULT_LIMITS,
        trailing_data: bytes = b"",
        random_bytes: Callable[[int], bytes] | None = None,
        framed: bool = False,
    ) -> None:
        self.role = role
        self.limits = limits
        self.session = limits.session(role)
        self._framed = framed
        self._random_bytes = random_bytes
        #: ``framed``: the records travel in a plain byte stream (the HTTP transports,
        #: framing.py) instead of WebSocket messages.
        self._carrier: RecordCarrier = self._new_carrier()
        self._events: list[TunnelEvent] = []
        self._terminal = False
        #: Set by :meth:`enable_resume`: the session may outlive its carrier (replay.py).
        self.replay: ReplayLog | None = None
        #: The carrier ended without a close handshake (1006): the kind of end a
        #: resumable session survives.
        self.carrier_lost = False
        #: Set by :meth:`pace`: output pulled under rate limits (mux/pacing.py).
        self.pacer: mux.Pacer | None = None
        if trailing_data:
            self.receive_data(trailing_data)

    # -- input -------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the transport; then drain events and output."""
        self._carrier.receive_data(data)
        self._process_carrier_events()

    def receive_buffer(self) -> memoryview | None:
        """Where to read next so a big message needs no copy, or None: read
        into it, release it, then ``buffer_filled`` (``WebSocketConnection``)."""
        return self._carrier.receive_buffer()

    def buffer_filled(self, size: int) -> None:
        """``size`` bytes were read into ``receive_buffer()``; drain as after ``receive_data``."""
        self._carrier.buffer_filled(size)
        self._process_carrier_events()

    def receive_eof(self) -> None:
        """The transport reached EOF; a terminal event follows."""
        self._carrier.receive_eof()
        self._process_carrier_events()

    def _process_carrier_events(self) -> None:
        session = self.session
        replay = self.replay
        for event in self._carrier.events_received():
            if isinstance(event, ws.BytesMessage):
                if replay is not None and self._replay_record(replay, event.data):
                    continue
                # (a session done by GOAWAY still reads: an OPEN that crossed it must
                # be refused, or its opener waits until the connection ends)
                if session.failure is None:
                    session.receive_record(event.data)
                    self._events.extend(session.events_received())
                    if session.failure is not None:
                        self._fail_session()
            elif isinstance(event, ws.TextMessage):
                self._close_carrier(ws.CloseCode.UNSUPPORTED_DATA,
                                    "wstunnel.v1 carries binary only")
            elif isinstance(event, ws.ConnectionClosed):
                self._terminal = True
                self.carrier_lost = event.code == ws.CloseCode.ABNORMAL_CLOSURE
                self._events.append(event)
            elif isinstance(event, (ws.PongReceived, ws.CloseReceived)):
                self._events.append(event)

    def _replay_record(self, replay: ReplayLog, record: bytes | bytearray | memoryview) -> bool:
        """Count a record received on a resumable session; True for an ACK, which is
        the log's alone and never reaches the multiplexer."""
        if record and record[0] == ACK:
            try:
                replay.acknowledged(parse_ack(record))
            except RemoteProtocolError as exc:
                self.session.fail(exc)
                self._fail_session()
            return True
        if replay.received_record(len(record)):
            self.send_ack()
        return False

    # -- resumption (replay.py) ------------------------------------------------

    def enable_resume(self) -> None:
        """Both sides agreed in the handshake: number records, acknowledge, keep what
        the peer has not acknowledged, at most about ``max_queued_size`` (then wait
        for its ACK). Call before the first record is sent."""
        self.replay = ReplayLog(self.limits.max_queued_size)

    def carrier_broken(self) -> None:
        """The transport lost the carrier under it (an error, not an end of stream)."""
        self._terminal = self.carrier_lost = True

    def send_ack(self) -> None:
        """Acknowledge what was received, if anything new (each keepalive calls it)."""
        replay = self.replay
        if replay is not None and self._carrier.state is _WS_OPEN:
            ack = replay.take_ack()
            if ack is not None:
                self._carrier.send_binary_parts(ack, b"")

    def resume(self, trailing_data: bytes, peer_received: int, *,
               framed: bool | None = None) -> None:
        """A new carrier for this session (the agent reconnected; ``framed``: by an HTTP
        transport, None: as before): the records the peer did not receive go out
        first, then everything new.

        Raises:
            LocalProtocolError: not resumable, or the peer's count is impossible
                (then the session cannot continue: end it).
        """
        if self.replay is None:
            raise LocalProtocolError("this session is not resumable")
        try:
            missed = self.replay.replay(peer_received)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"cannot resume: {exc}") from exc
        if framed is not None:
            self._framed = framed
        self._carrier = self._new_carrier()
        self._terminal = self.carrier_lost = False
        for head, payload in missed:
            self._carrier.send_binary_parts(head, payload)
        if trailing_data:
            self.receive_data(trailing_data)

    def _new_carrier(self) -> RecordCarrier:
        if self._framed:
            return _framed(self.limits, self.session)
        return _websocket(self.role, self.limits, self.session, self._random_bytes)

    def _fail_session(self) -> None:
        """The session failed and queued its GOAWAY (behind its SETTINGS, if that
        was still unsent): frame them before the close frame, since nothing is
        framed once the WebSocket is closing (PROTOCOL.md §7: GOAWAY, then close)."""
        self._frame_records(DEFAULT_WRITE_SIZE)
        self._close_carrier(ws.CloseCode.PROTOCOL_ERROR, "multiplexer protocol error")

    def _close_carrier(self, code: int, reason: str) -> None:
        if self._carrier.state is _WS_OPEN:
            self._carrier.close(code, reason)

    # -- output ------------------------------------------------------------

    def events_received(self) -> list[TunnelEvent]:
        """Return and forget the events produced since the last call."""
        self._events.extend(self.session.events_received())
        events, self._events = self._events, []
        return events

    @property
    def has_events(self) -> bool:
        """True when :meth:`events_received` has something: a cheap check for the
        writer, whose cuts may emit events (room in the outbound budget, a channel
        finished by its FIN)."""
        return bool(self._events) or self.session.has_events

    def data_to_send(self, max_size: int = DEFAULT_WRITE_SIZE) -> bytes | bytearray:
        """Bytes to write now: WebSocket control output, then scheduled records.

        Returns b"" when nothing is ready; call again after any local action
        or received data.
        """
        self._frame_records(max_size)
        return self._carrier.data_to_send()

    def parts_to_send(self, max_size: int = DEFAULT_WRITE_SIZE
                      ) -> list[bytes | bytearray | memoryview]:
        """``data_to_send`` as pieces to write in order (empty: nothing ready)."""
        self._frame_records(max_size)
        return self._carrier.data_to_send_parts()

    def pace(self, *, outbound: mux.TokenBucket | None = None,
             inbound: mux.TokenBucket | None = None,
             forwards: dict[str, mux.pacing.Limits] | None = None) -> None:
        """Send DATA within ``outbound`` and grant the peer credit within ``inbound``,
        and each forward's channels within its (outbound, inbound) pair (buckets the
        caller refills, shared with whatever else they limit); nothing: no limit.
        Output held back comes out on a later ``parts_to_send`` after ``pacer.delay()``;
        the transport names each channel's forward (``pacer.limit_channel``)."""
        if outbound is None and inbound is None and not forwards:
            self.pacer = None
        else:
            self.pacer = mux.Pacer(self.session, outbound=outbound, inbound=inbound,
                                   forwards=forwards)

    def paced_delay(self) -> float | None:
        """Seconds until output the rate limits hold back may go (the buckets just
        refilled); None when nothing is held back or nothing may be sent any more
        (the WebSocket is closing): then only a wake-up brings more to write."""
        if self.pacer is None or self._carrier.state is not _WS_OPEN:
            return None
        return self.pacer.delay()

    def _frame_records(self, max_size: int) -> None:
        carrier = self._carrier
        if carrier.state is _WS_OPEN:
            size = 0
            pacer = self.pacer  # (no limit: one test per write, nothing per record)
            next_parts = self.session.next_record_parts if pacer is None else pacer.next_parts
            send_parts = carrier.send_binary_parts
            replay = self.replay  # (not resumable: one test per record)
            while size < max_size:
                if replay is not None and replay.full:
                    self._frame_control(replay)  # (then held: below)
                    break
                parts = next_parts(max_size)
                if parts is None:
                    break
                head, payload = parts
                send_parts(head, payload)
                if replay is not None:
                    replay.sent_record(head, payload)
                size += len(head) + len(payload) + 14
            if replay is not None and replay.full:
                self._hold(replay)

    def _frame_control(self, replay: ReplayLog) -> None:
        """Held (``replay.full``): the control records still go, within
        ``replay.room_for_control``. They are the answers a transport waits to see
        go before it reads on (net/transport.py), and the ACK that ends the hold
        comes by that read."""
        next_control = self.session.next_control_record
        send_parts = self._carrier.send_binary_parts
        while replay.room_for_control:
            record = next_control()
            if record is None:
                return
            send_parts(record, b"")
            replay.sent_record(record, b"")

    def _hold(self, replay: ReplayLog) -> None:
        """Nothing new goes out until the peer acknowledges (replay.py ``full``): say
        so once per episode."""
        event = replay.hold()
        if event is not None:
            self._events.append(event)

    def wants_to_send(self) -> bool:
        """True when ``data_to_send`` would return bytes (cheap check)."""
        return self._carrier.state is _WS_OPEN and self._records_may_go()

    def _records_may_go(self) -> bool:
        """A record waits, and the replay log has room for it (replay.py ``full``;
        a control record: ``room_for_control``)."""
        replay = self.replay
        session = self.session
        return session.wants_to_send() and (
            replay is None or not replay.full
            or (session.control_backlog > 0 and replay.room_for_control))

    def only_control_frames(self) -> bool:
        """True when the WebSocket is open, has frames of its own queued (a pong, an
        ACK) and no record waits: output a transport may write at once, outside its
        writer's order (net/carrier_io.py ``_answer_in_place``)."""
        carrier = self._carrier
        return (carrier.has_output and carrier.state is _WS_OPEN
                and not self._records_may_go())

    def wants_to_write(self) -> bool:
        """True when the writer has anything to do: bytes for ``data_to_send`` (queued
        WebSocket frames or records), or the WebSocket is no longer open (a close to
        send or the transport to drop)."""
        carrier = self._carrier
        return (carrier.has_output or carrier.state is not _WS_OPEN
                or self._records_may_go())

    # -- session-level actions ---------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the WebSocket is finished; drop the transport."""
        return self._terminal

    @property
    def should_close_transport(self) -> bool:
        return self._carrier.should_close_transport

    @property
    def close_code(self) -> int | None:
        return self._carrier.close_code

    @property
    def close_reason(self) -> str:
        return self._carrier.close_reason

    @property
    def failure(self) -> Exception | None:
        return self._carrier.failure or self.session.failure

    def ping(self, payload: bytes = b"") -> None:
        """Ping while open. Once the close handshake has begun (a shutdown waiting for
        an unreachable peer's close), the keepalive's ping is dropped, as send_ack's
        ACK is: the peer's close or the close timeout ends the carrier anyway."""
        if self._carrier.state is _WS_OPEN:
            self._carrier.ping(payload)

    def close(self, code: int = ws.CloseCode.NORMAL, reason: str = "") -> None:
        """Start the WebSocket close handshake (idempotent)."""
        self._close_carrier(code, reason)

    # -- channels (thin pass-throughs kept explicit for type checking) -------

    def open_channel(self, host: str, port: int, *, kind: mux.ChannelKind = mux.ChannelKind.TCP,
                     early_data: bytes = b"") -> int:
        self._check_open()
        return self.session.open_channel(host, port, kind=kind, early_data=early_data)

    def accept_channel(self, channel_id: int) -> None:
        self.session.accept_channel(channel_id)

    def refuse_channel(self, channel_id: int, reason: mux.OpenFailure, text: str = "") -> None:
        self.session.refuse_channel(channel_id, reason, text)

    def send_capacity(self, channel_id: int) -> int:
        return self.session.send_capacity(channel_id)

    def send_data(self, channel_id: int, data: bytes) -> None:
        self.session.send_data(channel_id, data)

    def send_eof(self, channel_id: int) -> None:
        self.session.send_eof(channel_id)

    def reset_channel(
        self, channel_id: int, code: mux.ResetCode = mux.ResetCode.CANCELLED, text: str = "",
        *, after_data: bool = False,
    ) -> None:
        self.session.reset_channel(channel_id, code, text, after_data=after_data)

    def acknowledge(self, channel_id: int, size: int) -> None:
        self.session.acknowledge(channel_id, size)

    def go_away(self, code: int = 0, text: str = "") -> None:
        self.session.go_away(code, text)

    def _check_open(self) -> None:
        if self.replay is not None and self.carrier_lost:
            return  # (a resumable session between carriers: the OPEN waits for the next)
        if self._terminal or self._carrier.state is not _WS_OPEN:
            raise LocalProtocolError("the session is closing; no new channels")


def _framed(limits: SessionLimits, session: mux.Session) -> FramedConnection:
    """The HTTP transports' carrier: the same record limit as the WebSocket's."""
    return FramedConnection(max_record_size=max(limits.max_message_size,
                                                session.max_record_size))


def _websocket(role: mux.Role, limits: SessionLimits, session: mux.Session,
               random_bytes: Callable[[int], bytes] | None) -> ws.WebSocketConnection:
    """The WebSocket carrier: the agent is the client, the relay the server. A record
    must always fit in one message, whatever chunk size is configured."""
    ws_role = ws.Role.CLIENT if role is mux.Role.AGENT else ws.Role.SERVER
    max_message_size = max(limits.max_message_size, session.max_record_size)
    return ws.WebSocketConnection(ws_role, max_message_size=max_message_size,
                                  random_bytes=random_bytes)
