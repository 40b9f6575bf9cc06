"""TunnelProtocol (ws + mux composed): its limits, its events, and what goes on the wire
when the peer breaks the rules."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from tests.helpers import counting_random_bytes, feed_bytewise
from wstunnel import mux, ws
from wstunnel.errors import LocalProtocolError
from wstunnel.mux.wire import (
    Data,
    GoAway,
    Open,
    OpenOk,
    Record,
    Settings,
    Window,
    decode_record,
    encode_record,
)
from wstunnel.protocol import SessionLimits, TunnelEvent, TunnelProtocol

SETTINGS = encode_record(Settings(1, mux.DEFAULT_INITIAL_WINDOW, mux.DEFAULT_MAX_CHUNK_SIZE))
OPEN = encode_record(Open(1, mux.ChannelKind.TCP, "db", 5432))


def _agent_bytes(*records: bytes) -> bytes:
    """The records as the agent's masked binary messages."""
    client = ws.WebSocketConnection(ws.Role.CLIENT, random_bytes=counting_random_bytes())
    for record in records:
        client.send_bytes(record)
    return bytes(client.data_to_send())


def _relay_output(relay: TunnelProtocol) -> tuple[list[Record], list[ws.CloseReceived]]:
    """The relay's output as the agent decodes it: records, and close frames in order."""
    agent = ws.WebSocketConnection(ws.Role.CLIENT)
    agent.receive_data(bytes(relay.data_to_send()))
    records: list[Record] = []
    closes: list[ws.CloseReceived] = []
    for event in agent.events_received():
        if isinstance(event, ws.BytesMessage):
            assert not closes, "a record after the close frame"
            records.append(decode_record(bytes(event.data)))
        elif isinstance(event, ws.CloseReceived):
            closes.append(event)
    assert agent.failure is None
    return records, closes


# (the agent's records after its SETTINGS, the error code the relay must send)
VIOLATIONS = {
    "second SETTINGS": ([SETTINGS], mux.ErrorCode.PROTOCOL_ERROR),
    "DATA for a channel never opened": (
        [encode_record(Data(1, b"x"))], mux.ErrorCode.PROTOCOL_ERROR),
    "DATA past the window": (  # 17 x 16 KiB > the 256 KiB window
        [OPEN] + [encode_record(Data(1, b"x" * 16384))] * 17, mux.ErrorCode.FLOW_CONTROL_ERROR),
    "WINDOW of 0": (
        [OPEN, bytes([mux.RecordType.WINDOW]) + (1).to_bytes(4, "big") + bytes(4)],
        mux.ErrorCode.FLOW_CONTROL_ERROR),
    "DATA too large": (
        [OPEN, encode_record(Data(1, b"x" * (mux.DEFAULT_SOLO_CHUNK_SIZE + 1)))],
        mux.ErrorCode.RECORD_SIZE_ERROR),
}


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("violation", list(VIOLATIONS))
def test_violation_sends_goaway_with_its_code_then_close(violation: str, bytewise: bool) -> None:
    """A multiplexer violation puts GOAWAY(error code) on the wire and then the
    WebSocket close 1002, nothing after it (PROTOCOL.md §7)."""
    records, code = VIOLATIONS[violation]
    relay = TunnelProtocol(mux.Role.RELAY, limits=SessionLimits(max_message_size=2 << 20))
    assert isinstance(_relay_output(relay)[0][0], Settings)  # its SETTINGS already left
    data = _agent_bytes(SETTINGS, *records)
    if bytewise and len(data) < 4096:
        feed_bytewise(relay, data)
    else:
        relay.receive_data(data)
    assert any(isinstance(e, mux.SessionFailed) and e.code == code
               for e in relay.events_received())
    sent, closes = _relay_output(relay)
    goaways = [r for r in sent if isinstance(r, GoAway)]
    assert sent and sent[-1] is goaways[0] and len(goaways) == 1
    assert goaways[0].code == code
    assert goaways[0].text == code.name.lower().replace("_", " ")
    assert [c.code for c in closes] == [ws.CloseCode.PROTOCOL_ERROR]


def test_violation_before_our_settings_left_sends_settings_goaway_close() -> None:
    """When the failure comes before our SETTINGS was written, SETTINGS still goes
    first (every session starts with it), then GOAWAY, then the close."""
    relay = TunnelProtocol(mux.Role.RELAY)
    relay.receive_data(_agent_bytes(encode_record(Window(1, 5))))  # not SETTINGS first
    sent, closes = _relay_output(relay)
    assert [type(r) for r in sent] == [Settings, GoAway]
    assert isinstance(sent[1], GoAway) and sent[1].code == mux.ErrorCode.PROTOCOL_ERROR
    assert [c.code for c in closes] == [ws.CloseCode.PROTOCOL_ERROR]


def test_agent_sees_the_goaway_code_before_the_close() -> None:
    """The peer's TunnelProtocol reports the GOAWAY (with its code) before the close."""
    relay = TunnelProtocol(mux.Role.RELAY)
    agent = TunnelProtocol(mux.Role.AGENT, random_bytes=counting_random_bytes())
    relay.receive_data(agent.data_to_send())
    relay.receive_data(_agent_bytes(SETTINGS))
    agent.receive_data(relay.data_to_send())
    kinds = [type(e) for e in agent.events_received()]
    goaways = [i for i, k in enumerate(kinds) if k is mux.GoAwayReceived]
    closes = [i for i, k in enumerate(kinds) if k is ws.CloseReceived]
    assert goaways and closes and goaways[0] < closes[0]


def _settings_seen_by_relay(agent: TunnelProtocol) -> mux.SettingsReceived:
    relay = TunnelProtocol(mux.Role.RELAY)
    relay.receive_data(agent.data_to_send())
    settings = [e for e in relay.events_received() if isinstance(e, mux.SettingsReceived)]
    assert len(settings) == 1
    return settings[0]


def test_session_limits_reach_the_wire() -> None:
    """The limits given as one SessionLimits are the ones the session announces:
    its receive window, and the largest chunk it accepts, which by default is
    as large as the message limit leaves room for."""
    limits = SessionLimits(initial_window=1 << 20, max_chunk_size=32 * 1024,
                           max_message_size=128 * 1024)
    settings = _settings_seen_by_relay(TunnelProtocol(mux.Role.AGENT, limits=limits))
    assert settings.initial_window == 1 << 20
    assert settings.max_chunk_size == 128 * 1024 - mux.wire.DATA_HEADER_SIZE


def test_solo_chunk_size_given_wins_and_the_message_limit_follows_it() -> None:
    """An explicit solo_chunk_size is announced as is, and the WebSocket then accepts
    messages that large even though max_message_size is smaller (a record must
    always fit in one message)."""
    limits = SessionLimits(max_message_size=64 * 1024, solo_chunk_size=512 * 1024)
    agent = TunnelProtocol(mux.Role.AGENT, limits=limits)
    assert _settings_seen_by_relay(agent).max_chunk_size == 512 * 1024
    relay = TunnelProtocol(mux.Role.RELAY, limits=limits)
    relay.receive_data(_agent_bytes(SETTINGS, OPEN, encode_record(Data(1, b"x" * 200_000))))
    received = [e for e in relay.events_received() if isinstance(e, mux.DataReceived)]
    assert sum(len(e.data) for e in received) == 200_000


def test_session_limits_are_frozen_and_checked_by_the_session() -> None:
    """One SessionLimits is shared by every session of a config: nobody may change
    it; a value out of range is refused when a session is made from it."""
    limits = SessionLimits()
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.initial_window = 1  # type: ignore[misc]
    with pytest.raises(LocalProtocolError, match="initial_window"):
        TunnelProtocol(mux.Role.AGENT, limits=SessionLimits(initial_window=1))


def test_events_received_are_tunnel_events() -> None:
    """Every event a session yields, through a channel's life, a ping and the close,
    is one of the TunnelEvent union (the transport's dispatch covers exactly those)."""
    kinds = typing.get_args(TunnelEvent)
    agent = TunnelProtocol(mux.Role.AGENT, random_bytes=counting_random_bytes())
    relay = TunnelProtocol(mux.Role.RELAY)
    channel_id = agent.open_channel("db", 5432, early_data=b"hello")
    agent.ping(b"p")
    relay.receive_data(agent.data_to_send())
    seen = relay.events_received()
    relay.accept_channel(channel_id)
    relay.send_data(channel_id, b"world")
    relay.send_eof(channel_id)
    agent.receive_data(relay.data_to_send())
    relay.close()
    agent.receive_data(relay.data_to_send())
    seen += agent.events_received()
    relay.receive_data(agent.data_to_send())
    seen += relay.events_received()
    assert {type(e) for e in seen} >= {mux.ChannelOpenRequested, mux.DataReceived,
                                       mux.ChannelOpened, mux.EndOfStream, ws.PongReceived,
                                       ws.CloseReceived, ws.ConnectionClosed}
    assert all(isinstance(e, kinds) for e in seen), [type(e) for e in seen]


def test_a_paced_relay_sends_control_at_once_and_data_when_the_bucket_allows() -> None:
    """Under a rate limit with an empty bucket the relay still answers a ping and an
    OPEN; the DATA queued meanwhile goes once the bucket is refilled."""
    agent = ws.WebSocketConnection(ws.Role.CLIENT, random_bytes=counting_random_bytes())
    agent.send_bytes(SETTINGS)
    agent.send_bytes(OPEN)
    agent.ping(b"still there?")
    relay = TunnelProtocol(mux.Role.RELAY)
    down = mux.TokenBucket(1 << 20, now=0.0)
    down.spend(int(down.tokens) + 1)
    relay.pace(outbound=down)
    relay.receive_data(bytes(agent.data_to_send()))
    relay.events_received()
    relay.accept_channel(1)
    relay.send_data(1, b"x" * 100)

    def output() -> list[object]:
        agent.receive_data(bytes(relay.data_to_send()))
        return [decode_record(bytes(event.data)) if isinstance(event, ws.BytesMessage)
                else event for event in agent.events_received()]

    first = output()
    assert ws.PongReceived(b"still there?") in first
    assert [type(item) for item in first if not isinstance(item, ws.PongReceived)] == [
        Settings, OpenOk]
    assert relay.pacer is not None and relay.pacer.delay() is not None
    relay.pacer.refill(1.0)
    assert output() == [Data(1, b"x" * 100)]


def test_a_closing_paced_protocol_asks_for_no_timed_wake_up() -> None:
    """Once the WebSocket is closing nothing more is framed, so queued DATA must not
    make the writer's timer fire at once (it would spin): paced_delay is None."""
    relay = TunnelProtocol(mux.Role.RELAY)
    relay.pace(outbound=mux.TokenBucket(1 << 20, now=0.0))
    relay.receive_data(_agent_bytes(SETTINGS, OPEN))
    relay.events_received()
    relay.accept_channel(1)
    relay.send_data(1, b"x" * 100)
    assert relay.paced_delay() == 0.0  # (open: the writer pulls at once)
    relay.close()
    relay.data_to_send()
    assert relay.paced_delay() is None
