"""WebSocketConnection: messages, control frames, closing, failures (RFC 6455 5-7)."""

from __future__ import annotations

import os

import pytest

from tests.helpers import counting_random_bytes, feed_bytewise, pump, ws_pair
from wstunnel.errors import LocalProtocolError, PayloadTooBig
from wstunnel.ws import (
    BytesMessage,
    CloseReceived,
    ConnectionClosed,
    ConnectionState,
    FrameDecoder,
    Opcode,
    PingReceived,
    PongReceived,
    Role,
    TextMessage,
    WebSocketConnection,
    encode_frame,
)
from wstunnel.ws.connection import KeyPool

KEY = b"\x01\x02\x03\x04"


def server() -> WebSocketConnection:
    return WebSocketConnection(Role.SERVER, max_message_size=1000)


def client_frames(*frames: tuple[int, bytes, bool]) -> bytes:
    """Masked frames as a client would send them."""
    return b"".join(encode_frame(op, p, fin=fin, mask_key=KEY) for op, p, fin in frames)


def sent_frames(data: bytes, *, by_client: bool) -> list[tuple[int, bytes]]:
    decoder = FrameDecoder(client=not by_client)
    decoder.receive_data(data)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append((int(frame.opcode), frame.payload))
    return out


def test_messages_flow_both_ways() -> None:
    """Bytes and text sent by one side arrive as whole messages on the other."""
    client, srv = ws_pair()
    client.send_bytes(b"\x00\x01")
    client.send_text("héllo")
    srv.send_bytes(bytearray(b"back"))
    pump(client, srv)
    assert srv.events_received() == [BytesMessage(b"\x00\x01"), TextMessage("héllo")]
    assert client.events_received() == [BytesMessage(b"back")]


def test_client_frames_are_masked_with_fresh_keys() -> None:
    """RFC 6455 5.3: every client frame is masked, each with a new key."""
    keys: list[int] = []
    base = counting_random_bytes()

    def recording(size: int) -> bytes:
        keys.append(size)
        return base(size)

    client = WebSocketConnection(Role.CLIENT, random_bytes=recording)
    client.send_bytes(b"a")
    client.send_bytes(b"a")
    data = client.data_to_send()
    assert keys == [4, 4]
    assert data[1] & 0x80 and data[8] & 0x80
    assert data[2:6] != data[9:13]
    srv = WebSocketConnection(Role.SERVER)
    srv.send_bytes(b"a")
    assert srv.data_to_send() == b"\x82\x01a"


def test_fragments_reassembled_with_control_frames_between() -> None:
    """Continuations are joined; a ping in the middle is answered and reported."""
    srv = server()
    srv.receive_data(
        client_frames(
            (Opcode.TEXT, "h€".encode()[:2], False),
            (Opcode.PING, b"p", True),
            (Opcode.CONTINUATION, "h€".encode()[2:], False),
            (Opcode.CONTINUATION, b"!", True),
            (Opcode.BINARY, b"a", False),
            (Opcode.CONTINUATION, b"b", True),
        )
    )
    assert srv.events_received() == [
        PingReceived(b"p"),
        TextMessage("h€!"),
        BytesMessage(b"ab"),
    ]
    assert sent_frames(srv.data_to_send(), by_client=False) == [(Opcode.PONG, b"p")]


def test_same_events_bytewise() -> None:
    """Any split of the input, down to single bytes, gives the same events."""
    data = client_frames(
        (Opcode.TEXT, "ü".encode()[:1], False),
        (Opcode.CONTINUATION, "ü".encode()[1:], True),
        (Opcode.PING, b"", True),
        (Opcode.CLOSE, b"\x03\xe8bye", True),
    )
    whole, split = server(), server()
    whole.receive_data(data)
    feed_bytewise(split, data)
    assert whole.events_received() == split.events_received()
    assert whole.data_to_send() == split.data_to_send()


def test_peer_close_is_echoed_and_terminal() -> None:
    """The peer's close gets our echo, then CloseReceived and ConnectionClosed."""
    srv = server()
    srv.receive_data(client_frames((Opcode.CLOSE, b"\x0b\xb8done", True)))
    assert srv.events_received() == [CloseReceived(3000, "done"), ConnectionClosed(3000, "done")]
    assert sent_frames(srv.data_to_send(), by_client=False) == [(Opcode.CLOSE, b"\x0b\xb8")]
    assert srv.state is ConnectionState.CLOSED
    assert srv.should_close_transport
    assert (srv.close_code, srv.close_reason) == (3000, "done")


def test_empty_close_reports_1005_and_replies_empty() -> None:
    """A close without payload means 1005; the reply carries no code either."""
    srv = server()
    srv.receive_data(client_frames((Opcode.CLOSE, b"", True)))
    assert srv.events_received()[0] == CloseReceived(1005, "")
    assert sent_frames(srv.data_to_send(), by_client=False) == [(Opcode.CLOSE, b"")]


def test_we_close_first() -> None:
    """close() moves to CLOSING; the peer's echo completes it (CLOSED)."""
    client, srv = ws_pair()
    client.close(1001, "going")
    assert client.state is ConnectionState.CLOSING
    assert not client.should_close_transport
    with pytest.raises(LocalProtocolError):
        client.send_bytes(b"late")
    client.close()  # idempotent
    pump(client, srv)
    assert srv.events_received() == [CloseReceived(1001, "going"), ConnectionClosed(1001, "going")]
    assert client.events_received() == [CloseReceived(1001, ""), ConnectionClosed(1001, "")]
    assert client.state.value == "closed"
    assert client.should_close_transport


def test_messages_still_delivered_while_closing_but_no_pong() -> None:
    """While CLOSING we deliver data and pings but send nothing after our close."""
    srv = server()
    srv.close()
    srv.data_to_send()
    srv.receive_data(client_frames((Opcode.BINARY, b"x", True), (Opcode.PING, b"p", True)))
    assert srv.events_received() == [BytesMessage(b"x"), PingReceived(b"p")]
    assert srv.data_to_send() == b""


def test_ping_and_pong() -> None:
    """ping() is answered automatically; pong() sends an unsolicited pong."""
    client, srv = ws_pair()
    client.ping(b"123")
    client.pong(b"u")
    pump(client, srv)
    assert srv.events_received() == [PingReceived(b"123"), PongReceived(b"u")]
    assert client.events_received() == [PongReceived(b"123")]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x03", 1002),  # one-byte payload
        (b"\x03\xe7", 1002),  # 999
        (b"\x03\xec", 1002),  # 1004
        (b"\x03\xed", 1002),  # 1005
        (b"\x03\xee", 1002),  # 1006
        (b"\x03\xf7", 1002),  # 1015
        (b"\x03\xf8", 1002),  # 1016
        (b"\x0b\xb7", 1002),  # 2999
        (b"\x13\x88", 1002),  # 5000
        (b"\x03\xe8\xff", 1007),  # reason not UTF-8
    ],
)
def test_invalid_close_frames(payload: bytes, code: int) -> None:
    """RFC 6455 7.4: invalid codes fail with 1002; a non-UTF-8 reason with 1007."""
    srv = server()
    srv.receive_data(client_frames((Opcode.CLOSE, payload, True)))
    assert srv.events_received() == [ConnectionClosed(code, str(srv.failure))]
    assert srv.failure is not None and srv.failure.code == code
    assert sent_frames(srv.data_to_send(), by_client=False) == [
        (Opcode.CLOSE, code.to_bytes(2, "big"))
    ]


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999])
def test_valid_close_codes_accepted(code: int) -> None:
    """Registered codes and 3000-4999 are accepted and echoed."""
    srv = server()
    srv.receive_data(client_frames((Opcode.CLOSE, code.to_bytes(2, "big"), True)))
    assert srv.events_received()[0] == CloseReceived(code, "")
    assert srv.failure is None


def test_invalid_utf8_text_fails_1007_on_first_fragment() -> None:
    """Text is validated incrementally: a bad first fragment fails before the rest."""
    srv = server()
    srv.receive_data(client_frames((Opcode.TEXT, b"ok\xff", False)))
    assert srv.events_received() == [ConnectionClosed(1007, str(srv.failure))]
    assert srv.should_close_transport


def test_invalid_utf8_whole_text_fails_1007() -> None:
    """An unfragmented text message that is not UTF-8 fails with 1007."""
    srv = server()
    srv.receive_data(client_frames((Opcode.TEXT, b"\xed\xa0\x80", True)))
    assert srv.close_code == 1007


def test_text_split_inside_a_character_is_fine() -> None:
    """A multi-byte character split across fragments is valid text."""
    srv = server()
    euro = "€".encode()
    srv.receive_data(
        client_frames((Opcode.TEXT, euro[:1], False), (Opcode.CONTINUATION, euro[1:], True))
    )
    assert srv.events_received() == [TextMessage("€")]


def test_truncated_text_at_end_of_message_fails() -> None:
    """A text message ending inside a character fails with 1007."""
    srv = server()
    srv.receive_data(client_frames((Opcode.TEXT, b"a\xe2\x82", True)))
    assert srv.close_code == 1007


def test_too_big_message_fails_1009() -> None:
    """Messages over max_message_size close with 1009 (PayloadTooBig)."""
    srv = server()
    srv.receive_data(client_frames((Opcode.BINARY, b"x" * 1001, True)))
    assert isinstance(srv.failure, PayloadTooBig)
    assert sent_frames(srv.data_to_send(), by_client=False) == [(Opcode.CLOSE, b"\x03\xf1")]


def test_protocol_error_ignores_further_input() -> None:
    """After a failure nothing more is parsed or reported."""
    srv = server()
    srv.receive_data(encode_frame(Opcode.BINARY, b"unmasked"))
    events = srv.events_received()
    assert events == [ConnectionClosed(1002, str(srv.failure))]
    srv.receive_data(client_frames((Opcode.BINARY, b"x", True)))
    srv.receive_eof()
    assert srv.events_received() == []


def test_failure_after_our_close_sends_no_second_close() -> None:
    """If we already sent close, a protocol error does not queue another."""
    srv = server()
    srv.close()
    srv.data_to_send()
    srv.receive_data(b"\x82\x01x")  # unmasked
    assert srv.data_to_send() == b""
    assert srv.state is ConnectionState.CLOSED


def test_eof_without_close_is_1006() -> None:
    """receive_eof() without a close handshake ends the connection with 1006; idempotent."""
    client, _ = ws_pair()
    client.receive_eof()
    client.receive_eof()
    events = client.events_received()
    assert len(events) == 1
    assert isinstance(events[0], ConnectionClosed) and events[0].code == 1006
    with pytest.raises(LocalProtocolError):
        client.ping()


def test_trailing_data_is_processed_at_construction() -> None:
    """Bytes that followed the handshake are parsed at once."""
    trailing = client_frames((Opcode.BINARY, b"hi", True))
    srv = WebSocketConnection(Role.SERVER, trailing_data=trailing)
    assert srv.events_received() == [BytesMessage(b"hi")]


def test_local_misuse_raises() -> None:
    """Our own misuse raises LocalProtocolError at once."""
    client, _ = ws_pair()
    with pytest.raises(LocalProtocolError):
        client.ping(b"x" * 126)
    with pytest.raises(LocalProtocolError):
        client.close(1006)
    with pytest.raises(LocalProtocolError):
        client.close(1000, "x" * 124)
    with pytest.raises(LocalProtocolError):
        client.close(1005, "reason")
    assert client.state is ConnectionState.OPEN


def test_close_1005_sends_empty_close() -> None:
    """close(1005) sends a close frame without a status code."""
    srv = server()
    srv.close(1005)
    assert srv.data_to_send() == b"\x88\x00"


def test_data_to_send_drains() -> None:
    """data_to_send() returns each byte once."""
    srv = server()
    srv.send_bytes(b"abc")
    assert srv.data_to_send() == b"\x82\x03abc"
    assert srv.data_to_send() == b""


def test_masking_keys_come_from_the_source_a_pool_at_a_time() -> None:
    """1024 frames' keys cost one source call; each key is the source's next four bytes."""
    blocks = [os.urandom(4096), os.urandom(4096)]
    calls: list[int] = []

    def source(size: int) -> bytes:
        calls.append(size)
        return blocks[len(calls) - 1]

    pool = KeyPool(source)
    keys = [pool(4) for _ in range(1025)]
    assert calls == [4096, 4096]
    assert b"".join(keys[:1024]) == blocks[0]
    assert keys[1024] == blocks[1][:4]


def test_a_client_masks_each_frame_with_the_next_pooled_key() -> None:
    """The default source: every frame on the wire carries a different key."""
    client = WebSocketConnection(Role.CLIENT)
    for _ in range(200):
        client.send_bytes(b"x" * 32)
    wire = client.data_to_send()
    keys = {wire[i + 2:i + 6] for i in range(0, len(wire), 38)}
    assert len(keys) == 200


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_binary_parts_arrive_as_one_message(role: Role) -> None:
    """send_binary_parts(prefix, payload) is one message prefix + payload, masked across
    both by a client, for every prefix length (the masking key runs on)."""
    sender = WebSocketConnection(role)
    receiver = FrameDecoder(client=role is Role.SERVER, max_frame_size=1 << 20)
    for prefix_size in range(6):
        prefix = bytes(range(prefix_size))
        payload = memoryview(os.urandom(700 + prefix_size))
        sender.send_binary_parts(prefix, payload)
        receiver.receive_data(sender.data_to_send())
        frame = receiver.next_frame()
        assert frame is not None and frame.opcode is Opcode.BINARY and frame.fin
        assert frame.payload == prefix + bytes(payload)
    sender.send_binary_parts(b"\x05head", b"")
    receiver.receive_data(sender.data_to_send())
    frame = receiver.next_frame()
    assert frame is not None and frame.payload == b"\x05head"


def test_unanswered_pings_queue_a_bounded_number_of_pongs() -> None:
    """A peer that pings and never reads gets the pongs of its first pings and one
    for its latest (RFC 6455 5.5.3 allows it): pongs never pile up in our output,
    however many pings come; a burst of 10 (Autobahn 2.10) is answered ping for ping."""
    srv = server()
    srv.send_bytes(b"before")
    srv.receive_data(client_frames(*[(Opcode.PING, b"%d" % i, True) for i in range(10_000)]))
    srv.send_bytes(b"after")
    assert len(srv.events_received()) == 10_000
    frames = sent_frames(srv.data_to_send(), by_client=False)
    assert frames[0] == (Opcode.BINARY, b"before") and frames[-1] == (Opcode.BINARY, b"after")
    pongs = [payload for opcode, payload in frames[1:-1] if opcode == Opcode.PONG]
    assert len(frames) == len(pongs) + 2 and len(pongs) <= 32
    assert pongs[-1] == b"9999" and pongs[:-1] == [b"%d" % i for i in range(len(pongs) - 1)]
    srv.receive_data(client_frames(*[(Opcode.PING, b"%d" % i, True) for i in range(10)]))
    assert sent_frames(srv.data_to_send(), by_client=False) == [
        (Opcode.PONG, b"%d" % i) for i in range(10)]


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_a_flood_of_pings_costs_a_bounded_number_of_pongs(role: Role) -> None:
    """Either end: 50,000 pings in one read leave at most 32 pongs to write."""
    conn = WebSocketConnection(role)
    mask = KEY if role is Role.SERVER else None
    conn.receive_data(b"".join(encode_frame(Opcode.PING, b"x" * 125, mask_key=mask)
                               for _ in range(50_000)))
    parts = conn.data_to_send_parts()
    assert sum(map(len, parts)) <= 32 * (2 + 4 + 125)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_tiny_continuation_frames_cost_their_size(size: int) -> None:
    """A message built of many tiny (or empty) continuation frames is held at about its
    size while it is assembled, not as an object per frame: max_message_size bounds
    what a peer can make us hold, however it fragments."""
    import tracemalloc

    srv = WebSocketConnection(Role.SERVER, max_message_size=1024 * 1024)
    frame = encode_frame(Opcode.CONTINUATION, b"z" * size, fin=False, mask_key=KEY)
    srv.receive_data(encode_frame(Opcode.BINARY, b"a", fin=False, mask_key=KEY))
    tracemalloc.start()
    try:
        for _ in range(20):
            srv.receive_data(frame * 5_000)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 100_000 * size * 2 + 64 * 1024
    srv.receive_data(encode_frame(Opcode.CONTINUATION, b"!", mask_key=KEY))
    assert srv.events_received() == [BytesMessage(b"a" + b"z" * size * 100_000 + b"!")]


def test_tiny_text_fragments_cost_their_size() -> None:
    """As for binary: a text message of 1-byte fragments is held at about its size,
    and still checked as UTF-8 on the way."""
    import tracemalloc

    srv = WebSocketConnection(Role.SERVER, max_message_size=1024 * 1024)
    srv.receive_data(encode_frame(Opcode.TEXT, b"a", fin=False, mask_key=KEY))
    frame = encode_frame(Opcode.CONTINUATION, b"b", fin=False, mask_key=KEY)
    tracemalloc.start()
    try:
        srv.receive_data(frame * 100_000)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 300_000
    srv.receive_data(encode_frame(Opcode.CONTINUATION, "é".encode(), mask_key=KEY))
    assert srv.events_received() == [TextMessage("a" + "b" * 100_000 + "é")]
