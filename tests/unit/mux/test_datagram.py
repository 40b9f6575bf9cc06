"""Datagrams in a UDP channel's byte stream (docs/PROTOCOL.md 4.2): boundaries
survive any cut of the stream, the limit is 65,507 bytes both ways."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wstunnel.errors import LocalProtocolError
from wstunnel.mux.datagram import MAX_DATAGRAM_SIZE, DatagramDecoder, frame_datagram
from wstunnel.mux.wire import ErrorCode

datagrams = st.lists(st.binary(max_size=300), max_size=20)


def test_frame_is_a_two_byte_length_then_the_payload() -> None:
    """The layout another implementation follows: u16 big-endian length, payload."""
    assert frame_datagram(b"abc") == b"\x00\x03abc"
    assert frame_datagram(b"") == b"\x00\x00"


def test_the_largest_datagram_is_65507_bytes() -> None:
    """65,507 bytes frame and decode; one more is our own error (the caller drops it)."""
    framed = frame_datagram(b"x" * MAX_DATAGRAM_SIZE)
    assert DatagramDecoder().receive_data(framed) == [b"x" * MAX_DATAGRAM_SIZE]
    with pytest.raises(LocalProtocolError):
        frame_datagram(b"x" * (MAX_DATAGRAM_SIZE + 1))


def test_a_length_over_the_limit_from_the_peer_is_a_failure_not_an_exception() -> None:
    """A peer announcing 65,508 bytes: the datagrams before it are delivered, then the
    decoder is terminal with a PROTOCOL_ERROR failure (the channel is reset)."""
    decoder = DatagramDecoder()
    stream = frame_datagram(b"ok") + (MAX_DATAGRAM_SIZE + 1).to_bytes(2, "big") + b"zz"
    assert decoder.receive_data(stream) == [b"ok"]
    assert decoder.failure is not None and decoder.failure.code == ErrorCode.PROTOCOL_ERROR
    assert decoder.receive_data(frame_datagram(b"later")) == []


@given(datagrams, st.data())
def test_boundaries_survive_any_cut_of_the_stream(payloads: list[bytes],
                                                  data: st.DataObject) -> None:
    """However the stream is cut into DATA records, the same datagrams come out."""
    stream = b"".join(frame_datagram(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = DatagramDecoder()
    out: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.receive_data(stream[start:end])
    assert out == payloads
    assert decoder.pending_size == 0


@given(datagrams)
def test_one_byte_at_a_time(payloads: list[bytes]) -> None:
    """Fed one byte at a time, the decoder yields each datagram once it is whole."""
    decoder = DatagramDecoder()
    out: list[bytes] = []
    for byte in b"".join(frame_datagram(p) for p in payloads):
        out += decoder.receive_data(bytes([byte]))
    assert out == payloads


@given(st.binary(max_size=2000))
def test_garbage_yields_datagrams_or_a_clean_failure(garbage: bytes) -> None:
    """Random bytes never raise: datagrams, pending bytes, or a failure."""
    decoder = DatagramDecoder()
    out = decoder.receive_data(garbage)
    assert all(len(d) <= MAX_DATAGRAM_SIZE for d in out)
