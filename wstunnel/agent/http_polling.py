"""HTTP polling: the session as ordinary request/response pairs (docs/PROTOCOL.md §11.2).

``PollingStream`` is a ``BytePipe`` fed and drained by two loops of ordinary
requests (its ``run_background``, started by the transport): POSTs carry what
the session wrote, batched, and long-poll GETs fetch what the
relay has (held by it up to 25 s while there is nothing), fed to the session
as they arrive: a relay streams an answer while the link takes it (relay/
http_front.py), so a record in it must not wait for the answer's end. Two
GETs are out when the relay says it takes them (``X-Wstunnel-Pipeline-Down``):
the next waits at the relay while an answer comes down and takes the bytes
after it at once; answers are fed in order, a later one left unread until the
one before it is whole (``_down_turn_of``). POSTs
are sized to the link (``PipeSizer``: bytes handed to one have left the fair
order). One POST is in flight, or two when the relay says it takes them
(``X-Wstunnel-Pipeline``): the next starts once a body is written, so it does
not wait for the previous one's answer, and the link does not idle for that
round trip: bodies then need to last one or two round trips, not 20 (what an
interactive record queued behind them waits for). Each request is numbered
(``X-Wstunnel-Seq``), so one whose connection broke is sent again on a new
connection without losing or repeating bytes: after growing waits, for up to
``RETRY_BUDGET``, so that a short outage does not end the session
(``_Retries``). http_transport.py opens the session and hands it over.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import h11
import trio

from ..errors import HandshakeError
from ..framing import CONTENT_TYPE, POLLING, SEQUENCE_HEADER, SESSION_HEADER
from ..net.byte_pipe import Buffer, BytePipe
from ..net.pipe_sizing import IDLE_FACTOR, PIPELINED_IDLE_FACTOR, PipeSizer
from .http_client import (
    BODY_EXCERPT_SIZE,
    MAX_ANSWER_SIZE,
    SESSION_GONE,
    UNKNOWN_SESSION,
    HttpClient,
    HttpRoute,
    close_all,
)

__all__ = ["PollingStream", "RETRY_DELAYS", "RETRY_BUDGET", "MAX_POSTS_IN_FLIGHT",
           "MAX_GETS_IN_FLIGHT"]

log = logging.getLogger("wstunnel.agent")

MAX_POST_SIZE: Final = 1_000_000  # (under nginx's default client_max_body_size, 1 MiB)
#: The most POSTs in flight, when the relay announces it takes that many: two hide
#: the round trip to each answer; more would only hold more bytes past the fair order.
MAX_POSTS_IN_FLIGHT: Final = 2
#: The most GETs in flight, when the relay announces it takes that many: two keep one
#: waiting at the relay while the other's answer comes down, so the bytes after that
#: answer go at once instead of after the next request's round trip.
MAX_GETS_IN_FLIGHT: Final = 2
#: Polling: the waits before each retry of a request whose connection broke (the
#: last one repeats), and how long after the first break retries go on. A blip (a
#: NAT or proxy restarting, a Wi-Fi hand-over) shorter than that passes without the
#: session ending or resuming. The first retry goes at once (the usual break is a
#: kept-alive connection a proxy closed meanwhile: a new one is all it takes), the
#: next ones soon (most blips are short). 3 s stays well under the keepalive's
#: default ping_timeout (10 s): a dead relay is still given up on before the
#: keepalive would (and a shorter ping_timeout still ends the session first).
RETRY_DELAYS: Final = (0.0, 0.05, 0.2, 0.5, 1.0)
RETRY_BUDGET: Final = 3.0
#: Polling: a request a proxy answered 504 (it gave up waiting for the relay: its read
#: timeout is shorter than a GET's hold, or than a POST's wait for room) is sent again
#: with the same number (safe: numbered) after this pause, so a proxy that answers 504
#: at once is not flooded; the keepalive still ends a session that gets nothing through.
GATEWAY_TIMEOUT_PAUSE: Final = 0.05


class PollingStream(BytePipe):
    """A polling session: a pipe the two request loops feed and drain."""

    transport_name = POLLING

    def __init__(self, route: HttpRoute, session_id: str, *, posts_in_flight: int = 1,
                 gets_in_flight: int = 1) -> None:
        """``posts_in_flight``, ``gets_in_flight``: what the relay's opening answer
        announced (one if none)."""
        super().__init__()
        self.tls = route.relay.secure
        self.route = route
        self.session_id = session_id
        self._clients: dict[str, HttpClient] = {}  # (by slot: GET0, GET1, POST0, POST1)
        self.posts_in_flight = max(1, min(posts_in_flight, MAX_POSTS_IN_FLIGHT))
        self.gets_in_flight = max(1, min(gets_in_flight, MAX_GETS_IN_FLIGHT))
        self._sequence = {"POST": 0}
        self._answered = False  # a request was answered (a 401 then means the session is gone)
        self._down_turn = 0  # the batch to feed next (a later GET's answer waits for it)
        self._down_fed = 0  # bytes of that batch already fed (a retry skips them)
        self._down_turned = trio.Event()  # (set, and replaced, as the turn moves on)
        #: A POST's size, and what waits for the next one past the fair order: what the
        #: link carries in a short time, at least 20 round trips' worth, or 2 with two
        #: POSTs in flight (net/pipe_sizing.py).
        idle_factor = PIPELINED_IDLE_FACTOR if self.posts_in_flight > 1 else IDLE_FACTOR
        self.sizer = PipeSizer(ceiling=MAX_POST_SIZE, idle_factor=idle_factor)
        self.outbound_limit = self.sizer.size

    async def run_background(self) -> None:
        """The request loops; run by the session's transport (net/transport.py) while it
        runs. A failure breaks the pipe: the session then ends like a lost WebSocket."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guarded, self._upstream)
                nursery.start_soon(self._guarded, self._downstream)
        finally:
            await self._close_clients()

    async def _guarded(self, loop: Callable[[], Awaitable[None]]) -> None:
        """A loop's failure breaks the pipe (the session ends) and stops both loops."""
        try:
            await loop()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                HandshakeError, trio.TooSlowError) as exc:
            self.break_(f"HTTP polling failed: {exc}")
        except Exception as exc:  # (a task root: the session ends, the agent goes on)
            log.error("HTTP polling failed", exc_info=True)
            self.break_(f"HTTP polling failed: {exc!r}")

    async def aclose(self) -> None:
        await super().aclose()
        await self._close_clients()

    async def _close_clients(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        await close_all(clients)

    async def _upstream(self) -> None:
        """POSTs in order, each once the one before it is written (its body handed to
        the link) and while fewer than ``posts_in_flight`` await their answers."""
        answered: collections.deque[trio.Event] = collections.deque()
        async with trio.open_nursery() as nursery:
            while True:
                while len(answered) >= self.posts_in_flight:
                    await answered[0].wait()
                    answered.popleft()
                parts = await self.take(self.sizer.size)
                if not parts or self.ended:
                    return
                sequence = self._sequence["POST"]
                self._sequence["POST"] = sequence + 1
                written, done = trio.Event(), trio.Event()
                answered.append(done)
                nursery.start_soon(self._post, nursery.cancel_scope, parts, sequence,
                                   written, done)
                await written.wait()

    async def _post(self, scope: trio.CancelScope, parts: list[Buffer], sequence: int,
                    written: trio.Event, done: trio.Event) -> None:
        """POST ``sequence``; a failure breaks the pipe and stops the other POST."""
        try:
            await self._guarded(lambda: self._post_once(parts, sequence, written))
        finally:
            written.set()
            done.set()
            if self.ended:
                scope.cancel()

    async def _post_once(self, parts: list[Buffer], sequence: int, written: trio.Event) -> None:
        if await self._exchange("POST", parts, sequence, written) is None:
            self.break_("the relay has ended the session")

    async def _downstream(self) -> None:
        """``gets_in_flight`` GET loops, each asking for every so many batches: while
        one answer comes down, the next GET waits at the relay for the bytes after it."""
        async with trio.open_nursery() as nursery:
            for first in range(self.gets_in_flight):
                nursery.start_soon(self._get_loop, nursery.cancel_scope, first)

    async def _get_loop(self, scope: trio.CancelScope, first: int) -> None:
        """One GET loop; its failure breaks the pipe (``_guarded``: no exception leaves
        it, so none reaches the transport) and, as its end does, stops the other."""
        try:
            await self._guarded(lambda: self._gets(first))
        finally:
            scope.cancel()

    async def _gets(self, sequence: int) -> None:
        """GETs for batch ``sequence`` (asked again while answered empty), then for the
        one ``gets_in_flight`` further, once this one is fed; the end of the session
        (410) ends the pipe."""
        while not self.ended:
            await self.wait_for_room()
            length = await self._exchange("GET", None, sequence)
            if length is None:
                self.feed_eof()
                return
            if length:
                sequence += self.gets_in_flight

    async def _down_turn_of(self, sequence: int) -> None:
        """Wait until batch ``sequence`` is the next to feed: answers are fed in order."""
        while self._down_turn < sequence:
            await self._down_turned.wait()

    def _down_done(self, sequence: int) -> None:
        """Batch ``sequence`` is fed whole: the next one's answer may be read."""
        self._down_turn, self._down_fed = sequence + 1, 0
        self._down_turned.set()
        self._down_turned = trio.Event()

    async def _exchange(self, method: str, parts: list[Buffer] | None, sequence: int,
                        written: trio.Event | None = None) -> int | None:
        """One numbered request, sent again on a new connection if its connection
        breaks (``_Retries``); its answer's length (a GET's body fed already), or None
        when the relay says the session ended. ``written`` is set once a POST's body
        has been handed to the link."""
        retries = _Retries(f"{method} {SEQUENCE_HEADER} {sequence}")
        slot = (f"GET{sequence % self.gets_in_flight}" if parts is None
                else f"POST{sequence % self.posts_in_flight}")
        while True:
            try:
                status, body, length = await self._request(slot, parts, sequence, written)
            except (trio.BrokenResourceError, OSError, trio.TooSlowError) as exc:
                await self._drop(slot)
                if self.ended:
                    raise trio.BrokenResourceError(f"{retries.what} failed: {exc}") from exc
                await retries.wait(exc)
                continue
            retries.went_through()
            if status == 504:  # (a proxy's read timeout shorter than the relay's hold)
                log.debug("HTTP polling: %s: a proxy answered 504: asking again", retries.what)
                await trio.sleep(GATEWAY_TIMEOUT_PAUSE)
                continue
            if status == 410:
                return None
            if status == 401:
                raise trio.BrokenResourceError(SESSION_GONE if self._answered else UNKNOWN_SESSION)
            if status != 200:
                raise trio.BrokenResourceError(f"the relay answered {method} with {status}: "
                                               f"{body[:BODY_EXCERPT_SIZE]!r}")
            self._answered = True
            if method == "GET" and length:
                self._down_done(sequence)
            return length

    async def _request(self, slot: str, parts: list[Buffer] | None, sequence: int,
                       written: trio.Event | None) -> tuple[int, bytes, int]:
        """(status, the body unless fed, the body's length), on ``slot``'s connection."""
        method = "GET" if parts is None else "POST"
        client = self._clients.get(slot)
        if client is None:
            client = self._clients[slot] = HttpClient(await self.route.connect())
        extra = [(SESSION_HEADER, self.session_id), (SEQUENCE_HEADER, str(sequence))]
        if parts is None:
            request = self.route.request("GET", POLLING, [*extra, ("Cache-Control", "no-cache")])
            await client.send(request, h11.EndOfMessage())
        else:
            size = sum(map(len, parts))
            request = self.route.request("POST", POLLING, [
                *extra, ("Content-Length", str(size)), ("Content-Type", CONTENT_TYPE)])
            started = trio.current_time()
            await client.send_body(request, parts)
            sent = trio.current_time()
            if written is not None:
                written.set()
        answer = await client.response()
        if parts is not None:
            self._posted(size, sent - started, trio.current_time() - sent)
        elif answer.status_code == 410 or (answer.status_code == 200 and not _empty(answer)):
            await self._down_turn_of(sequence)  # (its bytes, or the end, after earlier ones')
        if method == "GET" and answer.status_code == 200:
            body, length = b"", await self._feed_answer(client)
        else:
            body = await client.body()
            length = len(body)
        if client.reusable:
            client.conn.start_next_cycle()
        else:
            await self._drop(slot)
        return answer.status_code, body, length

    def _posted(self, size: int, writing: float, waiting: float) -> None:
        """A POST body of ``size`` took ``writing`` s to hand to the link and its answer
        ``waiting`` s more: size the next ones (``PipeSizer``)."""
        self.sizer.idle(waiting)
        self.outbound_limit = self.sizer.wrote(size, writing)
        self._notify()

    async def _feed_answer(self, client: HttpClient) -> int:
        """Feed a GET's body to the session as it arrives, past what an earlier try of
        the same number fed (its retry brings the same batch again); the body's length."""
        length = 0
        while True:
            event = await client.next_event()
            if isinstance(event, h11.Data):
                start, length = length, length + len(event.data)
                if length > MAX_ANSWER_SIZE:
                    raise trio.BrokenResourceError(f"an answer over {MAX_ANSWER_SIZE} bytes")
                new = bytes(event.data[max(0, self._down_fed - start):])
                if new and not await self.feed(new):
                    raise trio.ClosedResourceError("the session's stream is closed")
                self._down_fed += len(new)
            elif isinstance(event, h11.EndOfMessage):
                return length
            elif isinstance(event, h11.ConnectionClosed):
                raise trio.BrokenResourceError("the connection closed inside an answer")

    async def _drop(self, slot: str) -> None:
        client = self._clients.pop(slot, None)
        if client is not None:
            await client.aclose()


def _empty(answer: h11.Response) -> bool:
    """An answer with no body (a hold that ran out: nothing to feed, nothing to order)."""
    return any(name == b"content-length" and value.strip() == b"0"
               for name, value in answer.headers)


class _Retries:
    """One polling request's retries: waits growing along ``RETRY_DELAYS``, for up to
    ``RETRY_BUDGET`` after its first break, so a short outage passes unnoticed while
    a relay that stays away is given up on (the session then resumes or ends). The
    same number each time: the relay serves a retry that races its original once
    (docs/PROTOCOL.md §11.2). Each request starts afresh."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self._first_break: float | None = None

    async def wait(self, exc: BaseException) -> None:
        """Sleep before the next retry; ``trio.BrokenResourceError`` once over budget."""
        now = trio.current_time()
        if self._first_break is None:
            self._first_break = now
        left = self._first_break + RETRY_BUDGET - now
        if left <= 0:
            raise self._given_up(now - self._first_break, exc) from exc
        delay = min(RETRY_DELAYS[min(self.count, len(RETRY_DELAYS) - 1)], left)
        self.count += 1
        log.debug("HTTP polling: %s: its connection broke (%s); retry %d in %.2f s",
                  self.what, exc, self.count, delay)
        await trio.sleep(delay)

    def went_through(self) -> None:
        """Log an outage ridden out (at debug a lone retry: a closed kept-alive one)."""
        if self._first_break is not None:
            level = logging.INFO if self.count > 1 else logging.DEBUG
            log.log(level, "HTTP polling: %s went through again after %.2f s (%d retries)",
                    self.what, trio.current_time() - self._first_break, self.count)

    def _given_up(self, elapsed: float, exc: BaseException) -> trio.BrokenResourceError:
        message = (f"the relay could not be reached for {elapsed:.1f} s ({self.what}: "
                   f"{self.count + 1} attempts, the last: {exc})")
        log.warning("HTTP polling: %s; giving up on this session's requests: the session "
                    "resumes if the relay allows it, else its connections are reset and the "
                    "agent reconnects", message)
        return trio.BrokenResourceError(message)
