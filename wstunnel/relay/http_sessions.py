"""The relay's HTTP-transport sessions: each one a trio Stream fed and drained by requests.

Theory of operation: over a WebSocket the session's bytes come and go on one
connection; over the HTTP transports they come in request bodies (POST) and
go out in response bodies (GET), on connections that come and go. An
``HttpSession`` is the byte pipe between the two: ``TunnelTransport`` reads
and writes it as its ``trio.abc.Stream``, the request handlers (http_front.py)
``feed`` it what the agent sent and ``take`` what is to go down. Both sides
are bounded (``max_buffered_size``): a handler feeding a full pipe waits, which
holds the agent's upload back; a session that writes faster than the agent
fetches waits in ``send_all``.

The registry (``HttpSessions``) hands out session ids from
``secrets.token_urlsafe`` (unguessable), bound to the agent that opened them:
a request for a session must carry the same login, and one for an unknown id
or another agent's is refused like a bad login, so ids cannot be probed.

A session breaks (the transport then ends like a lost WebSocket) when a
streaming request's connection is lost, or when no request was in progress
for ``SESSION_IDLE_TIMEOUT``. Once it has ended, requests of it still in
progress get a few seconds to finish, then are cut short (``serving``): one on
a half-open connection would otherwise wait for its body forever.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import secrets
from collections.abc import Iterator
from typing import Final

import trio

from ..net.byte_pipe import Buffer, BytePipe
from ..net.pipe_sizing import PipeSizer

__all__ = ["HttpSession", "HttpSessions", "SESSION_IDLE_TIMEOUT", "MAX_REQUESTS_IN_PROGRESS",
           "POSTS_IN_FLIGHT", "GETS_IN_FLIGHT", "Buffer"]

#: A session with no request in progress for this long is over (polling: the agent
#: has a GET held nearly all the time; streaming: both requests stay open).
SESSION_IDLE_TIMEOUT: Final = 60.0
#: The most requests one session serves at once (a 429 beyond): a polling POST holds
#: a read of its body (up to 256 KiB, BODY_READ_SIZE) while it waits for room to feed
#: it, and nothing else bounds how many an agent sends. An agent has two GETs and two
#: POSTs out, plus retries of broken ones.
MAX_REQUESTS_IN_PROGRESS: Final = 16
#: Polling: how many upstream POSTs an agent may have in flight (announced on the
#: opening answer): body N + 1 may arrive while N is still arriving on its own
#: connection; it waits unread (its bytes stay in the socket) until N is taken.
POSTS_IN_FLIGHT: Final = 2
#: Polling: how many downstream GETs an agent may have in flight (announced on the
#: opening answer): GET N + 1 is held until N's answer has ended, then takes the next
#: bytes at once, without waiting for the agent's next round trip. The last this many
#: batches are kept for a retry (either may be asked again).
GETS_IN_FLIGHT: Final = 2


class HttpSession(BytePipe):
    """One HTTP-carried session on the relay: the stream its ``TunnelTransport`` runs over."""

    def __init__(self, session_id: str, agent: str, mode: str) -> None:
        super().__init__()
        self.id = session_id
        self.agent = agent
        self.mode = mode
        self.transport_name = mode  # (what status and the dashboard call the transport)
        self.last_active = trio.current_time()
        self.in_progress = 0  # requests being served now
        self.streaming_down = False  # streaming: its GET is being answered (one at a time)
        #: polling: the next upstream body's number and how much of it is fed, the next
        #: batch's number, the last batch
        self.up_sequence = 0
        self.up_fed = 0
        self.down_sequence = 0
        self.last_batch: list[Buffer] = []
        #: the last GETS_IN_FLIGHT batches, by number (a retry is answered with its own)
        self._batches: dict[int, list[Buffer]] = {}
        #: the batch whose answer may still grow (None once it has ended, or a retry
        #: was answered with it); the next batch waits until it is None
        self._growing: list[Buffer] | None = None
        #: The bound on what waits past the fair order, from how fast answers drain.
        self.sizer = PipeSizer()
        self.outbound_limit = self.sizer.size
        self._feeding = trio.Lock()  # (bodies fed in order, each byte once: poll_feed_part)
        self._requests: set[trio.CancelScope] = set()  # (those in progress: serving)
        self._requests_deadline = math.inf

    def touch(self) -> None:
        self.last_active = trio.current_time()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """A request of this session in progress, until ``end_requests`` cuts it short.

        A request whose client is gone with its connection half-open (no FIN, no
        RST: a dead agent's host, a dropped path) waits forever for the rest of its
        body; it must not outlive its session, nor keep it from idling out.
        """
        scope = trio.CancelScope(deadline=self._requests_deadline)
        self.in_progress += 1
        self._requests.add(scope)
        try:
            with scope:
                yield
        finally:
            self._requests.discard(scope)
            self.in_progress -= 1
            self.touch()

    @property
    def busy(self) -> bool:
        """MAX_REQUESTS_IN_PROGRESS requests are being served: refuse one more."""
        return self.in_progress >= MAX_REQUESTS_IN_PROGRESS

    def end_requests(self, grace: float) -> None:
        """The session is over: its requests (and any that comes for it now) get
        ``grace`` seconds to finish (a streaming GET writing the session's last
        bytes), then are cancelled."""
        self._requests_deadline = trio.current_time() + grace
        for scope in self._requests:
            scope.deadline = min(scope.deadline, self._requests_deadline)

    async def poll_feed_part(self, sequence: int, offset: int, data: bytes) -> bool | None:
        """Polling: bytes ``offset`` onwards of upstream body ``sequence`` as they arrive:
        fed if it is the next number, past what is fed of it already; dropped if the
        body was taken already (a retry whose answer was lost); None for a number past
        the next, False once the session has ended.

        Fed as they arrive, an interactive record does not wait for the rest of its
        body to cross the link. A retry carries the same body as the try it repeats
        (docs/PROTOCOL.md §11.2): what that try fed before its connection broke is
        skipped. The two may be served at once (a handler waiting for room does not
        notice its connection broke): each part is checked and fed under one lock, so
        no byte is fed twice, and both answer once the body is whole.
        """
        async with self._feeding:
            if sequence < self.up_sequence:
                return True
            if sequence > self.up_sequence or offset > self.up_fed:
                return None  # (past the next; a gap: not the body that was started)
            new = data[self.up_fed - offset:]
            if new and not await self.feed(new):
                return False
            self.up_fed = max(self.up_fed, offset + len(data))
            return True

    async def poll_fed(self, sequence: int) -> None:
        """Polling: upstream body ``sequence`` has arrived whole (and every part of it was
        fed): the next number is next, and a POST held for it (``poll_turn``) goes on."""
        async with self._feeding:
            if sequence == self.up_sequence:
                self.up_sequence += 1
                self.up_fed = 0
                self._notify()

    async def poll_turn(self, sequence: int) -> bool:
        """Polling: wait until upstream body ``sequence`` is the next to feed (or was
        fed already: a retry), or the session has ended; False, at once, for a number
        further ahead than ``POSTS_IN_FLIGHT`` allows. Waiting before the body is read
        leaves it in the socket: a held POST costs no memory here."""
        if sequence >= self.up_sequence + POSTS_IN_FLIGHT:
            return False
        while sequence > self.up_sequence and not self.ended:
            await self._wait()
        return True

    async def poll_batch(self, sequence: int, max_size: int,
                         hold: float) -> list[Buffer] | None:
        """Polling: the answer to downstream request ``sequence``: the next batch (held
        up to ``hold`` while there is none: then []), or the last batch again (its
        answer was lost); None for any other number.

        A retry may come while the request it repeats is still held here (its
        connection broke, which a held request does not notice): whichever of the two
        is answered first takes the batch, and the other gets that same batch again.
        The number is checked and the batch taken in one step, with no checkpoint
        between: a held request never takes bytes under a number already answered
        (they would be lost: the agent never asks for that number again).

        With GETS_IN_FLIGHT, N + 1 may come while N is held or its answer still
        grows: it waits its turn, then takes the next bytes (``_may_take``), so the
        link carries them without waiting for the agent's next request.
        """
        if self.down_sequence <= sequence < self.down_sequence + GETS_IN_FLIGHT:
            with trio.move_on_after(hold):
                while sequence >= self.down_sequence and not self._may_take(sequence):
                    await self._wait()
        if sequence in self._batches:
            return self._repeat(sequence)
        if sequence != self.down_sequence or self._growing is not None:
            return [] if self.down_sequence <= sequence < self.down_sequence + GETS_IN_FLIGHT \
                else None  # (held out its time behind an answer still growing: empty)
        batch = self._take_now(max_size)
        if batch:
            self.last_batch = self._growing = self._batches[sequence] = batch
            self._batches.pop(sequence - GETS_IN_FLIGHT, None)
            self.down_sequence += 1
        return batch

    def _may_take(self, sequence: int) -> bool:
        """Request ``sequence`` is the next, the answer before it has ended, and there
        are bytes to take (or the session has ended: its last bytes, or a 410)."""
        return (sequence == self.down_sequence and self._growing is None
                and (bool(self._outbound) or self.ended))

    def poll_over(self, sequence: int) -> bool:
        """Polling: request ``sequence``, answered empty, is to be told the session has
        ended: it is the next and every byte before it went (N + 1 held out its time
        behind N's answer is not: N may still carry the last bytes)."""
        return self.ended and self._may_take(sequence) and not self._outbound

    def _repeat(self, sequence: int) -> list[Buffer]:
        """A batch asked for again: what it holds now, and it grows no more."""
        batch = self._batches[sequence]
        self.poll_done(batch)
        return list(batch)

    def poll_more(self, batch: list[Buffer], max_size: int) -> list[Buffer]:
        """Polling: more bytes for ``batch`` (the answer being written) as the link
        takes them, at most ``max_size``; [] once there are none, or once a retry was
        answered with what the batch held (it is what the agent gets, whichever answer
        reaches it). Bytes are taken only as the answer's connection drains, so they
        stay in the fair order until the link is ready for them."""
        if batch is not self._growing or max_size <= 0:
            return []
        parts = self._take_now(max_size)
        batch.extend(parts)
        return parts

    def poll_done(self, batch: list[Buffer]) -> None:
        """Polling: ``batch``'s answer has ended (whole or broken): it grows no more, and
        the request for the next number, held meanwhile, may take bytes."""
        if batch is self._growing:
            self._growing = None
            self._notify()

    def written(self, size: int, elapsed: float) -> None:
        """A response body write of ``size`` bytes took ``elapsed`` s: adapt the bound
        on what waits past the fair order (net/pipe_sizing.py)."""
        self.outbound_limit = self.sizer.wrote(size, elapsed)
        self._notify()

    def idle_for(self, now: float) -> float:
        return 0.0 if self.in_progress else now - self.last_active


class HttpSessions:
    """The live HTTP-transport sessions of one relay, by id."""

    def __init__(self) -> None:
        self._by_id: dict[str, HttpSession] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def create(self, agent: str, mode: str) -> HttpSession:
        session = HttpSession(secrets.token_urlsafe(24), agent, mode)
        self._by_id[session.id] = session
        return session

    def find(self, session_id: str, agent: str, mode: str) -> HttpSession | None:
        """The session ``session_id`` if it is ``agent``'s and of that ``mode``, else None."""
        session = self._by_id.get(session_id)
        if session is None or not hmac.compare_digest(session.agent.encode(), agent.encode()):
            return None
        return session if session.mode == mode else None

    def remove(self, session: HttpSession) -> None:
        self._by_id.pop(session.id, None)
