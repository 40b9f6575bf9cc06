"""Small HTTP/1.1 helpers for the handshake: header lookup, response building.

Pure functions on already-parsed data; h11 does the parsing in ``handshake.py``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Final

from ..errors import LocalProtocolError

Headers = list[tuple[str, str]]
WEBSOCKET_VERSION: Final = "13"

_PHRASES: Final = {
    101: "Switching Protocols", 200: "OK", 204: "No Content", 301: "Moved Permanently",
    302: "Found", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Content Too Large", 421: "Misdirected Request", 426: "Upgrade Required",
    429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


def decode_headers(raw: Sequence[tuple[bytes, bytes]]) -> Headers:
    """h11 header pairs (names already lower-case) as latin-1 strings."""
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]


def get_header(headers: Headers, name: str) -> str | None:
    """All values of ``name`` joined with ", " (RFC 9110 5.3), or None."""
    values = [value for key, value in headers if key == name]
    return ", ".join(values) if values else None


def tokens(value: str | None) -> list[str]:
    """Split a comma-separated header value into trimmed, non-empty tokens."""
    if value is None:
        return []
    return [token.strip() for token in value.split(",") if token.strip()]


def has_token(value: str | None, token: str) -> bool:
    return token in (t.lower() for t in tokens(value))


def check_header_text(headers: Sequence[tuple[str, str]]) -> None:
    """Refuse caller-supplied headers that would split the HTTP message."""
    for name, value in headers:
        if any(c in name + value for c in "\r\n\0") or not name or ":" in name:
            raise LocalProtocolError(f"invalid header {name!r}")


def one_line(data: bytes, limit: int = 200) -> str:
    """The start of a body as one printable line, for messages to a person."""
    text = " ".join(data.decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def phrase(status: int) -> str:
    """The standard reason phrase (RFC 9110 15) for the statuses we send."""
    return _PHRASES.get(status, "Error" if status >= 400 else "OK")


def response(status: int, headers: Sequence[tuple[str, str]], body: bytes = b"") -> bytes:
    """Serialize a complete HTTP/1.1 response."""
    lines = [f"HTTP/1.1 {status} {phrase(status)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def text_response(status: int, text: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A response with a one-line text body that closes the connection."""
    body = (text.replace("\r", " ").replace("\n", " ") + "\n").encode("utf-8") if text else b""
    base = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
    ]
    if not any(name.lower() == "connection" for name, _ in headers):
        base.append(("Connection", "close"))
    return response(status, [*base, *headers], body)


def upgrade_problem(method: str, http_version: bytes, headers: Headers) -> str | None:
    """What makes this upgrade request invalid (RFC 6455 4.2.1), or None."""
    if method != "GET":
        return f"a WebSocket upgrade must use GET, not {method}"
    if http_version != b"1.1":
        return "a WebSocket upgrade needs HTTP/1.1"
    if not has_token(get_header(headers, "connection"), "upgrade"):
        return "Connection header lacks the upgrade token"
    version = get_header(headers, "sec-websocket-version")
    if version is None or version.strip() != WEBSOCKET_VERSION:
        return f"unsupported Sec-WebSocket-Version {version!r}; this server speaks 13"
    key = get_header(headers, "sec-websocket-key")
    if key is None:
        return "missing Sec-WebSocket-Key"
    try:
        nonce = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        return "Sec-WebSocket-Key is not 16 bytes in base64"
    return None
