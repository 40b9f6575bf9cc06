"""Property tests for the WebSocket layer: round trips, any split, garbage in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import counting_random_bytes, feed_chunks, pump, ws_pair
from wstunnel.ws import (
    BytesMessage,
    ConnectionClosed,
    ConnectionState,
    Event,
    Frame,
    FrameDecoder,
    Opcode,
    Role,
    TextMessage,
    WebSocketConnection,
    encode_frame,
)

# Sizes on both sides of every length-encoding boundary, plus some in between.
SIZES = st.one_of(
    st.sampled_from([0, 1, 125, 126, 127, 511, 512, 513, 65535, 65536, 65537, 100_000]),
    st.integers(0, 2000),
)
KEYS = st.binary(min_size=4, max_size=4)


@given(size=SIZES, key=st.none() | KEYS, fin=st.booleans(), opcode=st.sampled_from([1, 2]))
def test_frame_round_trip_every_length_class(
    size: int, key: bytes | None, fin: bool, opcode: int
) -> None:
    """decode(encode(frame)) == frame for every length class, masked or not."""
    payload = bytes(i % 251 for i in range(size))
    decoder = FrameDecoder(client=key is None, max_frame_size=1 << 20)
    decoder.receive_data(encode_frame(opcode, payload, fin=fin, mask_key=key))
    assert decoder.next_frame() == Frame(Opcode(opcode), payload, fin)
    assert decoder.next_frame() is None


# A valid client-to-server conversation: messages, fragments, pings, maybe a close.
def _message_frames(draw: st.DrawFn) -> list[tuple[int, bytes, bool]]:
    text = draw(st.booleans())
    data = draw(st.text(max_size=40)).encode() if text else draw(st.binary(max_size=300))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    frames = []
    for i, piece in enumerate(pieces):
        opcode = (1 if text else 2) if i == 0 else 0
        frames.append((opcode, piece, i == len(pieces) - 1))
        if draw(st.booleans()) and i < len(pieces) - 1:
            frames.append((9, draw(st.binary(max_size=10)), True))
    return frames


@st.composite
def conversations(draw: st.DrawFn) -> bytes:
    frames: list[tuple[int, bytes, bool]] = []
    for _ in range(draw(st.integers(0, 5))):
        frames += _message_frames(draw)
    if draw(st.booleans()):
        frames.append((8, b"\x03\xe8" + draw(st.text(max_size=10)).encode()[:100], True))
    keys = counting_random_bytes(draw(st.integers(0, 255)))
    return b"".join(encode_frame(op, p, fin=fin, mask_key=keys(4)) for op, p, fin in frames)


def run_server(data: bytes, cuts: list[int]) -> tuple[list[Event], bytes]:
    server = WebSocketConnection(Role.SERVER)
    feed_chunks(server, data, cuts)
    return server.events_received(), server.data_to_send()


@given(data=conversations(), cuts=st.lists(st.integers(0, 5000), max_size=20))
def test_any_split_gives_same_events(data: bytes, cuts: list[int]) -> None:
    """Splitting the input anywhere gives the same events and the same output."""
    assert run_server(data, cuts) == run_server(data, [])


@given(data=conversations())
def test_bytewise_gives_same_events(data: bytes) -> None:
    """One byte at a time gives the same events and output as the whole input."""
    assert run_server(data, list(range(len(data)))) == run_server(data, [])


def check_garbage_outcome(conn: WebSocketConnection, events: list[Event]) -> None:
    closed = [e for e in events if isinstance(e, ConnectionClosed)]
    assert len(closed) <= 1
    if closed:
        assert events[-1] is closed[0]
        assert conn.state is ConnectionState.CLOSED and conn.should_close_transport
    else:
        assert conn.state is ConnectionState.OPEN


@given(
    garbage=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=10),
    role=st.sampled_from(list(Role)),
)
def test_random_garbage_never_raises(garbage: bytes, cuts: list[int], role: Role) -> None:
    """Random bytes only ever yield events or one clean terminal close."""
    conn = WebSocketConnection(role, max_message_size=1000, random_bytes=counting_random_bytes())
    feed_chunks(conn, garbage, cuts)
    check_garbage_outcome(conn, conn.events_received())
    conn.receive_eof()
    assert conn.state is ConnectionState.CLOSED


FLIPS = st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 255)), min_size=1, max_size=4)


@given(data=conversations(), flips=FLIPS)
def test_corrupted_streams_never_raise(data: bytes, flips: list[tuple[int, int]]) -> None:
    """Valid streams with corrupted bytes still only give events or a clean close."""
    corrupted = bytearray(data or b"\x00")
    for position, xor in flips:
        corrupted[position % len(corrupted)] ^= xor
    server = WebSocketConnection(Role.SERVER, max_message_size=1000)
    server.receive_data(bytes(corrupted))
    check_garbage_outcome(server, server.events_received())


@given(messages=st.lists(st.binary(max_size=3000) | st.text(max_size=200), max_size=8))
def test_pair_round_trip(messages: list[bytes | str]) -> None:
    """Whatever one peer sends arrives intact and in order at the other."""
    client, server = ws_pair()
    for message in messages:
        if isinstance(message, bytes):
            client.send_bytes(message)
        else:
            client.send_text(message)
    pump(client, server)
    expected = [BytesMessage(m) if isinstance(m, bytes) else TextMessage(m) for m in messages]
    assert server.events_received() == expected
