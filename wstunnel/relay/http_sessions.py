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
from typing import Final

import trio

from ..net.byte_pipe import Buffer, BytePipe

__all__ = ["HttpSession", "HttpSessions", "SESSION_IDLE_TIMEOUT", "Buffer"]

#: A session with no request in progress for this long is over (polling: the agent
#: has a GET held nearly all the time; streaming: both requests stay open).
SESSION_IDLE_TIMEOUT: Final = 60.0


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
        #: polling: the next upstream body's number, the next batch's, the last batch
        self.up_sequence = 0
        self.down_sequence = 0
        self.last_batch: list[Buffer] = []

    def touch(self) -> None:
        self.last_active = trio.current_time()

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
