"""The HTTP transports' carrier: records and controls framed in a byte stream (framing.py)."""

from __future__ import annotations

import random

import pytest

from tests.helpers import feed_bytewise
from wstunnel import mux, ws
from wstunnel.errors import LocalProtocolError
from wstunnel.framing import FramedConnection, FrameType, encode_frame
from wstunnel.protocol import SessionLimits, TunnelProtocol

RECORD = encode_frame(FrameType.RECORD, b"\x05record")
PING = encode_frame(FrameType.PING, b"probe")
PONG = encode_frame(FrameType.PONG, b"pong!")
CLOSE = encode_frame(FrameType.CLOSE, b"\x03\xe8bye")
STREAM = RECORD + PING + PONG + encode_frame(FrameType.RECORD, b"") + CLOSE
EXPECTED: list[ws.Event] = [
    ws.BytesMessage(b"\x05record"), ws.PingReceived(b"probe"), ws.PongReceived(b"pong!"),
    ws.BytesMessage(b""), ws.CloseReceived(1000, "bye"), ws.ConnectionClosed(1000, "bye"),
]


def pump(a: FramedConnection | TunnelProtocol, b: FramedConnection | TunnelProtocol) -> None:
    """Move each side's output to the other until both are quiet."""
    for _ in range(100):
        a_out, b_out = a.data_to_send(), b.data_to_send()
        if a_out:
            b.receive_data(a_out)
        if b_out:
            a.receive_data(b_out)
        if not a_out and not b_out:
            return
    raise AssertionError("still talking after 100 rounds")


def _events(connection: FramedConnection) -> list[ws.Event]:
    return [ws.BytesMessage(bytes(e.data)) if isinstance(e, ws.BytesMessage) else e
            for e in connection.events_received()]


def test_every_frame_type_whole() -> None:
    """Records, ping, pong and close arrive as the WebSocket carrier's events, in order;
    a ping is answered with a pong of the same payload, a close echoed once."""
    connection = FramedConnection()
    connection.receive_data(STREAM)
    assert _events(connection) == EXPECTED
    assert connection.data_to_send() == (encode_frame(FrameType.PONG, b"probe")
                                         + encode_frame(FrameType.CLOSE, b"\x03\xe8"))
    assert connection.state is ws.ConnectionState.CLOSED
    assert connection.should_close_transport


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_split_at_every_byte(cut: int) -> None:
    """The same events whatever the read boundaries: split anywhere."""
    connection = FramedConnection()
    connection.receive_data(STREAM[:cut])
    connection.receive_data(STREAM[cut:])
    assert _events(connection) == EXPECTED


def test_one_byte_at_a_time() -> None:
    """Fed one byte per call, the stream gives the same events."""
    connection = FramedConnection()
    feed_bytewise(connection, STREAM)
    assert _events(connection) == EXPECTED


def test_big_record_read_in_place() -> None:
    """A big record's payload is offered as a buffer of its own (no copy to join reads);
    reading into it in pieces, then more frames, gives the record whole, in order."""
    payload = random.Random(1).randbytes(200_000)
    data = encode_frame(FrameType.RECORD, payload) + PING
    connection = FramedConnection()
    connection.receive_data(data[:1000])
    offset = 1000
    while offset < len(data):
        view = connection.receive_buffer()
        if view is None:
            connection.receive_data(data[offset:])
            break
        take = min(len(view), 70_000)
        view[:take] = data[offset:offset + take]
        view.release()
        connection.buffer_filled(take)
        offset += take
    assert _events(connection) == [ws.BytesMessage(payload), ws.PingReceived(b"probe")]


def test_records_sent_as_parts() -> None:
    """A record leaves as its frame header + the record's head, then the payload unjoined."""
    connection = FramedConnection()
    connection.send_binary_parts(b"\x05head", b"payload")
    parts = connection.data_to_send_parts()
    assert parts[-1] == b"payload"
    assert b"".join(parts) == encode_frame(FrameType.RECORD, b"\x05headpayload")


@pytest.mark.parametrize(("data", "code"), [
    (encode_frame(0x07, b""), 1002),                    # unknown type
    (b"\x00\x00\x10\x00\x01", 1009),                    # record over the limit, from its header
    (encode_frame(FrameType.PING, bytes(126)), 1002),   # control payload too long
    (encode_frame(FrameType.CLOSE, b"\x03"), 1002),     # 1-byte close
    (encode_frame(FrameType.CLOSE, b"\x03\xe8\xff"), 1007),  # reason not UTF-8
])
def test_bad_frames_fail_cleanly(data: bytes, code: int) -> None:
    """Garbage never raises: a CLOSE with the code goes out, the connection is terminal,
    ``failure`` says what was wrong, and nothing after it is read."""
    connection = FramedConnection(max_record_size=65536)
    connection.receive_data(data + RECORD)
    events = _events(connection)
    assert events == [ws.ConnectionClosed(code, str(connection.failure))]
    assert connection.failure is not None and connection.failure.code == code
    assert connection.data_to_send() == encode_frame(FrameType.CLOSE, code.to_bytes(2, "big"))
    assert connection.should_close_transport


def test_eof_without_close_is_abnormal() -> None:
    """A stream that ends without a CLOSE ends the connection with 1006, once."""
    connection = FramedConnection()
    connection.receive_data(RECORD[:3])
    connection.receive_eof()
    connection.receive_eof()
    assert _events(connection) == [ws.ConnectionClosed(1006, "connection lost without a "
                                                             "close frame")]


def test_close_handshake_from_our_side() -> None:
    """Our close: CLOSING until the peer's echo, then CLOSED; no records after it."""
    ours, theirs = FramedConnection(), FramedConnection()
    ours.close(4000, "idle timeout")
    assert ours.state is ws.ConnectionState.CLOSING
    with pytest.raises(LocalProtocolError):
        ours.send_binary_parts(b"\x05", b"late")
    pump(ours, theirs)
    assert _events(theirs) == [ws.CloseReceived(4000, "idle timeout"),
                               ws.ConnectionClosed(4000, "idle timeout")]
    assert _events(ours) == [ws.CloseReceived(4000, ""), ws.ConnectionClosed(4000, "")]
    assert ours.state is theirs.state is ws.ConnectionState.CLOSED


def test_ping_pong_between_peers() -> None:
    """A ping's answer comes back as PongReceived with the same payload."""
    a, b = FramedConnection(), FramedConnection()
    a.ping(b"wstunnel")
    pump(a, b)
    assert _events(b) == [ws.PingReceived(b"wstunnel")]
    assert _events(a) == [ws.PongReceived(b"wstunnel")]


def test_sessions_run_over_it() -> None:
    """Two TunnelProtocols on the framed carrier open a channel and carry data both ways."""
    limits = SessionLimits()
    agent = TunnelProtocol(mux.Role.AGENT, limits=limits, framed=True)
    relay = TunnelProtocol(mux.Role.RELAY, limits=limits, framed=True)
    channel = agent.open_channel("example.com", 80, early_data=b"hello")
    pump(agent, relay)
    opened = [e for e in relay.events_received() if isinstance(e, mux.ChannelOpenRequested)]
    assert [(e.host, e.port) for e in opened] == [("example.com", 80)]
    relay.accept_channel(channel)
    relay.send_data(channel, b"world")
    pump(agent, relay)
    data = [bytes(e.data) for e in agent.events_received() if isinstance(e, mux.DataReceived)]
    assert data == [b"world"]
