"""Session resumption, sans-IO: number the records, keep the unacknowledged ones, replay.

Theory of operation
-------------------
A resumable session outlives its carrier (one WebSocket, or one HTTP
transport): when the carrier breaks, both sides keep the multiplexer session
and its channels, the agent reconnects, and each side re-sends exactly the
records the other has not received. That needs three things, all here:

* Every record a side sends after the handshake has a sequence number (1, 2,
  ... in sending order; not on the wire, both sides count). ``ReplayLog``
  keeps each record sent until the peer acknowledges it.
* Each side counts the records it has received and acknowledges them with an
  ACK record (type 0x0a, a u64 count) at least every ``ACK_RECORDS`` records
  or ``ACK_BYTES`` bytes, and when asked (each keepalive). ACKs themselves are
  neither numbered nor kept: a lost one is superseded by the next.
* On resume each side tells the other, in the reconnect's HTTP exchange, how
  many records it has received; ``replay(count)`` returns the records after
  that, which go out on the new carrier before anything new. Nothing is lost
  (all that was not received is re-sent) and nothing is duplicated (all that
  was received is not).

What is kept is what the peer has not acknowledged: records in flight (about a
bandwidth-delay product) plus the acknowledgement interval. That holds only for
a peer that acknowledges; one that grants window but never does would make us
keep all we send. So the log has a ``limit`` (the session's ``max_queued_size``,
at least twice ``ACK_BYTES``): once that much is kept, no new record goes out
until an ACK makes room (``full``; the peer's own ACKs and our pongs still go,
and control records up to ``CONTROL_ROOM`` more: ``room_for_control``).
An honest peer always gets there: whatever it received, it has acknowledged all
but less than ``ACK_BYTES`` of it. During an outage nothing new is written, so
nothing new is kept, and the multiplexer's own budgets hold what waits.

Only a session both sides agreed to make resumable (PROTOCOL.md section 12)
has ACK records; on any other, record type 0x0a is a protocol error as before.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Final

from .errors import RemoteProtocolError
from .mux import ErrorCode

__all__ = ["ACK", "ACK_BYTES", "ACK_RECORDS", "CONTROL_ROOM", "INSTANCE_HEADER", "Instance",
           "RESUMABLE_HEADER", "RESUMED_HEADER", "RESUME_HEADER", "ReplayLimitReached",
           "ReplayLog", "Ticket", "ack_record", "parse_ack", "parse_instance", "parse_resume",
           "parse_ticket"]

#: The ACK record's type byte (mux/wire.py's types end at 0x09).
ACK: Final = 0x0A
_ACK: Final = struct.Struct("!BQ")
_PROTOCOL_ERROR: Final = int(ErrorCode.PROTOCOL_ERROR)
#: Acknowledge at least this often (records, bytes received since the last ACK).
ACK_RECORDS: Final = 64
ACK_BYTES: Final = 256 * 1024

#: While ``full``, control records (the answers to the peer's OPENs, RESETs, its
#: data: OPEN_OK, WINDOW...) still go, as long as this much more is kept: a
#: transport that stops reading while too many answers wait (net/transport.py)
#: must still read the ACK that ends the hold.
CONTROL_ROOM: Final = 1024 * 1024

Record = tuple[bytes, "bytes | memoryview"]

#: The handshake's headers (PROTOCOL.md section 12). The agent asks for a resumable
#: session with ``new``, or resumes one with ``ID SECRET RECEIVED``; the relay offers
#: ``ID SECRET GRACE`` (a new resumable session) and answers a resume with
#: ``RECEIVED``, or ``no; WHY`` and a new session.
RESUME_HEADER: Final = "X-Wstunnel-Resume"
RESUMABLE_HEADER: Final = "X-Wstunnel-Resumable"
RESUMED_HEADER: Final = "X-Wstunnel-Resumed"
#: The daemon agent's ``IDENTITY GENERATION``: which agent (host and configuration) and
#: which process of it, so that the relay ends at once the held sessions of a process
#: that restarted (their secrets died with it) instead of keeping them resume_grace.
INSTANCE_HEADER: Final = "X-Wstunnel-Instance"


@dataclass(frozen=True, slots=True)
class Ticket:
    """What the agent needs to resume a session: its id, its secret, and how long
    the relay keeps it after its carrier is lost."""

    session_id: str
    secret: str
    grace: float

    def __str__(self) -> str:
        return f"{self.session_id} {self.secret} {self.grace:g}"

    def request(self, received: int) -> str:
        """The resume header's value."""
        return f"{self.session_id} {self.secret} {received}"


def parse_ticket(value: str) -> Ticket | None:
    """The relay's offer, or None when malformed (then the session is not resumable)."""
    parts = value.split()
    try:
        return Ticket(parts[0], parts[1], float(parts[2])) if len(parts) == 3 else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Instance:
    """One process of one agent: ``identity`` is the same across its restarts (an
    opaque token) and ``generation`` grows from one to the next (its start time)."""

    identity: str
    generation: int

    def __str__(self) -> str:
        return f"{self.identity} {self.generation}"


def parse_instance(value: str | None) -> Instance | None:
    """The instance header's value; None when absent or malformed (then ignored)."""
    parts = (value or "").split()
    if len(parts) != 2 or len(parts[0]) > 64:
        return None
    generation = parts[1]
    if not (generation.isascii() and generation.isdigit() and len(generation) <= 20):
        return None
    return Instance(parts[0], int(generation))


def parse_resume(value: str) -> tuple[str, str, int] | None:
    """(id, secret, received) from the agent's resume header; None for ``new``.

    Raises:
        ValueError: neither ``new`` nor three fields with a count.
    """
    value = value.strip()
    if value == "new":
        return None
    parts = value.split()
    if len(parts) != 3 or not (parts[2].isascii() and parts[2].isdigit()):
        raise ValueError(f"expected 'new' or 'ID SECRET RECEIVED', got {value[:80]!r}")
    return parts[0], parts[1], int(parts[2])


def ack_record(count: int) -> bytes:
    """The ACK record saying ``count`` records were received."""
    return _ACK.pack(ACK, count)


def parse_ack(record: bytes | bytearray | memoryview) -> int:
    """The count an ACK record carries.

    Raises:
        RemoteProtocolError: not exactly 9 bytes.
    """
    if len(record) != _ACK.size:
        raise RemoteProtocolError(f"ACK record of {len(record)} bytes, expected {_ACK.size}",
                                  _PROTOCOL_ERROR)
    return int(_ACK.unpack(bytes(record))[1])


@dataclass(frozen=True, slots=True)
class ReplayLimitReached:
    """The peer has not acknowledged ``kept_size`` bytes, ``limit`` or more: nothing
    new goes out until it does. Once per episode (the log was below the limit
    before): a peer that does not acknowledge, or a link whose bandwidth-delay
    product is above the limit."""

    kept_size: int
    limit: int


class ReplayLog:
    """One side's sequence numbers, kept records and acknowledgement duty."""

    def __init__(self, limit: int = 2 * ACK_BYTES) -> None:
        #: Keep at most about this much (bytes; the record that crosses it goes).
        self.limit = max(limit, 2 * ACK_BYTES)
        self._kept: deque[Record] = deque()
        self._kept_size = 0
        self.first_kept = 1  # the sequence number of _kept[0]
        self.sent = 0  # records sent (numbered)
        self.received = 0  # records received (numbered)
        self._acked_received = 0  # the count our last ACK said
        self._bytes_since_ack = 0
        self._holding = False  # (full stopped a send, and no ACK made room since)

    @property
    def kept_size(self) -> int:
        """Bytes of records kept for a possible replay."""
        return self._kept_size

    @property
    def kept_count(self) -> int:
        return len(self._kept)

    @property
    def full(self) -> bool:
        """True when ``limit`` bytes wait for the peer's ACK: send no new record."""
        return self._kept_size >= self.limit

    @property
    def room_for_control(self) -> bool:
        """True while a control record may go although ``full`` (``CONTROL_ROOM``)."""
        return self._kept_size < self.limit + CONTROL_ROOM

    # -- sending -------------------------------------------------------------------

    def sent_record(self, head: bytes, payload: bytes | memoryview) -> None:
        """A record (header and payload, as framed) goes out now: number and keep it."""
        self.sent += 1
        self._kept.append((head, payload))
        self._kept_size += len(head) + len(payload)

    def acknowledged(self, count: int) -> None:
        """The peer has received ``count`` records: forget them.

        Raises:
            RemoteProtocolError: it claims more than we sent, or fewer than it
                already acknowledged.
        """
        if count > self.sent:
            raise RemoteProtocolError(f"ACK of {count} records, but only {self.sent} were sent",
                                      _PROTOCOL_ERROR)
        if count < self.first_kept - 1:
            raise RemoteProtocolError(f"ACK of {count} records after an ACK of "
                                      f"{self.first_kept - 1}", _PROTOCOL_ERROR)
        kept = self._kept
        while self.first_kept <= count:
            head, payload = kept.popleft()
            self._kept_size -= len(head) + len(payload)
            self.first_kept += 1
        if self._holding and self._kept_size < self.limit:
            self._holding = False

    def hold(self) -> ReplayLimitReached | None:
        """``full`` stopped a send: the event to report, once per episode."""
        if self._holding:
            return None
        self._holding = True
        return ReplayLimitReached(self._kept_size, self.limit)

    def replay(self, peer_received: int) -> list[Record]:
        """The records to send again on a new carrier, in order: those after the
        ``peer_received`` the peer reported when it resumed.

        Raises:
            RemoteProtocolError: the count is beyond what we sent, or before what
                it had acknowledged (we no longer have those records).
        """
        self.acknowledged(peer_received)
        return list(self._kept)

    # -- receiving -----------------------------------------------------------------

    def received_record(self, size: int) -> bool:
        """A numbered record of ``size`` bytes arrived; True when an ACK is due."""
        self.received += 1
        self._bytes_since_ack += size
        return (self.received - self._acked_received >= ACK_RECORDS
                or self._bytes_since_ack >= ACK_BYTES)

    def take_ack(self) -> bytes | None:
        """The ACK to send now, or None when nothing new was received since the last."""
        if self.received == self._acked_received:
            return None
        self._acked_received = self.received
        self._bytes_since_ack = 0
        return ack_record(self.received)
