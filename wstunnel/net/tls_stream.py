"""TLS straight on the socket: OpenSSL reads and writes the file descriptor itself.

``trio.SSLStream`` runs TLS through memory BIOs: every 16 KiB record crosses
Python twice (BIO in, plaintext out) and takes a trip through its locks and
retry loop, which cost wss:// half its throughput against ws:// (agent and
relay spent ~4.3 s more CPU per GiB, where AES-GCM itself needs ~0.3 s). Here a
non-blocking ``ssl.SSLSocket`` does the I/O in C; Python only waits for
readiness and drains several records per call. OpenSSL reads ahead
(openssl_tuning.py), so it may hold whole records the socket no longer shows:
``receive_some`` therefore always tries to read before it waits.

Like ``trio.SSLStream(https_compatible=True)``, closing sends no close_notify
and a missing one on EOF is not an error: the WebSocket close handshake is what
says "done" in this protocol. ``trio.lowlevel`` serves for socket readiness
only (docs/ARCHITECTURE.md). Tried and dropped: OpenSSL on memory BIOs with one
``send``/``recv`` per 256 KiB (fewer system calls, but no less CPU per GiB in
the tunnel; docs/PERFORMANCE.md).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import trio

from ..ws import new_buffer
from .plain_stream import Buffer, PlainSocketStream

__all__ = ["TLSSocketStream", "start_tls"]

#: Rare cases where a read must wait to write or the other way round: the
#: other direction's task owns that readiness (trio allows one waiter each).
_POLL = 0.005
#: The largest TLS record's payload.
TLS_RECORD_SIZE: Final = 16 * 1024
#: Writes at least this big are corked (several TLS records).
CORK_MIN_SIZE: Final = 32 * 1024
#: A read's first buffer. It doubles while reads fill it (up to what the caller
#: asks for) and halves when they come back under a quarter full, so a 64-byte
#: message does not pay for zeroing a 1 MiB buffer.
MIN_RECEIVE_BUFFER: Final = 64 * 1024
_TCP_CORK: Final[int | None] = getattr(socket, "TCP_CORK", None)
#: Linux: getsockopt TCP_INFO, whose first byte is the TCP state; TCP_CLOSE is 7.
_TCP_INFO: Final = getattr(socket, "TCP_INFO", 11)
_TCP_STATE_CLOSE: Final = 7


async def start_tls(
    tcp: trio.SocketStream,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
) -> TLSSocketStream:
    """Take over ``tcp``'s socket (``tcp`` is unusable afterwards) and shake hands.

    Raises ``trio.BrokenResourceError`` with the ``ssl.SSLError`` or ``OSError``
    as its cause, as ``trio.SSLStream.do_handshake`` does.
    """
    raw = socket.socket(fileno=tcp.socket.detach())
    raw.setblocking(False)
    sock = context.wrap_socket(
        raw, server_side=server_side, server_hostname=server_hostname,
        do_handshake_on_connect=False, suppress_ragged_eofs=True,
    )
    stream = TLSSocketStream(sock)
    try:
        await stream._handshake()
    except BaseException:
        stream.close()
        raise
    return stream


class TLSSocketStream(PlainSocketStream):
    """A trio Stream over a non-blocking ``ssl.SSLSocket`` (closing as the plain one)."""

    _what = "TLS connection"
    _sock: ssl.SSLSocket

    def __init__(self, sock: ssl.SSLSocket) -> None:
        super().__init__(sock)
        self._cork = _TCP_CORK is not None
        self._buffer_size = MIN_RECEIVE_BUFFER
        #: At the first ragged EOF: whether it was a reset (``_peer_reset``).
        self._reset: bool | None = None
        # A call per 16 KiB record: straight to the C object, not through the
        # SSLSocket methods' two Python frames of checks (wss:// upload CPU
        # -5 %, docs/PERFORMANCE.md). Plain SSLSocket calls if it is missing.
        sslobj = getattr(sock, "_sslobj", None)
        self._ssl_read: Callable[[int, memoryview], int] = getattr(
            sslobj, "read", lambda size, view: sock.recv_into(view, size))
        self._ssl_write: Callable[[Buffer], int] = getattr(sslobj, "write", sock.send)

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._sock.getpeercert(binary_form)

    async def _handshake(self) -> None:
        sock = self._sock
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(sock)
            except (ssl.SSLError, OSError) as exc:
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Up to ``max_bytes``: every record already decryptable, not just one."""
        self._check_open()
        wanted = max_bytes if max_bytes is not None else 65536
        if wanted < 1:
            raise ValueError("max_bytes must be >= 1")
        size = min(wanted, self._buffer_size)
        waited, self._waited = self._waited, False
        while True:
            buffer = new_buffer(size)  # not zeroed: only the bytes read are kept
            view = memoryview(buffer)
            try:
                filled = await self._fill(view, wait=False, waited=waited)
            finally:
                view.release()
            if filled is not None:
                break
            # Nothing to decrypt yet: wait without the buffer, so that an idle
            # session does not hold 64 KiB of it (1,000 idle wss:// agents on a relay).
            del buffer
            waited = True
            await trio.lowlevel.wait_readable(self._sock)
        if filled == size and size < wanted:
            self._buffer_size = size * 2
        elif filled < size // 4 and size > MIN_RECEIVE_BUFFER:
            self._buffer_size = size // 2
        del buffer[filled:]
        return buffer

    async def receive_into(self, buffer: memoryview) -> int:
        """Like ``receive_some``, into ``buffer``: bytes read (0 at EOF)."""
        self._check_open()
        if not len(buffer):
            raise ValueError("the buffer is empty")
        waited, self._waited = self._waited, False
        filled = await self._fill(buffer, waited=waited)
        assert filled is not None  # (it waits)
        return filled

    async def _fill(self, view: memoryview, *, wait: bool = True,
                    waited: bool = False) -> int | None:
        """Decrypt into ``view`` until it is full or no whole record is left;
        wait only while nothing at all has come, or (``wait`` false) return None
        then. ``waited``: the caller has just waited (no checkpoint is due)."""
        sock = self._sock
        read = self._ssl_read
        size = len(view)
        filled = 0
        self._drained = False  # (True below: OpenSSL found no whole record left)
        try:
            while filled < size:
                try:
                    got = read(size - filled, view[filled:])
                except ssl.SSLEOFError as exc:
                    if self._reset is None:  # (decided once: later reads say otherwise)
                        self._reset = _peer_reset(sock, exc)
                    if filled or not self._reset:
                        break  # EOF without close_notify: fine here (module docstring)
                    reset = errno.ECONNRESET
                    raise ConnectionResetError(reset, os.strerror(reset)) from exc
                except ssl.SSLWantReadError:
                    if filled:
                        self._drained = True
                        break
                    if not wait:
                        return None
                    waited = True
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except ssl.SSLWantWriteError:
                    # A TLS 1.3 key update answer did not fit; the writer task
                    # owns writability, so poll instead of waiting.
                    waited = True
                    await trio.sleep(_POLL)
                    continue
                if not got:
                    break  # EOF (with or without close_notify)
                filled += got
        except (ssl.SSLError, OSError) as exc:
            raise self._broken(exc) from exc
        if not waited:
            await trio.lowlevel.checkpoint()
        return filled

    async def send_parts(self, parts: Sequence[Buffer], *, checkpoint: bool = True) -> None:
        """``send_all`` (inherited) of the parts joined; only what fills one TLS record around
        a small part (a frame header) is copied (``_records``). ``checkpoint``: as for
        the plain stream (a wait for the socket is one)."""
        self._check_open()
        sock = self._sock
        # OpenSSL writes each 16 KiB record with its own write(): corked, the
        # kernel sends them as full segments (loopback: 64 KiB), a quarter of
        # the transmits; CPU per GiB through a TLS pair -15 % (docs/PERFORMANCE.md).
        cork = self._cork and sum(map(len, parts)) >= CORK_MIN_SIZE
        write = self._ssl_write
        try:
            if cork:
                self._set_cork(True)
            for view in _records(parts):
                # SSL_write without partial writes: after WANT_WRITE the same
                # buffer goes again, and OpenSSL continues where it stopped.
                while view:
                    try:
                        sent = write(view)
                    except ssl.SSLWantWriteError:
                        if cork:
                            self._set_cork(False)  # what is queued goes out while we wait
                        await trio.lowlevel.wait_writable(sock)
                        if cork:
                            self._set_cork(True)
                        continue
                    except ssl.SSLWantReadError:
                        # Only a renegotiation does this (our contexts refuse them).
                        await trio.sleep(_POLL)
                        continue
                    view = view[sent:]
        except (ssl.SSLError, OSError) as exc:
            raise self._broken(exc) from exc
        finally:
            if cork and not self._closed:
                self._set_cork(False)
        if checkpoint:
            await trio.lowlevel.checkpoint()

    def send_nowait(self, parts: Sequence[Buffer]) -> list[Buffer]:
        """What OpenSSL took of ``parts`` now: all of it, or nothing, since SSL_write
        without partial writes either writes every byte or, on WANT_WRITE, wants the
        same bytes again, which the caller (the session's writer, net/transport.py)
        then sends first with ``send_parts``. Never waits; no checkpoint."""
        self._check_open()
        data = b"".join(parts)
        try:
            self._ssl_write(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return [data]
        except (ssl.SSLError, OSError) as exc:
            raise self._broken(exc) from exc
        return []

    def _set_cork(self, on: bool) -> None:
        try:
            if _TCP_CORK is not None:
                self._sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, on)
        except OSError:
            self._cork = False  # not TCP, or not Linux: write uncorked from now on


def _peer_reset(sock: ssl.SSLSocket, exc: ssl.SSLEOFError) -> bool:
    """Whether the first ragged EOF was the peer's reset rather than its FIN.

    Python reports both as SSLEOFError and loses the errno (SSL_read_ex), yet a
    reset must read as a failure, as on ws:// ("connection lost: ... reset by
    peer", not "closed with code 1006"). OpenSSL 3 names a FIN
    (UNEXPECTED_EOF_WHILE_READING) and answers it with an alert, which the
    closed peer answers with RST; a reset it does not name. OpenSSL 1.1 names
    neither but sends no alert. So: unnamed, and the TCP state is CLOSE (a
    reset; a FIN leaves CLOSE_WAIT)."""
    if exc.reason is not None:
        return False
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
    except (OSError, TypeError):  # (not TCP, or no TCP_INFO: an EOF, as before)
        return False
    return state[0] == _TCP_STATE_CLOSE


def _records(parts: Sequence[Buffer]) -> Iterator[memoryview]:
    """The buffers to hand SSL_write for ``parts``: big parts as they are, small
    ones joined with what follows up to a full record, so no record carries
    just a frame header and at most one record's worth is copied per part."""
    small = bytearray()
    for part in parts:
        view = memoryview(part)
        if len(view) < TLS_RECORD_SIZE:
            small += view
            if len(small) >= TLS_RECORD_SIZE:
                yield memoryview(small)
                small = bytearray()
            continue
        if small:
            cut = TLS_RECORD_SIZE - len(small)
            small += view[:cut]
            yield memoryview(small)
            small = bytearray()
            view = view[cut:]
        yield view
    if small:
        yield memoryview(small)
