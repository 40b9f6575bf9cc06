"""Garbage at the relay's door: random and mutated byte streams only ever end cleanly.

What runs is exactly the relay's per-connection path minus the sockets: the
HTTP upgrade parser, the relay's request routing, then the relay-side
``TunnelProtocol`` (WebSocket + multiplexer) with the relay's limits, the
relay accepting or refusing each OPEN. "Clean" means: no exception escapes,
and every stream ends with the protocol terminal (or never past the HTTP
stage), any failure having queued a close frame with a proper code.
"""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from wstunnel import mux, ws
from wstunnel.config import HostPort, RelayConfig
from wstunnel.protocol import TunnelProtocol
from wstunnel.relay import Relay

CONFIG = RelayConfig(listen=HostPort("127.0.0.1", 0), no_auth=True, max_channels=8,
                     max_message_size=64 * 1024)
RELAY = Relay(CONFIG)
CLEAN_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011}


def _fixed(n: int) -> bytes:
    return b"\x01" * n


def _valid_stream() -> tuple[bytes, int]:
    """A well-formed agent conversation: (bytes, where the WebSocket part starts)."""
    request = ws.ClientHandshake("relay", "/tunnel", random_bytes=_fixed).data_to_send()
    agent = TunnelProtocol(mux.Role.AGENT, random_bytes=_fixed)
    first = agent.open_channel("127.0.0.1", 22, early_data=b"hello")
    agent.open_channel("db.internal", 5432)
    agent.ping(b"p")
    body = agent.data_to_send()
    agent.send_data(first, b"x" * 3000)
    agent.send_eof(first)
    agent.reset_channel(first + 2)
    agent.go_away(0, "bye")
    body += agent.data_to_send()
    agent.close(1000, "done")
    body += agent.data_to_send()
    return request + body, len(request)


VALID, BODY_START = _valid_stream()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    start = BODY_START if rng.random() < 0.6 else 0  # mostly keep the request intact
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(6)
        at = rng.randint(start, max(start, len(buf) - 1))
        if kind == 0 and at < len(buf):
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif kind == 2:
            del buf[at:at + rng.randint(1, 64)]
        elif kind == 3:
            buf[at:at] = buf[at:at + rng.randint(1, 200)]
        elif kind == 4:
            del buf[at:]
        elif at < len(buf):
            buf[at] = rng.choice((0, 0x7F, 0x80, 0xFF))
    return bytes(buf)


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        step = rng.choice((1, 7, 64, 1500, len(data)))
        out.append(data[i:i + step])
        i += step
    return out


def _serve(chunks: list[bytes], rng: random.Random) -> None:
    """The relay's path for one connection, minus sockets; asserts a clean ending."""
    handshake = ws.ServerHandshake(max_header_size=16384, max_headers=100)
    pending = list(chunks)
    event = handshake.next_event()
    while event is None and pending:
        handshake.receive_data(pending.pop(0))
        event = handshake.next_event()
    if not isinstance(event, ws.RequestReceived) or RELAY.route(handshake, event, "fuzz"):
        return  # answered over HTTP (or still incomplete): the relay closes the connection
    handshake.accept()
    protocol = TunnelProtocol(mux.Role.RELAY, trailing_data=handshake.trailing_data,
                              max_message_size=CONFIG.max_message_size,
                              max_channels=CONFIG.max_channels + 1)
    sent = bytearray()
    for chunk in [b"", *pending]:
        if chunk:
            protocol.receive_data(chunk)
        sent += _react(protocol, rng)
    protocol.receive_eof()
    sent += _react(protocol, rng)
    assert protocol.closed
    _check_output(bytes(sent), failed=protocol.failure is not None)


def _check_output(sent: bytes, *, failed: bool) -> None:
    """What the relay sent is valid WebSocket; after a failure it ends in a proper close."""
    agent = ws.WebSocketConnection(ws.Role.CLIENT, max_message_size=1 << 24)
    agent.receive_data(sent)
    closes = [e for e in agent.events_received() if isinstance(e, ws.CloseReceived)]
    assert agent.failure is None
    if failed:
        assert closes and closes[0].code in CLEAN_CODES


def _react(protocol: TunnelProtocol, rng: random.Random) -> bytes:
    for event in protocol.events_received():
        if isinstance(event, mux.ChannelOpenRequested):
            if rng.random() < 0.5:
                protocol.accept_channel(event.channel_id)
            else:
                protocol.refuse_channel(event.channel_id, mux.OpenFailure.FORBIDDEN, "no")
        elif isinstance(event, mux.DataReceived):
            protocol.acknowledge(event.channel_id, len(event.data))
    return protocol.data_to_send()


def test_the_valid_stream_is_served() -> None:
    """The unmutated conversation reaches the multiplexer and ends with a normal close."""
    rng = random.Random(0)
    _serve([VALID], rng)
    _serve([VALID[i:i + 1] for i in range(len(VALID))], rng)


def test_ten_thousand_mutated_streams_end_cleanly() -> None:
    """10,000 seeded mutations (bit flips, inserts, cuts, repeats, truncations, random
    split points) of a real agent conversation, and pure noise, only ever end cleanly."""
    for seed in range(10_000):
        rng = random.Random(seed)
        data = rng.randbytes(rng.randint(0, 400)) if seed % 10 == 0 else _mutate(rng, VALID)
        if seed % 10 == 1:
            data = VALID[:BODY_START] + rng.randbytes(rng.randint(0, 600))
        _serve(_chunks(rng, data), rng)


@given(st.binary(max_size=2000), st.randoms(use_true_random=False))
def test_any_body_after_a_good_request_ends_cleanly(body: bytes, rng: random.Random) -> None:
    """Arbitrary bytes after a valid upgrade request: a clean close, never an exception."""
    _serve(_chunks(rng, VALID[:BODY_START] + body), rng)
