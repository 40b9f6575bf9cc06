"""The C masking module and the pure-Python route give the same bytes.

Users get one route or the other depending on whether a C compiler was at hand
at install time; frames must not depend on which.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wstunnel.ws import masking

pytestmark = pytest.mark.skipif(
    not masking.ACCELERATED, reason="the C masking module was not built (no C compiler)"
)

KEYS = st.binary(min_size=4, max_size=4)


def xor(payload: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@given(payload=st.binary(max_size=2100), key=KEYS)
def test_copying_mask_matches_the_definition(payload: bytes, key: bytes) -> None:
    expected = xor(payload, key)
    assert masking.mask(payload, key) == masking.py_mask(payload, key) == expected
    assert masking.mask(memoryview(payload), key) == expected
    assert masking.mask(bytearray(payload), key) == expected


@given(prefix=st.binary(max_size=20), payload=st.binary(max_size=2100), key=KEYS)
def test_in_place_mask_starts_the_key_at_start(prefix: bytes, payload: bytes, key: bytes) -> None:
    c_route, py_route = bytearray(prefix + payload), bytearray(prefix + payload)
    masking.mask_lanes(c_route, len(prefix), key)
    masking.py_mask_lanes(py_route, len(prefix), key)
    assert c_route == py_route == prefix + xor(payload, key)


@given(header=st.binary(max_size=14), prefix=st.binary(max_size=9),
       payload=st.binary(max_size=2100), key=KEYS)
def test_frame_building_matches_on_both_routes(header: bytes, prefix: bytes, payload: bytes,
                                              key: bytes) -> None:
    """The key runs on across prefix and payload, as over one frame payload."""
    expected = header + xor(prefix + payload, key)
    assert masking.masked_frame(header, prefix, payload, key) == expected
    assert masking.py_masked_frame(header, prefix, payload, key) == expected
    assert masking.masked_frame(header, prefix, memoryview(payload), key) == expected


def test_one_byte_results_are_fresh_objects() -> None:
    """CPython shares one object per single-byte value; masking must never write into it."""
    for value in (0, 65, 255):
        assert masking.mask(bytes([value]), b"\x01\x02\x03\x04") == bytes([value ^ 1])
        assert b"%c" % value == bytes([value]) and bytes([value])[0] == value  # not written


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        masking.mask(b"abc", b"123")
    with pytest.raises(ValueError, match="outside"):
        masking.mask_lanes(bytearray(4), 5, b"1234")
    with pytest.raises(TypeError):
        masking.mask_lanes(b"read-only", 0, b"1234")  # type: ignore[arg-type]


@pytest.mark.parametrize("pure", [False, True], ids=["C", "pure Python"])
def test_frames_round_trip_on_either_route(pure: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encode masked and decode on the server side, around the size switch points."""
    from wstunnel.ws import FrameDecoder, Opcode, encode_frame, frames

    if pure:
        monkeypatch.setattr(frames, "ACCELERATED", False)
        for name in ("mask", "mask_int", "mask_lanes", "masked_frame"):
            monkeypatch.setattr(frames, name, getattr(masking, "py_" + name))
    decoder = FrameDecoder(client=False, max_frame_size=1 << 20)
    key = b"\x9a\x01\xff\x42"
    for size in (0, 1, 3, 125, 126, 511, 512, 513, 4096, 65535, 65536, 70001):
        payload = bytes(i * 7 % 256 for i in range(size))
        wire = bytearray(encode_frame(Opcode.BINARY, payload, mask_key=key))
        assert wire[len(wire) - size:] == xor(payload, key)
        decoder.receive_data(wire)  # a bytearray: adopted as the buffer
        frame = decoder.next_frame()
        assert frame is not None and frame.payload == payload


@given(size=st.integers(0, 1 << 20))
def test_unzeroed_buffers_are_ordinary_bytearrays(size: int) -> None:
    """Receive buffers from the C module behave as bytearray(size), bar the zeroing."""
    buffer = masking.new_buffer(size)
    assert type(buffer) is bytearray and len(buffer) == size
    buffer[: min(size, 3)] = b"abc"[:size]
    buffer += b"!"
    assert len(buffer) == size + 1 and buffer[-1:] == b"!"
    with pytest.raises(ValueError):
        masking.new_buffer(-1)
