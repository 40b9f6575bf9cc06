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
for ``SESSION_IDLE_TIMEOUT``.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from typing import Final

import trio

__all__ = ["HttpSession", "HttpSessions", "SESSION_IDLE_TIMEOUT", "DEFAULT_BUFFERED_SIZE"]

#: A session with no request in progress for this long is over (polling: the agent
#: has a GET held nearly all the time; streaming: both requests stay open).
SESSION_IDLE_TIMEOUT: Final = 60.0
#: What each direction of a session holds at most before its writer waits.
DEFAULT_BUFFERED_SIZE: Final = 4 * 1024 * 1024

Buffer = bytes | bytearray | memoryview


class HttpSession(trio.abc.Stream):
    """One HTTP-carried session: the stream its ``TunnelTransport`` runs over."""

    def __init__(self, session_id: str, agent: str, mode: str, *,
                 max_buffered_size: int = DEFAULT_BUFFERED_SIZE) -> None:
        self.id = session_id
        self.agent = agent
        self.mode = mode
        self.transport_name = mode  # (what status and the dashboard call the transport)
        self.max_buffered_size = max_buffered_size
        self._inbound = bytearray()
        self._inbound_eof = False
        self._outbound: list[Buffer] = []
        self._outbound_size = 0
        self._broken: str | None = None
        self._closed = False
        self._changed = trio.Event()
        self.last_active = trio.current_time()
        self.in_progress = 0  # requests being served now
        #: polling: the next upstream body's number, the next batch's, the last batch
        self.up_sequence = 0
        self.down_sequence = 0
        self.last_batch: list[Buffer] = []

    # -- state shared by both ends ------------------------------------------------

    @property
    def ended(self) -> bool:
        return self._closed or self._broken is not None

    def break_(self, reason: str) -> None:
        """The carrier is gone (a streaming request lost, the session idle): the
        transport's next read fails with ``reason``."""
        if self._broken is None and not self._closed:
            self._broken = reason
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait(self) -> None:
        await self._changed.wait()

    def touch(self) -> None:
        self.last_active = trio.current_time()

    def idle_for(self, now: float) -> float:
        return 0.0 if self.in_progress else now - self.last_active

    # -- trio.abc.Stream: the session's TunnelTransport -----------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            self._check()
            if self._inbound:
                size = len(self._inbound) if max_bytes is None else max_bytes
                data = bytes(self._inbound[:size])
                del self._inbound[:size]
                self._notify()
                await trio.sleep(0)
                return data
            if self._inbound_eof:
                await trio.sleep(0)
                return b""
            await self._wait()

    async def send_all(self, data: Buffer) -> None:
        await self.send_parts([bytes(data)])

    async def send_parts(self, parts: Sequence[Buffer]) -> None:
        """Queue ``parts`` for the downstream requests (not joined), once there is room."""
        await self.wait_send_all_might_not_block()
        self._outbound.extend(parts)
        self._outbound_size += sum(map(len, parts))
        self._notify()

    async def wait_send_all_might_not_block(self) -> None:
        while True:
            self._check()
            if self._outbound_size < self.max_buffered_size:
                await trio.sleep(0)
                return
            await self._wait()

    async def aclose(self) -> None:
        self._closed = True
        self._notify()
        await trio.sleep(0)

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the session's stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)

    # -- the request handlers' end ---------------------------------------------------

    async def feed(self, data: bytes) -> bool:
        """Add upstream bytes once there is room; False (nothing added) once ended."""
        while not self.ended and len(self._inbound) >= self.max_buffered_size:
            await self._wait()
        if self.ended:
            return False
        self._inbound += data
        self._notify()
        return True

    def feed_eof(self) -> None:
        """The agent ended its upstream on purpose: the transport reads EOF."""
        self._inbound_eof = True
        self._notify()

    async def take(self, max_size: int, timeout: float = float("inf")) -> list[Buffer]:
        """Downstream bytes, at most ``max_size`` (more than nothing once any is
        queued); [] after ``timeout`` with nothing queued, or once ended and drained."""
        with trio.move_on_after(timeout):
            while not self._outbound and not self.ended:
                await self._wait()
        return self._take_now(max_size)

    def _take_now(self, max_size: int) -> list[Buffer]:
        taken: list[Buffer] = []
        size = 0
        outbound = self._outbound
        while outbound and size < max_size:
            part = outbound[0]
            room = max_size - size
            if len(part) > room:
                view = memoryview(part)
                taken.append(view[:room])
                outbound[0] = view[room:]
                size += room
                break
            taken.append(outbound.pop(0))
            size += len(part)
        if taken:
            self._outbound_size -= size
            self._notify()
        return taken

    @property
    def drained(self) -> bool:
        return not self._outbound


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
