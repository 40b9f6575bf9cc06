"""TLS for the tunnel's WebSocket: one system call per read or write, not per record.

``trio.SSLStream`` is correct but slow here: every 16 KiB record crosses its
Python retry machinery and locks (wss:// moved half of what ws:// did). An
``ssl.SSLSocket`` on the raw descriptor is lean, but OpenSSL then writes each
record with its own ``write()`` and reads each with two ``read()`` calls,
which on loopback TCP cost more than the cipher (measured: 1.35 s of CPU per
GiB through a TLS pair, against 1.03 s here). So this stream keeps OpenSSL on
memory BIOs and does the socket I/O itself: one ``send`` of all the records a
``send_all`` produced, one ``recv_into`` of up to 256 KiB per refill, and
``receive_some`` decrypts every complete record already buffered.

Reads and writes may run in two tasks at once (the transport's reader and
writer). TLS output made while reading (a TLS 1.3 key update answer) is queued
in order with everything else and written by whichever side gets there first;
all writes to the socket happen between awaits, so they never interleave.

Like ``trio.SSLStream(https_compatible=True)``, closing sends no close_notify
and a missing one at EOF is not an error: the WebSocket close handshake is
what says "done" in this protocol. ``trio.lowlevel`` is used for socket
readiness only (wait_readable, wait_writable, notify_closing, checkpoint).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any, Final, cast

import trio

__all__ = ["TLSSocketStream", "start_tls"]

#: Bytes fetched from the socket per refill (up to 16 records).
RECEIVE_SIZE: Final = 256 * 1024
_DEFAULT_MAX_BYTES: Final = 64 * 1024
_EOF_ERRORS: Final = (ssl.SSLZeroReturnError, ssl.SSLEOFError)
_DRAIN_READS: Final = 16  # at most 4 MiB read away when closing


async def start_tls(
    tcp: trio.SocketStream,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
) -> TLSSocketStream:
    """Take over ``tcp``'s socket (``tcp`` is unusable afterwards) and shake hands.

    Raises ``trio.BrokenResourceError`` with the ``ssl.SSLError`` or ``OSError``
    as its cause, as ``trio.SSLStream.do_handshake`` does; the socket is then closed.
    """
    sock = socket.socket(fileno=tcp.socket.detach())
    sock.setblocking(False)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=server_side,
                           server_hostname=server_hostname)
    stream = TLSSocketStream(sock, tls, incoming, outgoing)
    try:
        await stream._handshake()
    except BaseException:
        stream.close()
        raise
    return stream


class TLSSocketStream(trio.abc.Stream):
    """A trio Stream: ``ssl.SSLObject`` on memory BIOs over a non-blocking socket."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject,
                 incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self._sock = sock
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        #: TLS bytes taken from _outgoing that the kernel did not take yet.
        self._unsent: bytes | memoryview = b""
        self._chunk = bytearray(RECEIVE_SIZE)
        self._closed = False
        self._receiving = False
        self._sending = False

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._tls.getpeercert(binary_form)

    # -- socket side ------------------------------------------------------------

    def _flush_nowait(self) -> bool:
        """Write queued TLS bytes without waiting; True once none are left."""
        data = self._unsent
        if self._outgoing.pending:
            data = bytes(data) + self._outgoing.read() if data else self._outgoing.read()
        if not data:
            return True
        sent = 0
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise self._broken(exc) from exc
        self._unsent = memoryview(data)[sent:] if sent < len(data) else b""
        return not self._unsent

    async def _flush(self) -> None:
        while not self._flush_nowait():
            await trio.lowlevel.wait_writable(self._sock)

    async def _fill(self) -> None:
        """Move what the socket has (waiting for something) into the TLS input."""
        view = memoryview(self._chunk)
        try:
            while True:
                try:
                    got = self._sock.recv_into(view)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._sock)
                    continue
                except OSError as exc:
                    raise self._broken(exc) from exc
                if got:
                    self._incoming.write(view[:got])
                else:
                    self._incoming.write_eof()
                return
        finally:
            view.release()

    # -- TLS side -----------------------------------------------------------------

    async def _handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except (ssl.SSLError, OSError) as exc:
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
        await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Up to ``max_bytes``: every record already decryptable, not just one."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        self._check_open()
        size = _DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        self._receiving = True
        try:
            while filled < size:
                try:
                    got = cast(int, self._tls.read(size - filled, view[filled:]))
                except ssl.SSLWantReadError:
                    if filled:
                        break
                    await self._fill()
                    continue
                except _EOF_ERRORS:
                    break
                except ssl.SSLError as exc:
                    raise self._broken(exc) from exc
                if not got:
                    break
                filled += got
            if self._outgoing.pending:  # e.g. a key update answer
                # A failure to write is the sending side's to report; the bytes
                # read are still good.
                with contextlib.suppress(trio.BrokenResourceError):
                    self._flush_nowait()
        finally:
            self._receiving = False
            view.release()
        await trio.lowlevel.checkpoint()  # (a refill may not have waited)
        del buffer[filled:]
        return buffer

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        self._check_open()
        self._sending = True
        try:
            if data:
                try:
                    self._tls.write(data)
                except ssl.SSLError as exc:
                    raise self._broken(exc) from exc
            if self._flush_nowait():
                await trio.lowlevel.checkpoint()
            else:
                await self._flush()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending")
        self._check_open()
        self._sending = True
        try:
            if not self._flush_nowait():
                await self._flush()
            await trio.lowlevel.wait_writable(self._sock)
        finally:
            self._sending = False

    # -- closing --------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._discard_unread()
            self._sock.close()

    def _discard_unread(self) -> None:
        """Read what already arrived (e.g. TLS 1.3 session tickets nobody asked for):
        closing a socket with unread bytes sends RST, and an RST can destroy our
        last bytes before the peer has read them."""
        try:
            for _ in range(_DRAIN_READS):
                if not self._sock.recv_into(self._chunk):
                    return
        except OSError:  # BlockingIOError: nothing more
            return

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream was closed")

    def _broken(self, exc: BaseException) -> Exception:
        if self._closed:
            return trio.ClosedResourceError("the TLS stream was closed")
        return trio.BrokenResourceError(f"TLS connection failed: {exc}")
