"""Channel state: two independent halves, each driven by a transition table.

Theory of operation
-------------------
A channel carries one byte stream each way.  Our *send half* and our *receive
half* move independently (FIN closes one direction only, like TCP's
shutdown), so each has its own small state enum and its own table
``{(state, input): (action, next_state)}``.  The session looks every input up
in the right table before acting on it; a pair that is missing is illegal:
:class:`RemoteProtocolError` when the input came from the peer (the session
fails), :class:`LocalProtocolError` when it came from our caller (a bug).

Who opened the channel decides where the halves start:

* opener:   send OPEN (early data allowed), receive PENDING until OPEN_OK;
* acceptor: send PENDING until ``accept_channel``, receive OPEN (early data).

A RESET, either way, ends both halves at once; it is listed in the table of
the half whose start state decides whether it is legal.  The channel is
finished when both halves are CLOSED (or after a reset / failed open).

The tables are the specification: docs/PROTOCOL.md draws them, and a test
walks every (state, input) pair.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Final

from ..errors import ChannelRefused, LocalProtocolError, RemoteProtocolError
from .flow import ReceiveWindow, SendCredit
from .wire import MAX_CHANNEL_ID, ErrorCode, OpenFailure

__all__ = [
    "SendState",
    "ReceiveState",
    "Input",
    "Action",
    "SEND_TRANSITIONS",
    "RECEIVE_TRANSITIONS",
    "LOCAL_INPUTS",
    "SEND_INPUTS",
    "RECEIVE_INPUTS",
    "transition",
    "Channel",
    "ChannelTable",
    "PIECE_OVERHEAD_SIZE",
]

#: What one queued piece costs beyond its bytes (the bytes object's header, its
#: slot in the deque, allocator rounding), charged against the session's
#: outbound budget so that a source that trickles tiny reads cannot hold many
#: times the budget in bookkeeping.
PIECE_OVERHEAD_SIZE: Final = 64


class SendState(enum.Enum):
    __hash__ = object.__hash__  # C-level: table lookups are on the hot path

    PENDING = "pending"        # acceptor: OPEN not answered yet
    OPEN = "open"              # may queue data
    FIN_QUEUED = "fin_queued"  # send_eof called; FIN leaves once queued data drains
    CLOSED = "closed"          # FIN queued for output, or reset / refused


class ReceiveState(enum.Enum):
    __hash__ = object.__hash__  # C-level: table lookups are on the hot path

    PENDING = "pending"  # opener: waiting for OPEN_OK / OPEN_FAILED
    OPEN = "open"        # peer may send DATA
    CLOSED = "closed"    # FIN received, or reset / open failed


class Input(enum.Enum):
    __hash__ = object.__hash__  # C-level: table lookups are on the hot path

    # local inputs (our caller or our own scheduler)
    SEND_DATA = "send_data"
    SEND_EOF = "send_eof"
    DRAINED = "drained"            # the scheduler sent the last queued byte after send_eof
    ACCEPT = "accept"
    REFUSE = "refuse"
    RESET_SENT = "reset_sent"
    ACKNOWLEDGE = "acknowledge"
    # remote inputs (records from the peer)
    WINDOW = "WINDOW"
    OPEN_OK = "OPEN_OK"
    OPEN_FAILED = "OPEN_FAILED"
    DATA = "DATA"
    FIN = "FIN"
    RESET = "RESET"


class Action(enum.Enum):
    __hash__ = object.__hash__  # C-level: table lookups are on the hot path

    IGNORE = "ignore"                  # legal, nothing to do (e.g. a late race)
    QUEUE_DATA = "queue_data"
    QUEUE_FIN = "queue_fin"            # FIN now if nothing is queued, else after the data
    SEND_FIN = "send_fin"              # queued data drained: FIN goes out now
    SEND_OPEN_OK = "send_open_ok"
    SEND_OPEN_FAILED = "send_open_failed"
    SEND_RESET = "send_reset"
    ADD_CREDIT = "add_credit"
    DELIVER_DATA = "deliver_data"
    DELIVER_EOF = "deliver_eof"
    OPENED = "opened"
    OPEN_FAILED = "open_failed"
    ABORTED = "aborted"                # peer RESET
    RETURN_CREDIT = "return_credit"    # acknowledge; WINDOW if the batch is full
    RELEASE = "release"                # acknowledge after the peer's FIN: no WINDOW needed


_S, _R, _I, _A = SendState, ReceiveState, Input, Action
Transition = tuple[Action, SendState | ReceiveState]

SEND_TRANSITIONS: Final[dict[tuple[SendState, Input], tuple[Action, SendState]]] = {
    (_S.PENDING, _I.ACCEPT): (_A.SEND_OPEN_OK, _S.OPEN),
    (_S.PENDING, _I.REFUSE): (_A.SEND_OPEN_FAILED, _S.CLOSED),
    (_S.OPEN, _I.SEND_DATA): (_A.QUEUE_DATA, _S.OPEN),
    (_S.OPEN, _I.SEND_EOF): (_A.QUEUE_FIN, _S.FIN_QUEUED),
    (_S.FIN_QUEUED, _I.SEND_EOF): (_A.IGNORE, _S.FIN_QUEUED),  # send_eof is idempotent
    (_S.CLOSED, _I.SEND_EOF): (_A.IGNORE, _S.CLOSED),
    (_S.FIN_QUEUED, _I.DRAINED): (_A.SEND_FIN, _S.CLOSED),
    (_S.OPEN, _I.WINDOW): (_A.ADD_CREDIT, _S.OPEN),
    (_S.FIN_QUEUED, _I.WINDOW): (_A.ADD_CREDIT, _S.FIN_QUEUED),
    (_S.CLOSED, _I.WINDOW): (_A.IGNORE, _S.CLOSED),  # race: credit for data sent before FIN
    (_S.OPEN, _I.RESET_SENT): (_A.SEND_RESET, _S.CLOSED),
    (_S.FIN_QUEUED, _I.RESET_SENT): (_A.SEND_RESET, _S.CLOSED),
    (_S.CLOSED, _I.RESET_SENT): (_A.SEND_RESET, _S.CLOSED),
}

RECEIVE_TRANSITIONS: Final[dict[tuple[ReceiveState, Input], tuple[Action, ReceiveState]]] = {
    (_R.PENDING, _I.OPEN_OK): (_A.OPENED, _R.OPEN),
    (_R.PENDING, _I.OPEN_FAILED): (_A.OPEN_FAILED, _R.CLOSED),
    (_R.OPEN, _I.DATA): (_A.DELIVER_DATA, _R.OPEN),
    (_R.OPEN, _I.FIN): (_A.DELIVER_EOF, _R.CLOSED),
    (_R.OPEN, _I.RESET): (_A.ABORTED, _R.CLOSED),
    (_R.CLOSED, _I.RESET): (_A.ABORTED, _R.CLOSED),
    (_R.OPEN, _I.ACKNOWLEDGE): (_A.RETURN_CREDIT, _R.OPEN),
    (_R.CLOSED, _I.ACKNOWLEDGE): (_A.RELEASE, _R.CLOSED),
}

LOCAL_INPUTS: Final = frozenset({_I.SEND_DATA, _I.SEND_EOF, _I.DRAINED, _I.ACCEPT, _I.REFUSE,
                                 _I.RESET_SENT, _I.ACKNOWLEDGE})
SEND_INPUTS: Final = frozenset({_I.SEND_DATA, _I.SEND_EOF, _I.DRAINED, _I.ACCEPT, _I.REFUSE,
                                _I.RESET_SENT, _I.WINDOW})
RECEIVE_INPUTS: Final = frozenset({_I.OPEN_OK, _I.OPEN_FAILED, _I.DATA, _I.FIN, _I.RESET,
                                   _I.ACKNOWLEDGE})


def transition(state: SendState | ReceiveState, event: Input) -> Transition:
    """Look ``(state, event)`` up in its half's table.

    Raises:
        LocalProtocolError: an illegal local input (a caller bug).
        RemoteProtocolError: an illegal record from the peer.
    """
    table: dict[tuple[SendState, Input], tuple[Action, SendState]] | \
        dict[tuple[ReceiveState, Input], tuple[Action, ReceiveState]]
    table = SEND_TRANSITIONS if isinstance(state, SendState) else RECEIVE_TRANSITIONS
    found = table.get((state, event))  # type: ignore[arg-type]
    if found is not None:
        return found
    half = "send" if isinstance(state, SendState) else "receive"
    message = f"{event.value} is not allowed while the {half} half is {state.value}"
    if event in LOCAL_INPUTS:
        raise LocalProtocolError(message)
    raise RemoteProtocolError(message, code=int(ErrorCode.PROTOCOL_ERROR))


class Channel:
    """Everything the session keeps about one live channel.

    Queued outbound data is a deque of immutable pieces (``bytes`` or read-only
    ``memoryview``), so queueing never copies and a chunk that is a whole
    piece goes out without a copy either.  A chunk cut from the middle of a
    piece leaves the rest as a view that keeps the whole piece in memory:
    ``pinned`` counts those sent-but-held bytes until the piece is gone, so
    :attr:`held_size` is what the queue really holds.
    """

    __slots__ = ("channel_id", "send_state", "receive_state", "credit", "window",
                 "pieces", "queued_size", "pinned", "wake_below", "early", "early_size")

    def __init__(self, channel_id: int, *, opener: bool, send_window: int,
                 receive_window: int) -> None:
        self.channel_id = channel_id
        self.send_state = SendState.OPEN if opener else SendState.PENDING
        self.receive_state = ReceiveState.PENDING if opener else ReceiveState.OPEN
        self.credit = SendCredit(send_window)
        self.window = ReceiveWindow(receive_window)
        self.pieces: deque[bytes | memoryview] = deque()
        self.queued_size = 0
        #: Bytes of the first piece already cut but still held by the view of its rest.
        self.pinned = 0
        #: The session's per-channel resume mark (0: none): see Session.send_capacity.
        self.wake_below = 0
        #: Our channels only, until the peer answers the OPEN: the DATA chunks sent so
        #: far, kept so that an OPEN refused with GOING_AWAY can be made again on
        #: another session with the same bytes (:meth:`keep`); None once not needed.
        self.early: list[bytes | memoryview] | None = [] if opener else None
        self.early_size = 0

    @property
    def held_size(self) -> int:
        """Memory the queue holds, as the session's outbound budget counts it."""
        return (self.queued_size + self.pinned + PIECE_OVERHEAD_SIZE * len(self.pieces)
                + self.early_held)

    @property
    def early_held(self) -> int:
        """Memory the kept early chunks hold, as the outbound budget counts it."""
        early = self.early
        return self.early_size + PIECE_OVERHEAD_SIZE * len(early) if early else 0

    @property
    def finished(self) -> bool:
        """True once both halves are closed: the id can be forgotten."""
        return self.send_state is SendState.CLOSED and self.receive_state is ReceiveState.CLOSED

    def send_capacity(self) -> int:
        """Credit not already spoken for (Session.send_capacity also applies its
        ``max_send_window`` and outbound budget)."""
        if self.send_state is not SendState.OPEN:
            return 0
        return self.credit.credit - self.queued_size

    def ready(self) -> bool:
        """True when the scheduler can cut a DATA chunk now."""
        return self.queued_size > 0 and self.credit.credit > 0

    def send(self, event: Input) -> Action:
        """Apply a send-half input; return the action the session must take."""
        action, self.send_state = transition(self.send_state, event)  # type: ignore[assignment]
        return action

    def receive(self, event: Input) -> Action:
        """Apply a receive-half input; return the action the session must take."""
        action, self.receive_state = transition(self.receive_state, event)  # type: ignore[assignment]
        return action

    def queue(self, data: bytes | bytearray | memoryview) -> None:
        """Queue outbound ``data`` without copying bytes or read-only views.

        Raises:
            LocalProtocolError: the send half is not OPEN, or ``data`` exceeds
                :meth:`send_capacity`.
        """
        if self.send_state is not SendState.OPEN:
            self.send(Input.SEND_DATA)  # raises: (OPEN, SEND_DATA) is the only legal pair
        if type(data) is not bytes:  # keep no reference to a buffer the caller may change
            view = memoryview(data)
            data = view.cast("B") if view.readonly and view.c_contiguous else bytes(view)
        size = len(data)
        if size > self.credit.credit - self.queued_size:
            raise LocalProtocolError(
                f"send_data of {size} bytes exceeds send_capacity {self.send_capacity()}")
        if size:
            self.pieces.append(data)
            self.queued_size += size

    def acknowledge(self, size: int, room: int = 0) -> int:
        """The application consumed ``size`` bytes; return the WINDOW increment due, or 0.

        ``room``: how far the receive window may grow (see ReceiveWindow.acknowledge).
        """
        if self.receive_state is ReceiveState.OPEN:  # (OPEN, ACKNOWLEDGE) -> RETURN_CREDIT
            return self.window.acknowledge(size, room)
        self.receive(Input.ACKNOWLEDGE)  # raises while PENDING
        self.window.acknowledge(size)  # CLOSED: the peer sends no more, so keep the credit
        return 0

    def take(self, budget: int) -> list[bytes | memoryview]:
        """Dequeue up to ``budget`` bytes as a list of pieces (no copying)."""
        pieces = self.pieces
        out: list[bytes | memoryview] = []
        while budget and pieces:
            head = pieces[0]
            size = len(head)
            if size <= budget:
                pieces.popleft()
                out.append(head)
                budget -= size
                self.queued_size -= size
                self.pinned = 0  # (only the first piece is ever cut into)
            else:
                view = head if isinstance(head, memoryview) else memoryview(head)
                out.append(view[:budget])
                pieces[0] = view[budget:]
                self.queued_size -= budget
                self.pinned += budget
                budget = 0
        return out

    def discard_queue(self) -> None:
        """Drop queued outbound data (the channel was reset), and the early chunks kept."""
        self.pieces.clear()
        self.queued_size = 0
        self.pinned = 0
        self.drop_early()

    def keep(self, payload: bytes | memoryview) -> int:
        """A DATA chunk went out before the peer answered our OPEN: keep it (no copy).

        Call it once the chunk's credit is consumed. Returns the change in
        :attr:`held_size`. What is kept stays within the window the channel
        opened with: past it, the peer must have returned credit (WINDOW) for
        bytes it read, so it acted on the OPEN and a GOING_AWAY refusal would no
        longer mean "never acted on": the chunks are dropped, and a negative
        change returned.
        """
        early = self.early
        assert early is not None
        size = len(payload)
        if self.credit.credit + self.early_size + size > self.credit.limit:
            return -self.drop_early()
        early.append(payload)
        self.early_size += size
        return size + PIECE_OVERHEAD_SIZE

    def drop_early(self) -> int:
        """Stop keeping early chunks (the peer answered the OPEN); returns the
        :attr:`held_size` that frees."""
        held = self.early_held
        self.early = None
        self.early_size = 0
        return held

    def unsent_since_open(self) -> bytes | None:
        """Everything queued on this channel since the OPEN (sent and kept, or still
        queued), in order; None if the early chunks were not kept, or the peer
        returned credit for some (it read them: see :meth:`keep`)."""
        if self.early is None or self.credit.credit + self.early_size > self.credit.limit:
            return None
        return b"".join([*self.early, *self.pieces])


class ChannelTable:
    """The live channels of one session, and the id rules.

    One side opens odd ids, the other even ones, each strictly increasing, so
    "was this id ever used?" needs two integers, not a set of dead ids.
    """

    __slots__ = ("live", "next_local_id", "last_remote_id", "remote_parity")

    def __init__(self, *, opens_odd: bool) -> None:
        self.live: dict[int, Channel] = {}
        self.next_local_id = 1 if opens_odd else 2
        self.last_remote_id = 0
        self.remote_parity = 0 if opens_odd else 1

    def was_used(self, channel_id: int) -> bool:
        """True if the id's opener has used it (the channel may be gone by now)."""
        if channel_id & 1 == self.remote_parity:
            return 0 < channel_id <= self.last_remote_id
        return 0 < channel_id < self.next_local_id

    def check_known(self, channel_id: int) -> None:
        """Raise unless the id was used: a record for a gone channel is a race, not so one for
        a channel that never existed."""
        if not self.was_used(channel_id):
            raise RemoteProtocolError(f"record for channel {channel_id}, which was never opened",
                                      code=int(ErrorCode.PROTOCOL_ERROR))

    def claim_remote(self, channel_id: int) -> None:
        """Accept the id of a peer OPEN: right parity, above every earlier one."""
        if channel_id == 0 or channel_id & 1 != self.remote_parity:
            raise RemoteProtocolError(f"OPEN with channel id {channel_id} of the wrong parity",
                                      code=int(ErrorCode.PROTOCOL_ERROR))
        if channel_id <= self.last_remote_id:
            raise RemoteProtocolError(f"OPEN reuses channel id {channel_id}",
                                      code=int(ErrorCode.PROTOCOL_ERROR))
        self.last_remote_id = channel_id

    def claim_local(self, max_channels: int) -> int:
        """Return the id for our next OPEN.

        Raises:
            ChannelRefused: the channel limit or the id space is exhausted.
        """
        channel_id = self.next_local_id
        if len(self.live) >= max_channels or channel_id > MAX_CHANNEL_ID:
            raise ChannelRefused("too many channels on this session",
                                 reason=int(OpenFailure.LIMIT_REACHED))
        self.next_local_id += 2
        return channel_id
