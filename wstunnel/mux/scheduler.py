"""Deficit round robin over the channels that can send DATA now.

Theory of operation
-------------------
A channel is *ready* when it has queued data and send credit.  Ready channels
wait in a FIFO; the one at the head owns the current *turn*, whose budget (the
deficit counter) starts at ``quantum`` bytes.  Each DATA chunk the session
cuts for the head is charged against the budget; when the budget is spent the
head goes to the back with a fresh budget, and when it stops being ready (no
data or no credit left) it leaves the FIFO and forgets its budget.

Classic DRR carries unspent deficit across turns because packets have sizes
fixed in advance.  Here the session cuts chunks itself and never cuts one
larger than ``budget``, so a turn always ends with exactly zero deficit:
nothing needs carrying, and each backlogged channel gets ``quantum`` bytes per
round -- byte-exact fairness at O(1) per chunk.  With ``quantum`` equal to the
maximum chunk size every turn is one chunk, which is what bounds the latency
of a small write behind a bulk transfer to one chunk per busy channel.

Two refinements (docs/PROTOCOL.md §10). A channel that becomes ready with an
empty queue before it is *fresh* and goes ahead of the backlog for one chunk
(FQ-CoDel's new flows), so a keystroke does not wait a whole round of busy
channels. And the chunk follows the link: a channel alone sends one record per
write (no one to be fair to), and on a fast link competing channels get
half the write each instead of the configured small chunk.

Membership is a set beside the FIFO, so :meth:`add` is O(1) and idempotent.
A key leaves the FIFO from the head in O(1) when it stops being ready, which
is the common case; :meth:`discard` (a channel reset or closed while still
ready) is O(ready keys), which is rare and bounded by the channel limit.
"""

from __future__ import annotations

import itertools
import struct
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from ..errors import LocalProtocolError
from .channel import PIECE_OVERHEAD_SIZE, Channel, SendState

__all__ = ["DeficitRoundRobin", "Outbox"]

K = TypeVar("K")


class DeficitRoundRobin(Generic[K]):
    """A FIFO of ready keys served in turns of at most ``quantum`` bytes."""

    __slots__ = ("quantum", "budget", "queue", "members", "fresh")

    def __init__(self, quantum: int) -> None:
        if quantum <= 0:
            raise LocalProtocolError(f"quantum must be positive, got {quantum}")
        self.quantum = quantum
        #: Bytes the head key may still send in its current turn.
        self.budget = quantum
        #: Ready keys in turn order (head first) and the same keys as a set.
        #: Read-only outside this class, except Session's per-chunk fast paths,
        #: which inline :meth:`add` and :meth:`charge` on them.
        self.queue: deque[K] = deque()
        self.members: set[K] = set()
        #: How many keys at the front of ``queue`` came in by :meth:`add_first`
        #: and have not had their turn yet (they form a prefix, in arrival order).
        self.fresh = 0

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, key: object) -> bool:
        return key in self.members

    def add(self, key: K) -> None:
        """Make ``key`` ready (no-op if it already is); it joins at the back."""
        if key not in self.members:
            self.members.add(key)
            self.queue.append(key)

    def add_first(self, key: K) -> None:
        """Make ``key`` ready ahead of everyone (no-op if it already is ready).

        For a channel whose queue was empty: a sparse flow, like an interactive
        session's keystroke, goes before the backlog of bulk channels (the
        new-flow rule of FQ-CoDel, RFC 8290 §4.1), so its wait does not grow with
        the number of busy channels. Fresh keys keep their arrival order among
        themselves; each gets one chunk ahead, then queues at the back as usual.
        """
        if key not in self.members:
            self.members.add(key)
            if self.fresh:
                self.queue.insert(self.fresh, key)
            else:
                self.queue.appendleft(key)
                self.budget = self.quantum
            self.fresh += 1

    def discard(self, key: K) -> None:
        """Make ``key`` not ready, wherever it is in the FIFO."""
        if key in self.members:
            self.members.remove(key)
            if self.queue[0] == key:
                self._drop_head()
            else:
                if self.fresh and key in itertools.islice(self.queue, self.fresh):
                    self.fresh -= 1
                self.queue.remove(key)

    def clear(self) -> None:
        """Forget every ready key (in place: fast paths hold the containers)."""
        self.queue.clear()
        self.members.clear()
        self.budget = self.quantum
        self.fresh = 0

    def set_quantum(self, quantum: int) -> None:
        """Change the turn size; the current turn restarts with the new budget."""
        if quantum <= 0:
            raise LocalProtocolError(f"quantum must be positive, got {quantum}")
        self.quantum = self.budget = quantum

    def peek(self) -> K | None:
        """Return the key whose turn it is, or None when nothing is ready."""
        return self.queue[0] if self.queue else None

    def charge(self, size: int, still_ready: bool, end_turn: bool = False) -> None:
        """Account ``size`` bytes sent by the head key (the one :meth:`peek` gave).

        Args:
            size: bytes just sent; must not exceed :attr:`budget`.
            still_ready: whether the head key still has data and credit.
            end_turn: the turn ends here even if budget is left (a short turn).
        """
        if not 0 <= size <= self.budget:
            raise LocalProtocolError(f"chunk of {size} exceeds the turn budget {self.budget}")
        if not still_ready:
            self.members.remove(self.queue[0])
            self._drop_head()
            return
        self.budget -= size
        if end_turn or self.budget == 0 or self.fresh:  # a fresh key's turn is one chunk
            self.end_turn()

    def end_turn(self) -> None:
        """Send the head key to the back with a fresh budget (its turn ends early)."""
        if self.queue:
            self.queue.rotate(-1)
            self.budget = self.quantum
            if self.fresh:
                self.fresh -= 1

    def _drop_head(self) -> None:
        self.queue.popleft()
        self.budget = self.quantum
        if self.fresh:
            self.fresh -= 1


#: A record as (header, payload): a DATA header and its chunk, or (control record, b"").
Parts = tuple[bytes, "bytes | memoryview"]

_pack_data_header = struct.Struct("!BI").pack
_DATA = 0x05
#: A write of at least this many configured chunks means a fast link...
FAST_WRITE_CHUNKS = 4
#: ...where competing channels share each write in about this many chunks
#: (2, not 4: fewer records per write; 16 channels over ws:// took 3-16 % less
#: CPU per GiB in three sets of interleaved runs, docs/PERFORMANCE.md).
FAST_WRITE_SHARES = 2


class Outbox:
    """Everything a session will send: control records first, then DRR-cut DATA.

    The session appends encoded control records to :attr:`control` and marks
    channels ready with ``drr.add``; :meth:`next_record` does the rest.  When a
    channel with a pending FIN drains, ``on_drained(channel)`` lets the session
    queue the FIN (it must follow the data, never overtake it).

    The outbound budget (send_budget.py): :attr:`held_size` is what all
    queues hold (``Channel.held_size`` summed); the session adds what it
    queues, each cut here subtracts what it frees (not a chunk cut before the
    peer answered our OPEN: it is kept, and counted, until then; Channel.keep).
    While channels wait for
    room (:attr:`watching` is not 0), each cut calls ``on_room(channel)`` so
    that the budget can wake them; otherwise a cut costs one subtraction and
    one test more. Both counters live here because every cut reads them.
    """

    __slots__ = ("control", "drr", "chunk_size", "solo_chunk_size", "adaptive_quantum",
                 "held_size", "watching", "_channels", "_on_drained", "_on_room")

    def __init__(self, channels: dict[int, Channel], *, quantum: int, chunk_size: int,
                 on_drained: Callable[[Channel], None],
                 on_room: Callable[[Channel], None] = lambda ch: None) -> None:
        self.control: deque[bytes] = deque()
        self.drr = DeficitRoundRobin[int](quantum)
        self.chunk_size = chunk_size
        #: The chunk limit while only one channel is ready (no one to be fair to).
        self.solo_chunk_size = chunk_size
        #: Whether the turn size follows the chunk size on a fast link (no fixed quantum).
        self.adaptive_quantum = False
        #: What the channels' queues hold, all together (see the class docstring).
        self.held_size = 0
        #: Reasons to call on_room after a cut (the budget's: channels held back
        #: by max_send_window, plus 1 while any wait for max_queued_size).
        self.watching = 0
        self._channels = channels
        self._on_drained = on_drained
        self._on_room = on_room

    def wants_to_send(self) -> bool:
        return bool(self.control) or self.drr.peek() is not None

    def clear(self) -> None:
        """Forget all pending output (the session failed, its channels with it)."""
        self.control.clear()
        self.drr.clear()
        self.held_size = self.watching = 0

    def next_record(self, max_size: int | None = None) -> bytes | None:
        """``next_parts`` joined into one record."""
        parts = self.next_parts(max_size)
        if parts is None:
            return None
        head, payload = parts
        return head + payload if payload else head

    def next_parts(self, max_size: int | None = None) -> Parts | None:
        """Pop a control record, else cut one DATA chunk for the channel whose turn it is.

        Returns (record header, payload); a control record is (record, b"").

        ``max_size`` (the I/O layer's write size on a slow link) caps the
        chunk and then ends the turn, so interactive channels wait behind one
        small chunk per busy channel, not a whole quantum.

        A channel that is the only one ready gets a solo chunk: up to
        ``solo_chunk_size`` and ``max_size`` in one record. Fairness loses
        nothing (whoever becomes ready next is served at the next cut, which
        follows this write, as it would behind sixteen small chunks of the
        same write), and the per-record work drops sixteenfold on a fast link.

        On a fast link (``max_size`` at least FAST_WRITE_CHUNKS chunks) channels
        that compete get chunks of ``max_size // FAST_WRITE_SHARES`` (up to the
        solo size), so each write still interleaves that many turns while a
        round of N busy channels stays about N / FAST_WRITE_SHARES writes long.
        """
        if self.control:
            return self.control.popleft(), b""
        drr = self.drr
        ready = drr.queue
        if not ready:
            return None
        channel_id = ready[0]
        ch = self._channels[channel_id]
        if len(ready) == 1 and self.solo_chunk_size > self.chunk_size:
            return self._solo_parts(ch, channel_id, max_size)
        credit = ch.credit
        chunk = self.chunk_size
        if (max_size is not None and max_size >= FAST_WRITE_CHUNKS * chunk
                and self.solo_chunk_size > chunk):
            chunk = min(self.solo_chunk_size, max_size // FAST_WRITE_SHARES)
        if self.adaptive_quantum and drr.quantum != chunk:
            drr.set_quantum(chunk)
        budget = drr.budget
        if budget > chunk:
            budget = chunk
        short_turn = False
        if max_size is not None and max_size < budget:
            short_turn = True
            budget = max(1, max_size)
        if budget > credit.credit:
            budget = credit.credit
        payload, size, freed = _cut(ch, budget, merge=False)
        if ch.early is not None:  # (sent before the peer's answer to our OPEN: kept)
            freed -= ch.keep(payload)
        queued = ch.queued_size
        self.held_size -= freed
        if self.watching:
            self._on_room(ch)
        still_ready = queued > 0 and credit.credit > 0
        drr.charge(size, still_ready, end_turn=short_turn)
        if not queued and ch.send_state is SendState.FIN_QUEUED:
            self._on_drained(ch)
        return _pack_data_header(_DATA, channel_id), payload

    def _solo_parts(self, ch: Channel, channel_id: int, max_size: int | None) -> Parts:
        """One chunk of up to the solo size; the turn restarts (nobody else is waiting)."""
        credit = ch.credit
        limit = self.solo_chunk_size
        if max_size is not None and max_size < limit:
            limit = max(1, max_size)
        if limit > credit.credit:
            limit = credit.credit
        drr = self.drr
        pieces = ch.pieces
        head = pieces[0]
        size = len(head)
        if size <= limit and len(pieces) == 1:
            # Once per write on a busy channel: its one queued piece goes whole and
            # it leaves the round robin, as _cut and DRR.discard would do it.
            pieces.popleft()
            ch.queued_size = 0
            credit.credit -= size  # (size <= limit <= credit)
            self.held_size -= size + PIECE_OVERHEAD_SIZE
            if ch.pinned:
                self.held_size -= ch.pinned
                ch.pinned = 0
            if ch.early is not None:
                self.held_size += ch.keep(head)
            if self.watching:
                self._on_room(ch)
            drr.members.remove(channel_id)
            drr.queue.popleft()
            drr.budget = drr.quantum
            drr.fresh = 0
            if ch.send_state is SendState.FIN_QUEUED:
                self._on_drained(ch)
            return _pack_data_header(_DATA, channel_id), head
        payload, _, freed = _cut(ch, limit, merge=True)
        if ch.early is not None:
            freed -= ch.keep(payload)
        self.held_size -= freed
        if self.watching:
            self._on_room(ch)
        if ch.queued_size > 0 and credit.credit > 0:
            drr.budget = drr.quantum
            drr.fresh = 0  # (the only key: its one chunk ahead is spent)
        else:
            drr.discard(channel_id)
            if not ch.queued_size and ch.send_state is SendState.FIN_QUEUED:
                self._on_drained(ch)
        return _pack_data_header(_DATA, channel_id), payload


def _cut(ch: Channel, limit: int, *, merge: bool) -> tuple[bytes | memoryview, int, int]:
    """Dequeue up to ``limit`` bytes of ``ch`` as one payload and consume their credit.

    A queued piece that fits goes as it is (no copy, the common case); with
    ``merge`` the following pieces are joined to it up to ``limit`` (a solo
    chunk gathers what several reads queued), otherwise it goes alone.
    Returns (payload, its size, the bytes of ``ch.held_size`` this freed).
    """
    head = ch.pieces[0]
    size = len(head)
    payload: bytes | memoryview
    if size == limit or (size < limit and (not merge or len(ch.pieces) == 1)):
        ch.pieces.popleft()
        ch.queued_size -= size
        payload = head
        freed = size + PIECE_OVERHEAD_SIZE
        if ch.pinned:
            freed += ch.pinned
            ch.pinned = 0
    else:
        before = ch.queued_size
        held = ch.held_size
        pieces = ch.take(limit)
        size = before - ch.queued_size
        freed = held - ch.held_size
        payload = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    ch.credit.consume(size)
    return payload, size, freed
