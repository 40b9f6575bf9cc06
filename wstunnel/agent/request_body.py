"""Where one HTTP/1.1 request's body ends, in the bytes a proxy client sends after its head.

Why: a plain-HTTP proxy request (``GET http://host/``, socks.py) goes to its
destination with ``Connection: close``, so that connection carries that one
request. What a client sends after the body is a pipelined request, perhaps for
another host and with the client's ``Proxy-Authorization``: it must not reach
this destination. ``RequestBody`` passes the body on and keeps back the rest.

Sans-IO: bytes in, the bytes that belong to the request out. A chunked body is
framed by h11, fed a head written here, so the client's head (checked in
socks.py) is never parsed a second way.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RequestBody", "request_body"]


def request_body(headers: list[tuple[bytes, bytes]]) -> RequestBody:
    """The body framing that ``headers`` (names as sent) declare (RFC 9112 section 6).

    Raises:
        ValueError: framing a proxy must not guess at: an unreadable or conflicting
            Content-Length, a transfer coding that does not end in chunked, or both
            Transfer-Encoding and Content-Length (the shape of request smuggling).
    """
    lengths = {value.strip() for name, value in headers if name.lower() == b"content-length"}
    codings = b",".join(value for name, value in headers
                        if name.lower() == b"transfer-encoding")
    if codings:
        if lengths:
            raise ValueError("both Transfer-Encoding and Content-Length")
        if codings.split(b",")[-1].strip().lower() != b"chunked":
            raise ValueError("a request body's last transfer coding must be chunked")
        return RequestBody(None)
    if not lengths:
        return RequestBody(0)  # (a request without framing has no body)
    if len(lengths) > 1 or not all(part.isdigit() for part in lengths):
        raise ValueError(f"unreadable Content-Length {b', '.join(sorted(lengths))!r}")
    return RequestBody(int(lengths.pop()))


class RequestBody:
    """One request's body as it arrives: ``take`` each read; ``done`` once it ended."""

    def __init__(self, length: int | None) -> None:
        """``length``: the Content-Length; None: chunked."""
        self._left = length
        self._chunked: Any = None
        if length is None:
            import h11  # (only a chunked upload through -D needs it)

            self._chunked = h11.Connection(h11.SERVER)
            self._chunked.receive_data(b"POST / HTTP/1.1\r\nHost: body\r\n"
                                       b"Transfer-Encoding: chunked\r\n\r\n")
            self._chunked.next_event()  # (the Request)

    @property
    def done(self) -> bool:
        return self._left == 0

    def take(self, data: bytes) -> bytes:
        """The part of ``data`` that still belongs to the body (all of it, some, or
        nothing once ``done``).

        Raises:
            ValueError: the chunked framing is broken (where the body ends is unknown).
        """
        if self._left is None:
            return data[:len(data) - self._chunked_rest(data)]
        kept = data[:self._left]
        self._left -= len(kept)
        return kept

    def _chunked_rest(self, data: bytes) -> int:
        """How many bytes at the end of ``data`` come after the chunked body."""
        import h11

        conn = self._chunked
        conn.receive_data(data)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    return 0
                if isinstance(event, h11.EndOfMessage):
                    self._left = 0
                    return len(conn.trailing_data[0])
        except h11.RemoteProtocolError as exc:
            raise ValueError(f"broken chunked request body: {exc}") from exc
