"""Where a plain HTTP proxy request's body ends (``agent/request_body.py``).

What users rely on: the whole body reaches the destination, however the client's
writes cut it, and nothing after it does (a pipelined request, perhaps for another
host, with the client's proxy login); framing a proxy cannot be sure of is refused.
"""

from __future__ import annotations

import pytest

from wstunnel.agent.request_body import RequestBody, request_body

NEXT = b"GET http://other.example/ HTTP/1.1\r\nProxy-Authorization: Basic c2VjcmV0\r\n\r\n"
CHUNKED = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"


def _through(body: RequestBody, data: bytes, cut: int) -> bytes:
    """What ``body`` passes of ``data`` arriving in pieces of ``cut`` bytes."""
    return b"".join(body.take(data[i:i + cut]) for i in range(0, len(data), cut))


@pytest.mark.parametrize("cut", [1, 3, 7, 1000])
def test_a_content_length_body_passes_and_what_follows_it_does_not(cut: int) -> None:
    body = request_body([(b"Content-Length", b" 11 ")])
    assert _through(body, b"hello world" + NEXT, cut) == b"hello world"
    assert body.done


@pytest.mark.parametrize("cut", [1, 2, 5, 13, 1000])
def test_a_chunked_body_passes_whole_with_its_trailer_and_nothing_after(cut: int) -> None:
    body = request_body([(b"transfer-encoding", b"gzip, chunked")])
    assert not body.done
    assert _through(body, CHUNKED + NEXT, cut) == CHUNKED
    assert body.done
    assert body.take(b"more") == b""


def test_a_request_without_framing_has_no_body() -> None:
    body = request_body([(b"Accept", b"*/*")])
    assert body.done and body.take(NEXT) == b""


@pytest.mark.parametrize(("headers", "why"), [
    ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")], "both"),
    ([(b"Transfer-Encoding", b"chunked, gzip")], "must be chunked"),
    ([(b"Content-Length", b"5"), (b"Content-Length", b"6")], "unreadable"),
    ([(b"Content-Length", b"-1")], "unreadable"),
    ([(b"Content-Length", b"0x10")], "unreadable"),
])
def test_framing_a_proxy_cannot_be_sure_of_is_refused(
        headers: list[tuple[bytes, bytes]], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        request_body(headers)


def test_a_broken_chunked_body_is_an_error_not_a_guess() -> None:
    body = request_body([(b"Transfer-Encoding", b"chunked")])
    with pytest.raises(ValueError, match="broken chunked request body"):
        body.take(b"zz\r\nhello\r\n")
