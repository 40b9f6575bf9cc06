"""The Session's per-chunk fast paths keep the checks of the code they inline.

send_data, receive_record (DATA, WINDOW) and acknowledge each
inline a few calls for the common case (see their comments); these tests
drive exactly those cases to their bounds.
"""

from __future__ import annotations

import struct

import pytest

from tests.mux_helpers import connected_pair, events_of, open_accepted, transfer
from wstunnel.errors import LocalProtocolError
from wstunnel.mux import (
    DEFAULT_INITIAL_WINDOW,
    MAX_WINDOW,
    DataReceived,
    ErrorCode,
    SessionFailed,
    WindowUpdated,
)
from wstunnel.mux.wire import Data, Fin, RecordType, decode_record, encode_record


def test_acknowledging_more_than_received_raises_on_the_batched_path() -> None:
    """While credit is batched, acknowledging past what was received is still our bug."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    agent.send_data(channel_id, b"abc")
    transfer(agent, relay)
    with pytest.raises(LocalProtocolError):
        relay.acknowledge(channel_id, 4)
    with pytest.raises(LocalProtocolError):
        relay.acknowledge(channel_id, -1)
    assert relay.buffered_size == 3
    relay.acknowledge(channel_id, 3)
    assert relay.buffered_size == 0 and relay.next_record() is None  # batched: no WINDOW yet


def test_window_records_are_bounds_checked_on_an_open_send_half() -> None:
    """A zero WINDOW or one lifting credit past MAX_WINDOW fails the session (fast path)."""
    for increment in (0, MAX_WINDOW - DEFAULT_INITIAL_WINDOW + 1):
        agent, relay = connected_pair()
        channel_id = open_accepted(agent, relay)
        agent.receive_record(struct.pack("!BII", RecordType.WINDOW, channel_id, increment))
        assert agent.failure is not None
        [event] = events_of(agent, SessionFailed)
        assert event.code == ErrorCode.FLOW_CONTROL_ERROR


def test_window_up_to_max_window_is_credit_and_reschedules_queued_data() -> None:
    """The largest legal WINDOW is accepted, reported, and wakes a channel that had run dry."""
    agent, relay = connected_pair(max_send_window=MAX_WINDOW)
    channel_id = open_accepted(agent, relay)
    agent.send_data(channel_id, bytes(DEFAULT_INITIAL_WINDOW))
    while agent.next_record() is not None:
        pass
    assert agent.send_capacity(channel_id) == 0
    agent.receive_record(struct.pack("!BII", RecordType.WINDOW, channel_id, MAX_WINDOW))
    assert agent.failure is None
    assert events_of(agent, WindowUpdated) == [WindowUpdated(channel_id, MAX_WINDOW)]
    with pytest.raises(LocalProtocolError):
        agent.send_data(channel_id, bytes(MAX_WINDOW + 1))
    agent.send_data(channel_id, b"more")
    record = agent.next_record()
    assert record is not None and decode_record(record) == Data(channel_id, b"more")


def test_fin_follows_the_last_whole_piece() -> None:
    """send_eof with data queued: the FIN leaves right after the DATA that drains it."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    agent.send_data(channel_id, b"last")
    agent.send_eof(channel_id)
    out = []
    while (record := agent.next_record()) is not None:
        out.append(decode_record(record))
    assert out == [Data(channel_id, b"last"), Fin(channel_id)]


def test_large_payload_of_a_bytearray_record_is_a_read_only_view() -> None:
    """Payloads delivered as views are read-only whatever buffer type the record came in."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    payload = bytes(range(256)) * 32
    for record in (encode_record(Data(channel_id, payload)),
                   bytearray(encode_record(Data(channel_id, payload)))):
        relay.receive_record(record)
        [event] = events_of(relay, DataReceived)
        assert isinstance(event.data, memoryview) and event.data.readonly
        assert bytes(event.data) == payload
        relay.acknowledge(channel_id, len(event.data))
