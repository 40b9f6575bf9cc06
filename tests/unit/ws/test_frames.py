"""Frame encoding and decoding (RFC 6455 section 5)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import feed_bytewise
from wstunnel.errors import PayloadTooBig, RemoteProtocolError
from wstunnel.ws import Frame, FrameDecoder, Opcode, encode_frame, mask
from wstunnel.ws.frames import DIRECT_MIN_SIZE, HEADER_ROOM_SIZE

KEY = b"\x37\xfa\x21\x3d"


def decode_all(data: bytes, *, client: bool, bytewise: bool = False, **limits: int) -> list[Frame]:
    decoder = FrameDecoder(client=client, **limits)
    frames: list[Frame] = []
    if bytewise:
        for i in range(len(data)):
            decoder.receive_data(data[i : i + 1])
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
    else:
        decoder.receive_data(data)
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    return frames


def rejection(data: bytes, *, client: bool, **limits: int) -> RemoteProtocolError:
    decoder = FrameDecoder(client=client, **limits)
    decoder.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        while decoder.next_frame() is not None:
            pass
    return info.value


def test_rfc_examples_encode() -> None:
    """Encoding matches the examples of RFC 6455 5.7."""
    assert encode_frame(Opcode.TEXT, b"Hello") == b"\x81\x05Hello"
    masked = encode_frame(Opcode.TEXT, b"Hello", mask_key=b"\x37\xfa\x21\x3d")
    assert masked == b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
    assert encode_frame(Opcode.TEXT, b"Hel", fin=False) == b"\x01\x03Hel"
    assert encode_frame(Opcode.CONTINUATION, b"lo") == b"\x80\x02lo"
    assert encode_frame(Opcode.PING, b"Hello") == b"\x89\x05Hello"
    assert encode_frame(Opcode.BINARY, b"\0" * 256)[:4] == b"\x82\x7e\x01\x00"
    assert encode_frame(Opcode.BINARY, b"\0" * 65536)[:10] == b"\x82\x7f" + struct.pack("!Q", 65536)


def test_rfc_example_masked_decodes() -> None:
    """The masked 'Hello' of RFC 6455 5.7 decodes on the server side."""
    frames = decode_all(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58", client=False)
    assert frames == [Frame(Opcode.TEXT, b"Hello")]


@pytest.mark.parametrize("size", [0, 1, 3, 125, 126, 511, 512, 513, 65535, 65536, 70001])
@pytest.mark.parametrize("masked", [False, True])
def test_round_trip_every_length_class(size: int, masked: bool) -> None:
    """Each length encoding (7, 16, 64 bit) and both mask paths round-trip."""
    payload = bytes(i * 7 % 256 for i in range(size))
    data = encode_frame(Opcode.BINARY, payload, mask_key=KEY if masked else None)
    assert decode_all(data, client=not masked) == [Frame(Opcode.BINARY, payload)]


def test_bytewise_input_gives_same_frames() -> None:
    """Feeding one byte at a time yields the same frames as one chunk."""
    data = b"".join(
        encode_frame(op, p, fin=fin, mask_key=KEY)
        for op, p, fin in [
            (Opcode.TEXT, b"ab", False),
            (Opcode.PING, b"p", True),
            (Opcode.CONTINUATION, b"c" * 300, True),
            (Opcode.BINARY, b"", True),
        ]
    )
    whole = decode_all(data, client=False)
    assert len(whole) == 4
    assert decode_all(data, client=False, bytewise=True) == whole


def test_mask_is_its_own_inverse_at_every_size() -> None:
    """mask(mask(x)) == x, and mask agrees with a byte-by-byte XOR."""
    for size in (0, 1, 2, 3, 4, 5, 100, 511, 512, 513, 4097):
        payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        masked = mask(payload, KEY)
        assert masked == bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))
        assert mask(masked, KEY) == payload


def test_mask_rejects_bad_key() -> None:
    """A masking key must be exactly four bytes."""
    with pytest.raises(ValueError):
        mask(b"abc", b"123")
    with pytest.raises(ValueError):
        encode_frame(Opcode.TEXT, b"x", mask_key=b"12345")


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_rsv_bits_without_extension_fail_1002(rsv: int) -> None:
    """RFC 6455 5.2: non-zero RSV without a negotiated extension is a protocol error."""
    data = encode_frame(Opcode.BINARY, b"x", rsv=rsv)
    assert rejection(data, client=True).code == 1002


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_reserved_opcodes_fail_1002(opcode: int) -> None:
    """RFC 6455 5.2: reserved opcodes fail the connection."""
    assert rejection(encode_frame(opcode, b""), client=True).code == 1002


def test_server_rejects_unmasked_and_client_rejects_masked() -> None:
    """RFC 6455 5.1: masking direction is mandatory both ways."""
    assert rejection(encode_frame(Opcode.BINARY, b"x"), client=False).code == 1002
    assert rejection(encode_frame(Opcode.BINARY, b"x", mask_key=KEY), client=True).code == 1002


def test_control_frame_rules() -> None:
    """RFC 6455 5.5: control frames are at most 125 bytes and never fragmented."""
    assert decode_all(encode_frame(Opcode.PING, b"x" * 125), client=True)[0].payload == b"x" * 125
    assert rejection(encode_frame(Opcode.PING, b"x" * 126), client=True).code == 1002
    assert rejection(encode_frame(Opcode.PONG, b"", fin=False), client=True).code == 1002
    assert rejection(encode_frame(Opcode.CLOSE, b"\x03\xe8" * 63), client=True).code == 1002


def test_non_minimal_lengths_fail_1002() -> None:
    """RFC 6455 5.2: the minimal number of bytes MUST be used to encode the length."""
    assert rejection(b"\x82\x7e\x00\x7d" + b"x" * 125, client=True).code == 1002
    assert rejection(b"\x82\x7f" + struct.pack("!Q", 65535), client=True).code == 1002
    # 16-bit form for exactly 126 and 64-bit form for exactly 65536 are fine.
    assert len(decode_all(b"\x82\x7e\x00\x7e" + b"x" * 126, client=True)) == 1


def test_64bit_length_msb_must_be_zero() -> None:
    """RFC 6455 5.2: the most significant bit of a 64-bit length MUST be 0."""
    error = rejection(b"\x82\x7f" + struct.pack("!Q", 1 << 63), client=True)
    assert error.code == 1002


def test_continuation_sequencing() -> None:
    """A continuation needs a message in progress; a new message may not interrupt one."""
    assert rejection(encode_frame(Opcode.CONTINUATION, b"x"), client=True).code == 1002
    interrupted = encode_frame(Opcode.TEXT, b"a", fin=False) + encode_frame(Opcode.BINARY, b"b")
    assert rejection(interrupted, client=True).code == 1002
    fine = (
        encode_frame(Opcode.TEXT, b"a", fin=False)
        + encode_frame(Opcode.PING, b"")
        + encode_frame(Opcode.CONTINUATION, b"b")
        + encode_frame(Opcode.BINARY, b"c")
    )
    assert [f.opcode for f in decode_all(fine, client=True)] == [
        Opcode.TEXT, Opcode.PING, Opcode.CONTINUATION, Opcode.BINARY,
    ]


def test_oversized_frame_rejected_from_header_alone() -> None:
    """A frame over the limit fails with 1009 as soon as its header is known."""
    header_only = b"\x82\x7f" + struct.pack("!Q", 1 << 40)
    error = rejection(header_only, client=True, max_frame_size=1000)
    assert isinstance(error, PayloadTooBig)
    assert error.code == 1009


def test_message_limit_counts_all_fragments() -> None:
    """Fragments adding up past max_message_size fail with 1009 before buffering."""
    data = encode_frame(Opcode.BINARY, b"x" * 600, fin=False) + b"\x80\x7e\x02\x58"
    error = rejection(data, client=True, max_frame_size=1000, max_message_size=1000)
    assert error.code == 1009
    ok = encode_frame(Opcode.BINARY, b"x" * 500, fin=False) + encode_frame(0, b"y" * 500)
    assert len(decode_all(ok, client=True, max_frame_size=1000, max_message_size=1000)) == 2


def test_decoder_stays_failed() -> None:
    """After a violation every later call raises the same error."""
    decoder = FrameDecoder(client=True)
    decoder.receive_data(b"\x83\x00" + encode_frame(Opcode.BINARY, b"ok"))
    with pytest.raises(RemoteProtocolError) as first:
        decoder.next_frame()
    with pytest.raises(RemoteProtocolError) as second:
        decoder.next_frame()
    assert first.value is second.value


def test_partial_frame_returns_none_and_counts_buffered() -> None:
    """An incomplete frame gives None; buffered_size reports what is held."""
    data = encode_frame(Opcode.BINARY, b"abcdef")
    decoder = FrameDecoder(client=True)
    feed_bytewise(decoder, data[:5])
    assert decoder.next_frame() is None
    assert decoder.buffered_size == 5
    decoder.receive_data(data[5:])
    assert decoder.next_frame() == Frame(Opcode.BINARY, b"abcdef")
    assert decoder.buffered_size == 0


# -- reading big payloads straight into their own buffer ------------------------


def fill_directly(decoder: FrameDecoder, data: bytes, step: int) -> tuple[list[Frame], list[bool]]:
    """Feed ``data`` as a transport does: into receive_buffer() while it offers one
    (at most ``step`` bytes a read), otherwise through receive_data. Returns the
    frames and, per read, whether it went into a frame's own buffer."""
    frames: list[Frame] = []
    routes: list[bool] = []
    offset = 0
    while offset < len(data):
        into = decoder.receive_buffer()
        chunk = data[offset : offset + step]
        if into is None:
            decoder.receive_data(chunk)
            got = len(chunk)
        else:
            with into:
                got = min(len(into), len(chunk))
                into[:got] = chunk[:got]
            decoder.buffer_filled(got)
        routes.append(into is not None)
        offset += got
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    return frames, routes


@pytest.mark.parametrize("masked", [False, True])
def test_big_payload_is_read_into_its_own_buffer(masked: bool) -> None:
    """Once a big frame's header is in, the rest of its payload is read into one
    buffer, which becomes the frame's payload; the next frames parse as usual."""
    big = bytes(i * 13 % 251 for i in range(DIRECT_MIN_SIZE * 3 + 5))
    key = KEY if masked else None
    data = (encode_frame(Opcode.BINARY, big, mask_key=key)
            + encode_frame(Opcode.BINARY, b"after", mask_key=key)
            + encode_frame(Opcode.PING, b"p", mask_key=key))
    frames, routes = fill_directly(FrameDecoder(client=not masked), data, 40_000)
    assert frames == [Frame(Opcode.BINARY, big), Frame(Opcode.BINARY, b"after"),
                      Frame(Opcode.PING, b"p")]
    assert routes[0] is False and all(routes[1:5])  # the first read found the header
    assert isinstance(frames[0].payload, bytearray)


def _fill(decoder: FrameDecoder, data: bytes, offset: int) -> tuple[int, int]:
    """Fill receive_buffer()'s view from ``data[offset:]`` as far as both go:
    (the view's size, the new offset)."""
    into = decoder.receive_buffer()
    assert into is not None
    with into:
        size = len(into)
        chunk = data[offset : offset + size]
        into[: len(chunk)] = chunk
    decoder.buffer_filled(len(chunk))
    return size, offset + len(chunk)


@pytest.mark.parametrize("masked", [False, True])
def test_after_a_big_payload_only_the_next_header_is_read(masked: bool) -> None:
    """A read of any size after a big payload would carry the front of a big one
    behind it, to be copied into that payload's own buffer; so the decoder offers
    room for a header and small frames only, and the next payload is read
    (almost) whole into its buffer. Small frames after that read go back to
    ordinary reads."""
    key = KEY if masked else None
    big = bytes(i % 251 for i in range(DIRECT_MIN_SIZE * 2))
    header_size = 14 if masked else 10
    data = (encode_frame(Opcode.BINARY, big, mask_key=key) * 2
            + encode_frame(Opcode.BINARY, b"small", mask_key=key) * 3)
    decoder = FrameDecoder(client=not masked)
    decoder.receive_data(data[:100])
    assert decoder.next_frame() is None
    _, offset = _fill(decoder, data, 100)
    assert decoder.next_frame() == Frame(Opcode.BINARY, big)

    size, offset = _fill(decoder, data, offset)
    assert size == HEADER_ROOM_SIZE
    assert decoder.next_frame() is None
    size, offset = _fill(decoder, data, offset)
    assert size == len(big) - (HEADER_ROOM_SIZE - header_size)  # the rest, not a big read's
    assert decoder.next_frame() == Frame(Opcode.BINARY, big)

    size, offset = _fill(decoder, data, offset)
    assert size == HEADER_ROOM_SIZE and offset == len(data)
    assert list(iter(decoder.next_frame, None)) == [Frame(Opcode.BINARY, b"small")] * 3
    assert decoder.receive_buffer() is None  # small frames: ordinary reads again
    assert decoder.buffered_size == 0


def test_small_frames_offer_no_buffer() -> None:
    """Below DIRECT_MIN_SIZE the payload is cut from the reads as before."""
    data = encode_frame(Opcode.BINARY, b"x" * (DIRECT_MIN_SIZE - 1))
    decoder = FrameDecoder(client=True)
    decoder.receive_data(data[:1000])
    assert decoder.next_frame() is None
    assert decoder.receive_buffer() is None
    decoder.receive_data(data[1000:])
    assert decoder.next_frame() == Frame(Opcode.BINARY, b"x" * (DIRECT_MIN_SIZE - 1))


def test_receive_data_finishes_a_payload_being_filled() -> None:
    """A transport may go back to receive_data mid-payload (a read that was not
    into the buffer): the bytes complete the payload and the rest is parsed."""
    big = b"B" * (DIRECT_MIN_SIZE + 10)
    data = encode_frame(Opcode.BINARY, big) + encode_frame(Opcode.TEXT, b"next")
    decoder = FrameDecoder(client=True)
    decoder.receive_data(data[:100])
    assert decoder.next_frame() is None
    into = decoder.receive_buffer()
    assert into is not None and len(into) == len(big) - (100 - 10)  # 10-byte header
    into[:50] = data[100:150]
    into.release()
    decoder.buffer_filled(50)
    assert decoder.buffered_size == 140
    assert decoder.next_frame() is None
    decoder.receive_data(data[150:])
    assert decoder.next_frame() == Frame(Opcode.BINARY, big)
    assert decoder.next_frame() == Frame(Opcode.TEXT, b"next")
    assert decoder.buffered_size == 0


def test_filling_more_than_the_buffer_is_refused() -> None:
    """buffer_filled counts only what fits the view it was given (or there was none)."""
    decoder = FrameDecoder(client=True)
    with pytest.raises(ValueError):
        decoder.buffer_filled(1)
    decoder.receive_data(encode_frame(Opcode.BINARY, b"z" * (DIRECT_MIN_SIZE + 1))[:20])
    assert decoder.next_frame() is None
    into = decoder.receive_buffer()
    assert into is not None
    with pytest.raises(ValueError):
        decoder.buffer_filled(len(into) + 1)
    decoder.buffer_filled(len(into))
    assert decoder.next_frame() is not None
    header_room = decoder.receive_buffer()
    assert header_room is not None and len(header_room) == HEADER_ROOM_SIZE
    with pytest.raises(ValueError):
        decoder.buffer_filled(HEADER_ROOM_SIZE + 1)


def test_oversized_frame_never_gets_a_buffer() -> None:
    """The size limit is judged from the header before any buffer is allocated."""
    decoder = FrameDecoder(client=True, max_frame_size=DIRECT_MIN_SIZE * 2)
    decoder.receive_data(b"\x82\x7f" + struct.pack("!Q", DIRECT_MIN_SIZE * 2 + 1))
    with pytest.raises(PayloadTooBig):
        decoder.next_frame()
    assert decoder.receive_buffer() is None


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 5, 126, DIRECT_MIN_SIZE - 1, DIRECT_MIN_SIZE,
                                       DIRECT_MIN_SIZE + 7, 3 * DIRECT_MIN_SIZE]),
                      min_size=1, max_size=4),
       step=st.integers(1000, 4 * DIRECT_MIN_SIZE), masked=st.booleans())
def test_reading_into_payload_buffers_gives_the_same_frames(
        sizes: list[int], step: int, masked: bool) -> None:
    """However reads fall, the frames equal those of decoding all bytes at once."""
    key = KEY if masked else None
    data = b"".join(encode_frame(Opcode.BINARY, bytes([n % 256]) * n, mask_key=key) for n in sizes)
    frames, _ = fill_directly(FrameDecoder(client=not masked), data, step)
    assert frames == decode_all(data, client=not masked)
