"""The relay's side of the HTTP transports: serving their requests (docs/PROTOCOL.md §11).

Theory of operation: a request carrying ``X-Wstunnel-Transport`` that the door
let in (the same login as an upgrade) is one of:

* **open** (POST, no session id): a new session; the answer (200, the id in
  ``X-Wstunnel-Session``, ``Connection: close``) is sent, and this task then
  runs the session (``serve_session``) until it ends;
* **streaming**: GET with the id: a 200 whose chunked body carries the
  downstream bytes as they come; POST with the id: a chunked body carrying the
  upstream bytes, about a megabyte each, one after the other. A connection
  lost in the middle of either ends the session;
* **polling**: POST with the id and ``X-Wstunnel-Seq: n``: one batch of
  upstream bytes (a repeat of a number already taken is acknowledged and
  dropped: a retry; the one after the next waits, unread, for the next: two in
  flight, announced by ``X-Wstunnel-Pipeline``); GET with the id and
  ``X-Wstunnel-Seq: n``: the next downstream batch, held up to
  ``POLL_HOLD_TIMEOUT`` while there is none, in a chunked body that takes more
  bytes as the link drains (n below the next number asks for that batch
  again: its answer was lost; n + 1 is held until n's answer has ended: two
  in flight, announced by ``X-Wstunnel-Pipeline-Down``). Both transports hold past the fair order
  only what the link carries in a short time (``HttpSession.written``,
  net/pipe_sizing.py). Connections are kept alive between polling requests;
  each request logs in again (an HMAC: cheap).

Requests for an unknown id, or another agent's, are answered exactly as a bad
login (the door's 401), so ids cannot be probed.
"""

from __future__ import annotations

import logging
from typing import Final, Protocol

import h11
import trio

from .. import ws
from ..config import RelayConfig
from ..framing import (
    CONTENT_TYPE,
    DOWN_PIPELINE_HEADER,
    PIPELINE_HEADER,
    POLL_HOLD_TIMEOUT,
    POLLING,
    SEQUENCE_HEADER,
    SESSION_HEADER,
    STREAMING,
    chunked,
)
from ..net.byte_pipe import write_parts
from ..net.resumption import NewCarrier
from ..net.tls_stream import TLSSocketStream
from ..protocol import TunnelProtocol
from .door import Accepted, Answer, Identity, Seat, Visitor, http_transport, server_handshake
from .http_sessions import (
    GETS_IN_FLIGHT,
    MAX_REQUESTS_IN_PROGRESS,
    POSTS_IN_FLIGHT,
    SESSION_IDLE_TIMEOUT,
    Buffer,
    HttpSession,
    HttpSessions,
)
from .resume import Admission, Held, HeldSessions
from .upgrade import HttpReader, HttpRequest, client_gave_up, send_refusal

__all__ = ["HttpFront"]

log = logging.getLogger("wstunnel.relay")

#: The largest polling POST body: the agent sends at most 1,000,000 bytes (under
#: nginx's default client_max_body_size). A body is fed as it arrives: a stalled POST
#: holds one read of it (MAX_REQUESTS_IN_PROGRESS of them per session).
MAX_POST_SIZE: Final = 1024 * 1024
#: The largest body read and dropped where none is expected (an opening POST, a GET).
MAX_UNUSED_BODY_SIZE: Final = 64 * 1024
#: The largest polling GET answer.
MAX_BATCH_SIZE: Final = 4 * 1024 * 1024
#: A kept-alive connection with no new request for this long is closed.
KEEPALIVE_TIMEOUT: Final = 75.0
#: After a session ends, how long its last bytes (the close) wait for a GET.
LINGER_TIMEOUT: Final = 5.0
_NO_STORE: Final = [("Cache-Control", "no-store"), ("Content-Type", CONTENT_TYPE)]


class _Host(Protocol):
    """What the front needs from the relay (relay.py)."""

    async def login(self, handshake: ws.ServerHandshake,
                    request: ws.RequestReceived | ws.HandshakeFailed,
                    visitor: Visitor, seat: Seat) -> Answer | Accepted: ...
    def start_framed_session(self, *, resumable: bool = False) -> TunnelProtocol: ...
    def refuse_session(self, handshake: ws.ServerHandshake, accepted: Accepted,
                       problem: str) -> Answer: ...
    async def serve_session(self, stream: trio.abc.Stream, protocol: TunnelProtocol,
                            identity: Identity, peer: str, held: Held | None = None, *,
                            seat: Seat) -> None: ...
    async def admit_resume(self, request: ws.RequestReceived,
                           accepted: Accepted) -> Admission: ...
    def refuse_new_session(self, handshake: ws.ServerHandshake, request: ws.RequestReceived,
                           accepted: Accepted, admission: Admission) -> Answer | None: ...
    @property
    def held(self) -> HeldSessions: ...
    @property
    def config(self) -> RelayConfig: ...


class HttpFront:
    """Serves the HTTP-transport requests of one relay."""

    def __init__(self, host: _Host) -> None:
        self.host = host
        self.sessions = HttpSessions()

    async def serve(self, first: HttpRequest, accepted: Accepted, visitor: Visitor) -> None:
        """This request and the ones after it on the same connection (which has one seat:
        ``accepted``'s, taken by the login of an opening; the caller gives it back)."""
        seat = accepted.seat
        reader, request = first.reader, first.request
        while await self._one(reader, request, accepted):
            reader.conn.start_next_cycle()
            handshake = server_handshake()
            next_request: ws.RequestReceived | ws.HandshakeFailed | Answer | None = None
            with trio.move_on_after(KEEPALIVE_TIMEOUT):
                next_request = await _next_request(reader, handshake)
            if next_request is None:
                return
            # (any request: a front end reuses the connection for its health check too)
            outcome = next_request if isinstance(next_request, Answer) else (
                await self.host.login(handshake, next_request, visitor, seat))
            if isinstance(outcome, Answer):
                await send_refusal(reader.stream, outcome.response)
                return
            assert isinstance(next_request, ws.RequestReceived)  # (the door answers others)
            if http_transport(next_request) is None:  # a good upgrade: not on this one
                await _status(reader, 400, "a WebSocket upgrade on a connection kept alive "
                                           "for HTTP-transport requests; use a new connection")
                return
            request, accepted = next_request, outcome

    async def _one(self, reader: HttpReader, request: ws.RequestReceived,
                   accepted: Accepted) -> bool:
        """Serve one request; True when the connection may carry another."""
        if request.header("content-length") is not None and request.header(
                "transfer-encoding") is not None:  # (RFC 9112 6.3: request smuggling)
            return await _status(reader, 400, "Content-Length and Transfer-Encoding together")
        mode = http_transport(request) or ""
        session_id = request.header(SESSION_HEADER.lower())
        if session_id is None:
            if request.method != "POST":
                return await _status(reader, 405, "open a session with POST")
            await self._open(reader, request, mode, accepted)
            return False
        session = self.sessions.find(session_id.strip(), accepted.identity.name, mode)
        if session is None:
            answer = self.host.refuse_session(server_handshake(), accepted,
                                              f"{mode} request for an unknown session")
            await send_refusal(reader.stream, answer.response)
            return False
        if session.busy:  # (each may hold a body: memory no other limit bounds)
            return await _status(reader, 429, f"this session has {MAX_REQUESTS_IN_PROGRESS} "
                                              f"requests in progress already")
        keep_alive = False  # (a request cut short when its session ended: close)
        with session.serving():
            keep_alive = await self._serve(reader, request, session)
        return keep_alive

    async def _serve(self, reader: HttpReader, request: ws.RequestReceived,
                     session: HttpSession) -> bool:
        if request.method not in ("GET", "POST"):
            return await _status(reader, 405, "GET or POST")
        if session.mode == STREAMING:
            if request.method == "GET":
                if session.streaming_down:  # (a second one would take half the bytes)
                    return await _status(reader, 409, "this session's streaming GET is "
                                                      "already open")
                session.streaming_down = True
                try:
                    await _stream_down(reader, session)
                finally:
                    session.streaming_down = False
                return False
            return await _stream_up(reader, session)
        sequence = _sequence(request)
        if sequence is None:
            return await _status(reader, 400, f"{SEQUENCE_HEADER} missing or not a number")
        if request.method == "GET":
            return await _poll_down(reader, session, sequence)
        return await _poll_up(reader, request, session, sequence)

    # -- opening --------------------------------------------------------------------

    async def _open(self, reader: HttpReader, request: ws.RequestReceived, mode: str,
                    accepted: Accepted) -> None:
        """Answer with a new session's id, then run the session in this task (or, for a
        resume, carry a held session's records until it moves on: resume.py). Its body
        (none, normally) must come within handshake_timeout: a new session's place among
        its agent's is taken already. Nothing, when the client gave up meanwhile
        (``client_gave_up``)."""
        drained = False
        with trio.move_on_after(self.host.config.handshake_timeout):
            drained = await _drain_body(reader)
        if not drained or client_gave_up(reader.stream, accepted.peer):
            return
        admission = await self.host.admit_resume(request, accepted)
        if admission.refused is not None:  # not this agent's: a bad login's answer
            answer = self.host.refuse_session(server_handshake(), accepted, admission.refused)
            await send_refusal(reader.stream, answer.response)
            return
        if admission.resumes is None:  # (a resume that gets a new session counts as one)
            refusal = self.host.refuse_new_session(server_handshake(), request, accepted,
                                                   admission)
            if refusal is not None:
                await send_refusal(reader.stream, refusal.response)
                return
        session = self.sessions.create(accepted.identity.name, mode)
        try:  # (the answer may fail to send: the client is gone, nothing may stay behind)
            await self._start(reader, session, accepted, admission)
        finally:
            session.break_("session ended")
            self.sessions.remove(session)
            session.end_requests(LINGER_TIMEOUT)
            if admission.held is not None:  # (serve_session drops it too; a second drop is none)
                self.host.held.drop(admission.held)

    async def _start(self, reader: HttpReader, session: HttpSession, accepted: Accepted,
                     admission: Admission) -> None:
        """The opening's answer, then the session (or a resumed one's carrier) until
        it ends; ``_open`` removes it whichever way this ends."""
        session.tls = isinstance(reader.stream, TLSSocketStream)  # (a TLS listener's requests)
        protocol = None
        if admission.resumes is None:
            protocol = self.host.start_framed_session(resumable=admission.held is not None)
        pipeline = [(PIPELINE_HEADER, str(POSTS_IN_FLIGHT)),
                    (DOWN_PIPELINE_HEADER, str(GETS_IN_FLIGHT))] if session.mode == POLLING else []
        await reader.send(h11.Response(status_code=200, headers=[
            (SESSION_HEADER, session.id), ("Content-Length", "0"), ("Connection", "close"),
            *pipeline, *admission.headers, *_NO_STORE]), h11.EndOfMessage())
        await trio.aclose_forcefully(reader.stream)
        log.info("%s: %s session for agent %s %s", accepted.peer, session.mode,
                 accepted.identity.name, "opened" if protocol is not None else "resumed")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_expire_when_idle, session)
            if admission.resumes is not None:
                await self.host.held.deliver(admission.resumes, NewCarrier(
                    session, b"", admission.peer_received, framed=True)).wait()
            else:
                assert protocol is not None
                await self.host.serve_session(session, protocol, accepted.identity,
                                              f"{accepted.peer} ({session.mode})",
                                              admission.held, seat=accepted.seat)
            nursery.cancel_scope.cancel()
        with trio.move_on_after(LINGER_TIMEOUT):  # the last bytes: the close
            await session.wait_drained()


# -- streaming ----------------------------------------------------------------------------

async def _stream_down(reader: HttpReader, session: HttpSession) -> None:
    """A chunked 200 whose body is the session's downstream, until it ends: one chunk
    per batch, written by hand (h11 would make one per part); the connection closes
    after it."""
    stream = reader.stream
    # (to an HTTP/1.0 client, h11 ends the body by closing instead: no chunks)
    framed = reader.conn.their_http_version != b"1.0"
    await reader.send(h11.Response(status_code=200, headers=[
        ("Transfer-Encoding", "chunked"), ("X-Accel-Buffering", "no"), *_NO_STORE]))
    try:
        while True:
            parts = await session.take(session.outbound_limit)
            if not parts:
                break
            await _timed_write(session, stream, parts, framed)
        if framed:
            await stream.send_all(b"0\r\n\r\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        session.break_(f"the streaming response's connection was lost: {exc}")


def _passed(conn: h11.Connection, parts: list[Buffer]) -> list[Buffer]:
    """A Content-Length body's parts through h11 (which counts them), not copied."""
    pieces: list[Buffer] = []
    for part in parts:
        data = h11.Data(data=part)  # type: ignore[arg-type]  # (passed through, not copied)
        pieces.extend(conn.send_with_data_passthrough(data) or ())
    return pieces


async def _stream_up(reader: HttpReader, session: HttpSession) -> bool:
    """Feed a chunked request body to the session as it arrives. The agent ends one
    after about a megabyte (front ends limit request bodies: nginx to 1 MiB unless
    told otherwise) and sends the next once this one is answered: True, keep alive."""
    try:
        while True:
            event = await reader.next_event()
            if isinstance(event, h11.Data):
                if not await session.feed(event.data):
                    return False
            elif isinstance(event, h11.EndOfMessage):
                return await _reply(reader, [])
            else:
                session.break_("the streaming request's connection closed")
                return False
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
            h11.RemoteProtocolError) as exc:
        session.break_(f"the streaming request's connection was lost: {exc}")
        return False


# -- polling ------------------------------------------------------------------------------

async def _poll_up(reader: HttpReader, request: ws.RequestReceived, session: HttpSession,
                   sequence: int) -> bool:
    """One upstream batch: fed as it arrives, once, in order (``poll_feed_part``); a
    retry of one taken is acknowledged. The one after the next (the agent has two in
    flight) waits, its body unread, until the next is whole."""
    length = request.header("content-length")
    if length is None or not length.strip().isdigit() or int(length) > MAX_POST_SIZE:
        return await _status(reader, 413, f"a polling body needs a Content-Length up to "
                                          f"{MAX_POST_SIZE}")
    if not await session.poll_turn(sequence) or session.ended:
        return await _unfed(reader, session, None)
    offset = 0
    while not isinstance(event := await _body_event(reader), h11.EndOfMessage):
        if event is None:
            return False  # (no answer: the agent sends the body again, what is fed is skipped)
        data = bytes(event.data)
        fed = await session.poll_feed_part(sequence, offset, data)
        if not fed:
            return await _unfed(reader, session, fed)
        offset += len(data)
    await session.poll_fed(sequence)
    return await _reply(reader, [])


async def _unfed(reader: HttpReader, session: HttpSession, fed: bool | None) -> bool:
    """The answer to a body not taken: 410 once the session has ended, else 409 (a
    number past what may be in flight)."""
    if session.ended or fed is False:
        return await _status(reader, 410, "the session has ended")
    return await _status(reader, 409, f"expected {SEQUENCE_HEADER} {session.up_sequence} "
                                      f"(or the one after it)")


async def _body_event(reader: HttpReader) -> h11.Data | h11.EndOfMessage | None:
    """The next piece of a request's body; None when the connection is done (closed,
    garbled)."""
    try:
        event = await reader.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Data | h11.EndOfMessage) else None


async def _poll_down(reader: HttpReader, session: HttpSession, sequence: int) -> bool:
    """The next downstream batch (held while there is none), or the last one again."""
    if not await _drain_body(reader):  # (the GET's end: unread, h11 would not keep alive)
        return False
    batch = await session.poll_batch(sequence, session.outbound_limit, POLL_HOLD_TIMEOUT)
    if batch is None:
        return await _status(reader, 409, f"expected {SEQUENCE_HEADER} "
                                          f"{session.down_sequence}")
    if not batch and session.poll_over(sequence):
        return await _status(reader, 410, "the session has ended")
    if batch is not session.last_batch:
        return await _reply(reader, batch)  # (a repeat)
    try:
        if reader.conn.their_http_version == b"1.0":
            return await _reply(reader, batch)  # (an HTTP/1.0 client: no chunks)
        return await _reply_growing(reader, session, batch)
    finally:
        session.poll_done(batch)  # (whole or broken: a GET held for the next may go on)


async def _reply_growing(reader: HttpReader, session: HttpSession,
                         batch: list[Buffer]) -> bool:
    """200 with a chunked body: ``batch``, then more of the session's bytes as the
    connection takes them (``poll_more``), up to MAX_BATCH_SIZE, ending when there
    are none. A fixed-length answer has to take all its bytes before it starts:
    they leave the fair order and an interactive record queued after them waits
    for the whole answer to cross the link (seconds on a slow one); taken as the
    link drains, they wait no longer than over a WebSocket, and a bulk download
    still gets answers as large as before. True: keep alive."""
    stream = reader.stream
    try:
        await reader.send(h11.Response(status_code=200, headers=[
            ("Transfer-Encoding", "chunked"), *_NO_STORE]))
        sent, parts = 0, batch[:]
        while parts:
            await _timed_write(session, stream, parts, True)
            sent += sum(map(len, parts))
            parts = session.poll_more(batch, min(session.outbound_limit, MAX_BATCH_SIZE - sent))
        await reader.send(h11.EndOfMessage())  # (the chunks went by hand, h11 ends the body)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return False  # (the agent asks again: the retry gets this batch, as it has grown)
    conn = reader.conn
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _reply(reader: HttpReader, body: list[Buffer]) -> bool:
    """200 with ``body`` (a Content-Length, the parts not copied); True: keep alive."""
    conn = reader.conn
    size = sum(map(len, body))
    pieces: list[Buffer] = [conn.send(h11.Response(status_code=200, headers=[
        ("Content-Length", str(size)), *_NO_STORE])) or b""]
    pieces.extend(_passed(conn, body))
    pieces.append(conn.send(h11.EndOfMessage()) or b"")
    await write_parts(reader.stream, pieces)
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


# -- small pieces -------------------------------------------------------------------------

async def _timed_write(session: HttpSession, stream: trio.abc.Stream, parts: list[Buffer],
                       framed: bool) -> None:
    """Write ``parts`` (one chunk when ``framed``); how long the link took to take them
    adapts what the session holds past the fair order (``HttpSession.written``)."""
    started = trio.current_time()
    await write_parts(stream, chunked(parts) if framed else parts)
    session.written(sum(map(len, parts)), trio.current_time() - started)


async def _status(reader: HttpReader, status: int, text: str) -> bool:
    """A short text answer; the connection closes after it."""
    await send_refusal(reader.stream, server_handshake().reject(status, text))
    return False


async def _read_body(reader: HttpReader, limit: int = MAX_POST_SIZE) -> bytes | None:
    """The request's body; None when the connection is done: closed, garbled, or a
    body past ``limit`` (a chunked one, which no Content-Length bounds: answered 413)."""
    body = bytearray()
    try:
        while True:
            event = await reader.next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    await _status(reader, 413, f"a request body here is at most {limit} bytes")
                    return None
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                return None
    except h11.RemoteProtocolError:
        return None


async def _next_request(reader: HttpReader, handshake: ws.ServerHandshake
                        ) -> ws.RequestReceived | ws.HandshakeFailed | Answer | None:
    """The next request on a kept-alive connection; the answer to one that is not
    HTTP (400, or 431 for a head too large, as on a fresh connection); None when the
    client closed the connection."""
    try:
        return await reader.next_request(handshake)
    except h11.RemoteProtocolError as exc:
        status = 431 if exc.error_status_hint == 431 else 400
        return Answer(status, server_handshake().reject(status, "malformed HTTP request"))


async def _drain_body(reader: HttpReader) -> bool:
    """Read a body the request should not have (an opening POST's, a GET's)."""
    return await _read_body(reader, MAX_UNUSED_BODY_SIZE) is not None


def _sequence(request: ws.RequestReceived) -> int | None:
    value = (request.header(SEQUENCE_HEADER.lower()) or "").strip()
    # (isascii: "²" is a digit to isdigit, not to int(); that would crash the relay)
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None


async def _expire_when_idle(session: HttpSession) -> None:
    """Break the session once no request has been in progress for SESSION_IDLE_TIMEOUT."""
    while not session.ended:
        await trio.sleep(SESSION_IDLE_TIMEOUT / 4)
        idle = session.idle_for(trio.current_time())
        if idle >= SESSION_IDLE_TIMEOUT:
            session.break_(f"no HTTP request for {idle:.0f} s (the agent is gone, or the "
                           f"path drops its requests)")
