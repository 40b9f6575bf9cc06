"""The mux Session: records in, events and records out (wstunnel.mux.session, and the
layers it is built on: wstunnel.mux.control, wstunnel.mux.session_state)."""

from __future__ import annotations

import struct

import pytest

from tests.mux_helpers import (
    connected_pair,
    events_of,
    open_accepted,
    pump,
    received_bytes,
    session_pair,
    transfer,
)
from wstunnel.errors import ChannelRefused, FlowControlError, LocalProtocolError, SessionClosed
from wstunnel.mux import (
    DEFAULT_INITIAL_WINDOW,
    DEFAULT_MAX_CHUNK_SIZE,
    DEFAULT_SOLO_CHUNK_SIZE,
    MAX_WINDOW,
    MIN_CHUNK_SIZE,
    MIN_WINDOW,
    ChannelClosed,
    ChannelOpened,
    ChannelOpenFailed,
    ChannelOpenRequested,
    ChannelReset,
    DataReceived,
    EndOfStream,
    ErrorCode,
    GoAwayReceived,
    OpenFailure,
    PeerOpenRefused,
    ResetCode,
    Role,
    Session,
    SessionFailed,
    SettingsReceived,
    WindowUpdated,
)
from wstunnel.mux.wire import (
    Data,
    Fin,
    GoAway,
    Open,
    OpenFailed,
    OpenOk,
    RecordType,
    Reset,
    Settings,
    Window,
    decode_record,
    encode_record,
)

KIB = 1024


def settings_record(**fields: int) -> bytes:
    return encode_record(Settings(**fields))


def failed(session: Session) -> SessionFailed:
    """Assert the session failed cleanly and return its SessionFailed event."""
    assert session.closed and session.failure is not None
    found = events_of(session, SessionFailed)
    assert len(found) == 1
    return found[0]


def last_goaway(session: Session) -> GoAway:
    records = []
    while (record := session.next_record()) is not None:
        records.append(decode_record(record))
    assert isinstance(records[-1], GoAway)
    return records[-1]


# -- settings ------------------------------------------------------------------


def test_settings_is_the_first_record_out() -> None:
    """Each side's first record is SETTINGS with its version, window and the largest
    chunk it accepts (the solo chunk size)."""
    session = Session(Role.AGENT, initial_window=1 << 20)
    session.open_channel("h", 1)
    assert decode_record(session.next_record() or b"") == Settings(1, 1 << 20,
                                                                  DEFAULT_SOLO_CHUNK_SIZE)


def test_settings_exchange_reports_the_peers_values() -> None:
    """Receiving the peer's SETTINGS yields SettingsReceived with its values."""
    agent = Session(Role.AGENT)
    relay = Session(Role.RELAY, initial_window=2 << 20, max_chunk_size=16 * KIB,
                    solo_chunk_size=64 * KIB)
    pump(agent, relay)
    assert agent.events_received() == [SettingsReceived(1, 2 << 20, 64 * KIB)]
    assert relay.events_received() == [
        SettingsReceived(1, DEFAULT_INITIAL_WINDOW, DEFAULT_SOLO_CHUNK_SIZE)]


@pytest.mark.parametrize("first, code", [
    (encode_record(Fin(1)), ErrorCode.PROTOCOL_ERROR),
    (b"\x01\x02", ErrorCode.UNSUPPORTED_VERSION),
    (settings_record(initial_window=MIN_WINDOW - 1), ErrorCode.PROTOCOL_ERROR),
    (settings_record(initial_window=(16 << 20) + 1), ErrorCode.PROTOCOL_ERROR),
    (settings_record(max_chunk_size=MIN_CHUNK_SIZE - 1), ErrorCode.PROTOCOL_ERROR),
    (settings_record(max_chunk_size=(1 << 20) + 1), ErrorCode.PROTOCOL_ERROR),
])
def test_bad_first_record_fails_the_session(first: bytes, code: ErrorCode) -> None:
    """The first record must be SETTINGS of our version with values in the protocol's range."""
    session = Session(Role.RELAY)
    session.receive_record(first)
    assert failed(session).code == code
    assert last_goaway(session).code == code


def test_second_settings_fails_the_session() -> None:
    """SETTINGS is sent exactly once."""
    agent, relay = connected_pair()
    agent.receive_record(settings_record())
    assert failed(agent).code == ErrorCode.PROTOCOL_ERROR


def test_bad_options_are_local_errors() -> None:
    """Options outside the protocol's ranges are refused at construction."""
    for options in ({"initial_window": MIN_WINDOW - 1}, {"initial_window": (16 << 20) + 1},
                    {"max_chunk_size": MIN_CHUNK_SIZE - 1}, {"max_channels": 0},
                    {"max_buffered_size": 1024}, {"quantum": 0}):
        with pytest.raises(LocalProtocolError):
            Session(Role.AGENT, **options)


# -- opening -------------------------------------------------------------------


def test_open_accept_and_exchange_data_both_ways() -> None:
    """A channel opens, carries bytes each way, and reports ChannelOpened to the opener."""
    agent, relay = connected_pair()
    channel_id = agent.open_channel("db.internal", 5432)
    assert channel_id == 1
    pump(agent, relay)
    assert relay.events_received() == [ChannelOpenRequested(1, 1, "db.internal", 5432)]
    relay.accept_channel(1)
    relay.send_data(1, b"pong")
    agent.send_data(1, b"ping")
    pump(agent, relay)
    assert agent.events_received() == [ChannelOpened(1), DataReceived(1, b"pong")]
    assert relay.events_received() == [DataReceived(1, b"ping")]


def test_ids_are_odd_for_the_agent_and_even_for_the_relay() -> None:
    """Agent-opened ids are odd, relay-opened ids even, each increasing."""
    agent, relay = connected_pair()
    assert [agent.open_channel("h", 1) for _ in range(3)] == [1, 3, 5]
    assert [relay.open_channel("h", 1) for _ in range(2)] == [2, 4]


def test_early_data_follows_open_before_any_answer() -> None:
    """DATA rides right behind OPEN, before OPEN_OK and even before the peer's SETTINGS."""
    agent, relay = session_pair()
    channel_id = agent.open_channel("h", 22, early_data=b"SSH-2.0-x\r\n")
    types = [RecordType(record[0]) for record in iter(agent.next_record, None)]
    assert types == [RecordType.SETTINGS, RecordType.OPEN, RecordType.DATA]
    agent2, relay = session_pair()
    agent2.open_channel("h", 22, early_data=b"SSH-2.0-x\r\n")
    transfer(agent2, relay)
    assert relay.events_received()[1:] == [ChannelOpenRequested(channel_id, 1, "h", 22),
                                           DataReceived(channel_id, b"SSH-2.0-x\r\n")]


def test_early_data_is_limited_to_the_minimum_window_before_settings() -> None:
    """Until the peer's SETTINGS arrive the opener may send only MIN_WINDOW, in small chunks."""
    agent, _ = session_pair()
    with pytest.raises(LocalProtocolError):
        agent.open_channel("h", 1, early_data=bytes(MIN_WINDOW + 1))
    channel_id = agent.open_channel("h", 1, early_data=bytes(MIN_WINDOW))
    assert agent.send_capacity(channel_id) == 0
    sizes = [len(r) - 5 for r in iter(agent.next_record, None) if r[0] == RecordType.DATA]
    assert sizes == [MIN_CHUNK_SIZE] * (MIN_WINDOW // MIN_CHUNK_SIZE)


def test_windows_below_the_default_work_from_the_first_byte() -> None:
    """A peer with the smallest window and chunk gets nothing it did not allow, early or late."""
    agent = Session(Role.AGENT)
    relay = Session(Role.RELAY, initial_window=MIN_WINDOW, max_chunk_size=MIN_CHUNK_SIZE,
                    max_window=MIN_WINDOW)
    channel_id = agent.open_channel("h", 1, early_data=bytes(MIN_WINDOW))
    pump(agent, relay)
    assert relay.failure is None and relay.buffered_size == MIN_WINDOW
    relay.accept_channel(channel_id)
    relay.acknowledge(channel_id, MIN_WINDOW)
    pump(agent, relay)
    assert agent.send_capacity(channel_id) == MIN_WINDOW


def test_channels_opened_before_settings_get_the_larger_window_topped_up() -> None:
    """When the peer's SETTINGS announce a bigger window, early channels gain the difference."""
    agent = Session(Role.AGENT)
    relay = Session(Role.RELAY, initial_window=1 << 20)
    channel_id = agent.open_channel("h", 1, early_data=bytes(1000))
    transfer(relay, agent)
    assert WindowUpdated(channel_id, (1 << 20) - 1000) in agent.events_received()
    assert agent.send_capacity(channel_id) == (1 << 20) - 1000


def test_refused_open_reports_the_reason_and_closes() -> None:
    """OPEN_FAILED gives the opener ChannelOpenFailed then ChannelClosed; late data is dropped."""
    agent, relay = connected_pair()
    channel_id = agent.open_channel("h", 1, early_data=b"hello")
    transfer(agent, relay)
    relay.events_received()
    relay.refuse_channel(channel_id, OpenFailure.DNS_FAILURE, "no such host")
    assert relay.events_received() == [ChannelClosed(channel_id)]
    agent.send_eof(channel_id)
    pump(agent, relay)
    assert agent.events_received() == [
        ChannelOpenFailed(channel_id, OpenFailure.DNS_FAILURE, "no such host"),
        ChannelClosed(channel_id)]
    assert relay.events_received() == [] and not relay.closed and not agent.closed


def test_open_with_an_unknown_kind_is_refused_not_fatal() -> None:
    """An OPEN of a kind we do not support gets OPEN_FAILED(UNSUPPORTED_KIND); the
    application hears only that it was refused, not of a channel."""
    agent, relay = connected_pair()
    relay.receive_record(encode_record(Open(1, 9, "h", 1)))
    assert relay.events_received() == [PeerOpenRefused(1, OpenFailure.UNSUPPORTED_KIND)]
    record = decode_record(relay.next_record() or b"")
    assert record.reason == OpenFailure.UNSUPPORTED_KIND  # type: ignore[union-attr]
    assert relay.failure is None


def test_open_channel_validates_its_arguments() -> None:
    """A bad host or port is our bug, raised before anything is queued."""
    agent, _ = connected_pair()
    for host, port in (("", 1), ("h" * 256, 1), ("h", 0), ("h", 70000)):
        with pytest.raises(LocalProtocolError):
            agent.open_channel(host, port)
    assert agent.next_record() is None


def test_accept_and_refuse_only_for_requested_channels() -> None:
    """accept_channel/refuse_channel on our own or an accepted channel is a local error."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    with pytest.raises(LocalProtocolError):
        relay.accept_channel(channel_id)
    with pytest.raises(LocalProtocolError):
        agent.refuse_channel(channel_id, OpenFailure.REFUSED)
    with pytest.raises(LocalProtocolError):
        relay.accept_channel(99)


def test_answering_an_open_the_opener_already_reset_is_a_no_op() -> None:
    """accept/refuse after the opener's RESET (a race with a slow dial) do nothing."""
    agent, relay = connected_pair()
    first = agent.open_channel("h", 1)
    second = agent.open_channel("h", 1)
    pump(agent, relay)
    agent.reset_channel(first)
    agent.reset_channel(second)
    pump(agent, relay)
    relay.events_received()
    relay.accept_channel(first)
    relay.refuse_channel(second, OpenFailure.TIMEOUT)
    assert relay.next_record() is None and relay.events_received() == []
    with pytest.raises(LocalProtocolError):
        relay.reset_channel(2)  # our own id, never opened


# -- half-close, reset, closing -----------------------------------------------


def test_half_close_keeps_the_other_direction_open() -> None:
    """FIN ends one direction; the other still carries data; ChannelClosed after both."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    agent.send_data(channel_id, b"request")
    agent.send_eof(channel_id)
    agent.send_eof(channel_id)  # idempotent
    pump(agent, relay)
    assert relay.events_received() == [DataReceived(channel_id, b"request"),
                                       EndOfStream(channel_id)]
    with pytest.raises(LocalProtocolError):
        agent.send_data(channel_id, b"more")
    relay.send_data(channel_id, b"response")
    relay.send_eof(channel_id)
    assert relay.events_received() == []  # the FIN waits behind the queued data
    pump(agent, relay)
    assert relay.events_received() == [ChannelClosed(channel_id)]
    assert agent.events_received() == [DataReceived(channel_id, b"response"),
                                       EndOfStream(channel_id), ChannelClosed(channel_id)]
    assert agent.channel_ids() == [] and relay.channel_ids() == []


def test_fin_does_not_overtake_queued_data() -> None:
    """A FIN queued behind data waiting for credit leaves only after that data."""
    agent, relay = connected_pair(solo_chunk_size=DEFAULT_MAX_CHUNK_SIZE)
    channel_id = open_accepted(agent, relay)
    agent.send_data(channel_id, bytes(DEFAULT_INITIAL_WINDOW))
    agent.send_eof(channel_id)
    pump(agent, relay)
    events = relay.events_received()
    assert len(received_bytes(events, channel_id)) == DEFAULT_INITIAL_WINDOW
    assert EndOfStream(channel_id) in events  # the data fitted the window exactly
    agent2, relay2 = connected_pair(solo_chunk_size=DEFAULT_MAX_CHUNK_SIZE)
    channel_id = open_accepted(agent2, relay2)
    agent2.send_data(channel_id, bytes(DEFAULT_INITIAL_WINDOW))
    relay2.receive_record(agent2.next_record() or b"")  # one chunk only
    agent2.send_eof(channel_id)
    types = [record[0] for record in iter(agent2.next_record, None)]
    assert types[-1] == RecordType.FIN and set(types[:-1]) == {RecordType.DATA}


def test_reset_discards_queued_data_and_goes_first() -> None:
    """RESET drops what is still queued and leaves before any other DATA."""
    agent, relay = connected_pair()
    first = open_accepted(agent, relay)
    second = open_accepted(agent, relay)
    agent.send_data(first, bytes(100 * KIB))
    agent.send_data(second, b"keep")
    agent.reset_channel(first, ResetCode.CONNECTION_RESET, "peer reset")
    assert agent.events_received() == [ChannelClosed(first)]
    assert decode_record(agent.next_record() or b"") == Reset(first, 2, "peer reset")
    assert decode_record(agent.next_record() or b"") == Data(second, b"keep")
    assert agent.next_record() is None
    agent.reset_channel(first)  # already gone: no-op
    with pytest.raises(LocalProtocolError):
        agent.reset_channel(1001)  # never opened


def test_reset_after_data_delivers_the_queued_bytes_then_the_reset() -> None:
    """reset_channel(after_data=True): what was queued arrives, then the RESET, no FIN,
    and the channel takes no more data meanwhile."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    other = open_accepted(agent, relay)
    payload = bytes(range(256)) * 400  # several chunks
    agent.send_data(channel_id, payload)
    agent.reset_channel(channel_id, ResetCode.CONNECTION_RESET, "reset by the client",
                        after_data=True)
    assert agent.send_capacity(channel_id) == 0
    with pytest.raises(LocalProtocolError):
        agent.send_data(channel_id, b"more")
    agent.send_data(other, b"still open")
    pump(agent, relay)
    events = relay.events_received()
    assert received_bytes(events, channel_id) == payload
    assert not any(isinstance(e, EndOfStream) for e in events)
    resets = [e for e in events if isinstance(e, ChannelReset)]
    assert resets == [ChannelReset(channel_id, ResetCode.CONNECTION_RESET, "reset by the client")]
    last_data = max(i for i, e in enumerate(events)
                    if isinstance(e, DataReceived) and e.channel_id == channel_id)
    assert events.index(resets[0]) > last_data
    assert received_bytes(events, other) == b"still open"
    assert ChannelClosed(channel_id) in agent.events_received()


def test_reset_after_data_with_nothing_queued_is_immediate() -> None:
    """With no queued data, after_data changes nothing: the RESET goes at once."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    agent.reset_channel(channel_id, ResetCode.CONNECTION_RESET, after_data=True)
    assert agent.events_received() == [ChannelClosed(channel_id)]
    assert decode_record(agent.next_record() or b"") == Reset(channel_id, 2, "")


def test_peer_reset_cancels_a_pending_reset_after_data() -> None:
    """A RESET from the peer while ours waits behind data: the channel ends once, and
    our late RESET is never sent."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    agent.send_data(channel_id, b"x" * 1000)
    agent.reset_channel(channel_id, after_data=True)
    relay.reset_channel(channel_id, ResetCode.TIMEOUT)
    transfer(relay, agent)
    assert agent.events_received() == [ChannelReset(channel_id, ResetCode.TIMEOUT, ""),
                                       ChannelClosed(channel_id)]
    records = [decode_record(r) for r in iter(agent.next_record, None)]
    assert not any(isinstance(r, Reset) for r in records)


def test_peer_reset_reports_code_and_text() -> None:
    """A RESET from the peer gives ChannelReset then ChannelClosed."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    relay.reset_channel(channel_id, ResetCode.TIMEOUT, "idle")
    pump(agent, relay)
    assert agent.events_received() == [ChannelReset(channel_id, ResetCode.TIMEOUT, "idle"),
                                       ChannelClosed(channel_id)]


def test_local_calls_on_a_gone_channel() -> None:
    """After close: acknowledge and reset are no-ops, sending is a local error, capacity 0."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    relay.send_data(channel_id, b"abc")
    relay.reset_channel(channel_id)
    pump(agent, relay)
    agent.acknowledge(channel_id, 3)
    agent.reset_channel(channel_id)
    assert agent.send_capacity(channel_id) == 0
    with pytest.raises(LocalProtocolError):
        agent.send_data(channel_id, b"x")
    with pytest.raises(LocalProtocolError):
        agent.send_eof(channel_id)
    with pytest.raises(LocalProtocolError):
        agent.acknowledge(77, 1)


# -- flow control ---------------------------------------------------------------


def test_credit_returns_only_when_the_application_acknowledges() -> None:
    """Without acknowledge the sender stalls at the window; acknowledging reopens it."""
    agent, relay = connected_pair(max_window=DEFAULT_INITIAL_WINDOW)  # no auto-tuning
    channel_id = open_accepted(agent, relay)
    agent.send_data(channel_id, bytes(DEFAULT_INITIAL_WINDOW))
    assert agent.send_capacity(channel_id) == 0
    pump(agent, relay)
    assert relay.buffered_size == DEFAULT_INITIAL_WINDOW
    assert agent.send_capacity(channel_id) == 0
    relay.acknowledge(channel_id, DEFAULT_INITIAL_WINDOW)
    pump(agent, relay)
    assert agent.events_received()[-1] == WindowUpdated(channel_id, DEFAULT_INITIAL_WINDOW)
    assert relay.buffered_size == 0


def test_window_updates_are_batched() -> None:
    """Acknowledging chunk by chunk sends one WINDOW per quarter window, not one per chunk."""
    agent, relay = connected_pair(solo_chunk_size=DEFAULT_MAX_CHUNK_SIZE)
    channel_id = open_accepted(agent, relay)
    agent.send_data(channel_id, bytes(DEFAULT_INITIAL_WINDOW))
    windows = 0
    while (record := agent.next_record()) is not None:
        relay.receive_record(record)
        for event in events_of(relay, DataReceived):
            relay.acknowledge(channel_id, len(event.data))
        while (back := relay.next_record()) is not None:
            windows += back[0] == RecordType.WINDOW
            agent.receive_record(back)
    chunks = DEFAULT_INITIAL_WINDOW // DEFAULT_MAX_CHUNK_SIZE
    assert windows == 4 and chunks == 16


def test_send_past_capacity_is_a_local_error() -> None:
    """send_data beyond send_capacity raises and queues nothing."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    with pytest.raises(LocalProtocolError):
        agent.send_data(channel_id, bytes(DEFAULT_INITIAL_WINDOW + 1))
    assert agent.send_capacity(channel_id) == DEFAULT_INITIAL_WINDOW
    assert agent.next_record() is None


def test_receiving_past_the_window_fails_the_session() -> None:
    """DATA beyond the granted window is a FlowControlError: GOAWAY(FLOW_CONTROL_ERROR)."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    chunk = encode_record(Data(channel_id, bytes(DEFAULT_MAX_CHUNK_SIZE)))
    for _ in range(DEFAULT_INITIAL_WINDOW // DEFAULT_MAX_CHUNK_SIZE):
        relay.receive_record(chunk)
    assert relay.failure is None
    relay.receive_record(encode_record(Data(channel_id, b"!")))
    assert isinstance(relay.failure, FlowControlError)
    assert failed(relay).code == ErrorCode.FLOW_CONTROL_ERROR


def test_window_beyond_max_window_fails_the_session() -> None:
    """A WINDOW lifting the credit above MAX_WINDOW is a flow-control error."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    agent.receive_record(encode_record(Window(channel_id, MAX_WINDOW)))
    assert failed(agent).code == ErrorCode.FLOW_CONTROL_ERROR


def _stream(agent: Session, relay: Session, channel_id: int, size: int) -> None:
    """Send ``size`` bytes as fast as credit allows; the relay reads everything at once."""
    while size:
        chunk = min(size, agent.send_capacity(channel_id))
        agent.send_data(channel_id, bytes(chunk))
        size -= chunk
        transfer(agent, relay)
        relay.acknowledge(channel_id, relay.buffered_size)
        transfer(relay, agent)


def test_window_grows_when_it_limits_the_channel_up_to_max_window() -> None:
    """A sender starved of credit while the reader keeps up gets a doubled window, to max_window."""
    agent, relay = connected_pair(max_window=4 * DEFAULT_INITIAL_WINDOW)
    channel_id = open_accepted(agent, relay)
    _stream(agent, relay, channel_id, 20 * DEFAULT_INITIAL_WINDOW)
    assert agent.failure is None and relay.failure is None
    assert agent.send_capacity(channel_id) == 4 * DEFAULT_INITIAL_WINDOW
    assert relay.window_growth == 3 * DEFAULT_INITIAL_WINDOW


def test_window_growth_stays_within_an_eighth_of_max_buffered_size() -> None:
    """All growth together is bounded by max_buffered_size // 8, and freed with the channel
    (when max_buffered_size covers every channel at initial_window)."""
    budget = 8 * DEFAULT_INITIAL_WINDOW
    agent, relay = connected_pair(max_buffered_size=8 * budget, max_window=MAX_WINDOW,
                                  max_channels=64)
    channel_id = open_accepted(agent, relay)
    _stream(agent, relay, channel_id, 40 * DEFAULT_INITIAL_WINDOW)
    assert relay.window_growth == budget
    assert agent.send_capacity(channel_id) == DEFAULT_INITIAL_WINDOW + budget
    relay.reset_channel(channel_id)
    assert relay.window_growth == 0


def test_oversized_data_fails_the_session() -> None:
    """A DATA payload above our announced max chunk size is a record-size error."""
    agent, relay = connected_pair(initial_window=1 << 20)
    channel_id = open_accepted(agent, relay)
    relay.receive_record(encode_record(Data(channel_id, bytes(DEFAULT_SOLO_CHUNK_SIZE))))
    assert relay.failure is None  # the solo size itself is fine
    relay.receive_record(encode_record(Data(channel_id, bytes(DEFAULT_SOLO_CHUNK_SIZE + 1))))
    assert failed(relay).code == ErrorCode.RECORD_SIZE_ERROR


def test_data_is_cut_into_chunks_of_the_smaller_max_chunk_size() -> None:
    """Chunks never exceed the smaller of our and the peer's max chunk size."""
    agent = Session(Role.AGENT, max_chunk_size=64 * KIB, solo_chunk_size=64 * KIB)
    relay = Session(Role.RELAY, max_chunk_size=32 * KIB, solo_chunk_size=32 * KIB)
    pump(agent, relay)
    channel_id = open_accepted(agent, relay)
    agent.send_data(channel_id, bytes(100 * KIB))
    sizes = [len(r) - 5 for r in iter(agent.next_record, None)]
    assert sizes == [32 * KIB, 32 * KIB, 32 * KIB, 4 * KIB]


def test_buffered_bytes_are_bounded_by_max_buffered_size() -> None:
    """Unacknowledged bytes never exceed max_buffered_size: OPENs past it are refused
    (here max_buffered_size covers max_channels x initial_window)."""
    bound = 4 * DEFAULT_INITIAL_WINDOW
    agent = Session(Role.AGENT)
    relay = Session(Role.RELAY, max_buffered_size=bound + 1000, max_channels=4)
    pump(agent, relay)
    opened = []
    for _ in range(6):
        channel_id = agent.open_channel("h", 1)
        agent.send_data(channel_id, bytes(agent.send_capacity(channel_id)))
        opened.append(channel_id)
    pump(agent, relay)
    events = relay.events_received()
    assert [e.channel_id for e in events if isinstance(e, ChannelOpenRequested)] == opened[:4]
    assert relay.buffered_size == bound <= relay.max_buffered_size
    refused = [e for e in agent.events_received() if isinstance(e, ChannelOpenFailed)]
    assert [(e.channel_id, e.reason) for e in refused] == [
        (cid, OpenFailure.LIMIT_REACHED) for cid in opened[4:]]
    for channel_id in opened[:4]:  # no more credit anywhere: nothing else can arrive
        assert agent.send_capacity(channel_id) == 0
    with pytest.raises(ChannelRefused):
        relay.open_channel("h", 1)


# -- records that do not fit the state ------------------------------------------


@pytest.mark.parametrize("record", [
    encode_record(Open(2, 1, "h", 1)),      # relay parity sent to the relay
    encode_record(Open(1, 1, "h", 1)),      # reused id (1 is already open)
    encode_record(Data(5, b"x")),           # never opened
    encode_record(Fin(4)),                  # never opened, our parity
    encode_record(OpenOk(1)),               # OPEN_OK for a channel we did not open
    encode_record(Window(0, 1)),            # channel 0 does not exist
], ids=["parity", "reuse", "unknown-data", "unknown-fin", "open-ok-for-theirs", "zero"])
def test_records_that_break_the_id_rules_fail_the_session(record: bytes) -> None:
    """Wrong parity, reused ids and ids never opened are protocol errors."""
    agent, relay = connected_pair()
    open_accepted(agent, relay)
    relay.receive_record(record)
    assert failed(relay).code == ErrorCode.PROTOCOL_ERROR


def test_data_after_fin_fails_the_session() -> None:
    """Once the peer sent FIN on a live channel, more DATA from it is an error."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    relay.receive_record(encode_record(Fin(channel_id)))
    relay.receive_record(encode_record(Data(channel_id, b"late")))
    assert failed(relay).code == ErrorCode.PROTOCOL_ERROR


def test_data_before_open_ok_fails_the_session() -> None:
    """The acceptor may not send DATA before OPEN_OK."""
    agent, relay = connected_pair()
    channel_id = agent.open_channel("h", 1)
    agent.receive_record(encode_record(Data(channel_id, b"early")))
    assert failed(agent).code == ErrorCode.PROTOCOL_ERROR


# -- legal races -------------------------------------------------------------------


def test_records_after_our_reset_are_dropped() -> None:
    """DATA, WINDOW, FIN and RESET for a channel we reset are a race, silently dropped."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    relay.send_data(channel_id, b"in flight")
    agent.send_data(channel_id, bytes(DEFAULT_INITIAL_WINDOW))
    pump(agent, relay)
    relay.acknowledge(channel_id, DEFAULT_INITIAL_WINDOW)  # a WINDOW now in flight
    relay.send_eof(channel_id)
    agent.reset_channel(channel_id)
    relay.reset_channel(channel_id)  # RESET crossing RESET
    agent.events_received()
    pump(agent, relay)
    assert agent.events_received() == [] and agent.failure is None
    assert relay.failure is None


def test_window_after_our_fin_is_accepted() -> None:
    """Credit for data sent before our FIN may arrive after it; it is ignored."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    agent.send_data(channel_id, bytes(DEFAULT_INITIAL_WINDOW))
    agent.send_eof(channel_id)
    pump(agent, relay)
    relay.acknowledge(channel_id, DEFAULT_INITIAL_WINDOW)  # WINDOW after FIN: useless, so...
    assert relay.next_record() is None  # ...not even sent once the peer's FIN arrived
    agent.receive_record(encode_record(Window(channel_id, 1000)))  # a peer may still send it
    assert agent.failure is None


def test_open_after_our_goaway_is_refused_not_fatal() -> None:
    """An OPEN crossing our GOAWAY gets OPEN_FAILED(GOING_AWAY), and no channel."""
    agent, relay = connected_pair()
    relay.go_away()
    channel_id = agent.open_channel("h", 1, early_data=b"x")
    pump(agent, relay)
    assert relay.events_received() == [PeerOpenRefused(channel_id, OpenFailure.GOING_AWAY)]
    events = agent.events_received()
    assert GoAwayReceived(0, "", 0) in events
    assert ChannelOpenFailed(channel_id, OpenFailure.GOING_AWAY, "it crossed the peer's GOAWAY",
                             retry_data=b"x", retry_eof=False) in events
    assert relay.failure is None and agent.failure is None


def test_a_goaway_refuses_our_opens_above_its_last_id_at_once() -> None:
    """GOAWAY(last id) promises the peer never acts on our OPENs above that id: they
    are refused with GOING_AWAY (bytes handed back) as the GOAWAY is read, without
    waiting for the peer's OPEN_FAILED, which a peer that closes at once never sends.
    OPENs it had received are left to finish; its late OPEN_FAILED is dropped."""
    agent, relay = connected_pair()
    received = agent.open_channel("h", 1, early_data=b"seen")
    pump(agent, relay)
    crossed = agent.open_channel("h", 2, early_data=b"crossed")
    while agent.next_record() is not None:  # (on the wire, not read by the peer yet)
        pass
    agent.receive_record(encode_record(GoAway(received, 0, "stopping")))
    events = agent.events_received()
    assert events[0] == GoAwayReceived(0, "stopping", received)
    assert events[1:] == [
        ChannelOpenFailed(crossed, OpenFailure.GOING_AWAY, "it crossed the peer's GOAWAY",
                          retry_data=b"crossed", retry_eof=False),
        ChannelClosed(crossed)]
    agent.receive_record(encode_record(wire_open_failed(crossed, OpenFailure.GOING_AWAY)))
    assert agent.events_received() == [] and agent.failure is None
    relay.accept_channel(received)
    pump(agent, relay)
    assert ChannelOpened(received) in agent.events_received()


def test_data_and_fin_sent_before_a_going_away_refusal_are_handed_back() -> None:
    """An OPEN refused with GOING_AWAY was never acted on: every byte the opener gave
    the channel (the chunks already sent right behind the OPEN, and what is still
    queued for want of credit) comes back in order with the refusal, and whether
    it sent EOF, so the same connection can be opened on another session."""
    agent, relay = connected_pair()
    relay.go_away()
    sent = bytes(range(256)) * (DEFAULT_INITIAL_WINDOW // 256)  # (one whole window)
    channel_id = agent.open_channel("h", 1, early_data=sent[:1000])
    agent.send_data(channel_id, sent[1000:])
    agent.send_eof(channel_id)
    while agent.next_record() is not None:  # (on the wire, past the GOAWAY...)
        pass
    assert agent.held_size >= len(sent)  # ...and kept, counted in the outbound budget
    agent.receive_record(encode_record(GoAway(0, 0, "")))
    agent.receive_record(encode_record(wire_open_failed(channel_id, OpenFailure.GOING_AWAY)))
    [refused] = events_of(agent, ChannelOpenFailed)
    assert (refused.retry_data, refused.retry_eof) == (sent, True)
    assert agent.held_size == 0


def test_data_still_queued_at_a_going_away_refusal_is_handed_back_too() -> None:
    """Bytes the opener queued beyond the credit (not sent yet) follow the sent ones."""
    agent, relay = connected_pair()
    relay.go_away()
    channel_id = agent.open_channel("h", 1, early_data=b"first ")
    transfer(agent, relay)  # (OPEN and the first bytes out; the refusal not read yet)
    agent.send_data(channel_id, b"then more")
    transfer(relay, agent)
    [refused] = events_of(agent, ChannelOpenFailed)
    assert (refused.retry_data, refused.retry_eof) == (b"first then more", False)


def test_data_kept_for_a_retry_is_freed_when_the_open_is_accepted() -> None:
    """Once the peer accepts the OPEN the early bytes are no longer kept: the outbound
    budget is back to what is queued (nothing)."""
    agent, relay = connected_pair()
    channel_id = agent.open_channel("h", 1, early_data=bytes(50_000))
    agent.send_eof(channel_id)
    pump(agent, relay)
    assert agent.held_size >= 50_000
    relay.accept_channel(channel_id)
    pump(agent, relay)
    assert agent.held_size == 0
    assert ChannelOpened(channel_id) in agent.events_received()


def test_other_refusals_hand_nothing_back() -> None:
    """Any reason but GOING_AWAY is final (the peer may have acted on the OPEN)."""
    agent, relay = connected_pair()
    channel_id = agent.open_channel("h", 1, early_data=b"data")
    pump(agent, relay)
    relay.refuse_channel(channel_id, OpenFailure.REFUSED, "connection refused")
    pump(agent, relay)
    [refused] = events_of(agent, ChannelOpenFailed)
    assert (refused.retry_data, refused.retry_eof) == (None, False)
    assert agent.held_size == 0


def test_no_more_than_the_window_is_kept_for_a_retry() -> None:
    """The peer returned credit before answering: it read the early bytes, so the
    keeping stops there (what is kept stays within one window) and a later
    GOING_AWAY hands nothing back."""
    agent, relay = connected_pair()
    window = DEFAULT_INITIAL_WINDOW
    channel_id = agent.open_channel("h", 1, early_data=bytes(window))
    pump(agent, relay)
    relay.acknowledge(channel_id, window)  # (WINDOW before OPEN_OK: allowed)
    pump(agent, relay)
    agent.send_data(channel_id, b"more")
    pump(agent, relay)
    assert agent.held_size == 0
    agent.receive_record(encode_record(wire_open_failed(channel_id, OpenFailure.GOING_AWAY)))
    [refused] = events_of(agent, ChannelOpenFailed)
    assert refused.retry_data is None


def wire_open_failed(channel_id: int, reason: OpenFailure) -> OpenFailed:
    return OpenFailed(channel_id, reason, reason.name)


# -- going away, failure --------------------------------------------------------------


def test_goaway_lets_existing_channels_finish_then_closes() -> None:
    """After GOAWAY no side opens channels; open ones finish; then both are closed."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    agent.go_away(0, "shutting down")
    pump(agent, relay)
    assert relay.events_received() == [GoAwayReceived(0, "shutting down", 0)]
    for session in (agent, relay):
        with pytest.raises(SessionClosed):
            session.open_channel("h", 1)
        assert not session.closed
    relay.send_data(channel_id, b"last words")
    relay.send_eof(channel_id)
    agent.send_eof(channel_id)
    pump(agent, relay)
    assert received_bytes(agent.events_received(), channel_id) == b"last words"
    assert agent.closed and relay.closed and agent.failure is None


def test_failure_is_terminal() -> None:
    """After a violation: one SessionFailed, only SETTINGS/GOAWAY out, input ignored."""
    relay = Session(Role.RELAY)
    relay.receive_record(encode_record(Fin(1)))
    event = failed(relay)
    assert event.code == ErrorCode.PROTOCOL_ERROR and "first record" in event.text
    records = [decode_record(r) for r in iter(relay.next_record, None)]
    assert isinstance(records[0], Settings)  # the peer still sees a well-formed stream
    assert records[1] == GoAway(0, ErrorCode.PROTOCOL_ERROR, "protocol error")
    relay.receive_record(settings_record())
    assert relay.events_received() == [] and not relay.wants_to_send()
    with pytest.raises(SessionClosed):
        relay.open_channel("h", 1)
    with pytest.raises(SessionClosed):
        relay.send_data(1, b"x")


def test_goaway_text_never_carries_our_exception_message() -> None:
    """The peer learns the error code only, not our diagnostic text."""
    agent, relay = connected_pair()
    relay.receive_record(encode_record(Data(99, b"x")))
    assert "99" in failed(relay).text
    assert last_goaway(relay).text == "protocol error"


# -- scheduling ----------------------------------------------------------------------


def test_control_records_go_before_data() -> None:
    """OPEN, WINDOW, FIN and RESET leave ahead of DATA queued earlier."""
    agent, relay = connected_pair(solo_chunk_size=DEFAULT_MAX_CHUNK_SIZE)
    bulk = open_accepted(agent, relay)
    agent.send_data(bulk, bytes(64 * KIB))
    agent.next_record()
    agent.open_channel("h", 1)
    assert agent.next_record()[0] == RecordType.OPEN  # type: ignore[index]
    assert agent.next_record()[0] == RecordType.DATA  # type: ignore[index]


def test_wants_to_send_matches_next_record() -> None:
    """wants_to_send() is true exactly when next_record() has something."""
    agent, relay = connected_pair()
    assert not agent.wants_to_send() and agent.next_record() is None
    channel_id = open_accepted(agent, relay)
    agent.send_data(channel_id, b"x")
    assert agent.wants_to_send()
    agent.next_record()
    assert not agent.wants_to_send()


def test_send_data_copies_mutable_buffers_and_keeps_bytes() -> None:
    """A bytearray is copied at send_data, so later changes do not leak onto the wire."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    buffer = bytearray(b"original")
    agent.send_data(channel_id, buffer)
    buffer[:] = b"mutated!"
    agent.send_data(channel_id, memoryview(b"view"))
    pump(agent, relay)
    assert received_bytes(relay.events_received(), channel_id) == b"originalview"


def test_receive_record_accepts_any_bytes_like() -> None:
    """A record may arrive as bytearray or memoryview."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    relay.receive_record(bytearray(encode_record(Data(channel_id, b"ab"))))
    relay.receive_record(memoryview(encode_record(Data(channel_id, b"cd"))))
    assert received_bytes(relay.events_received(), channel_id) == b"abcd"


def test_a_small_write_overtakes_100_mib_of_bulk_within_two_chunks() -> None:
    """With 100 MiB queued on one channel, 64 bytes on another leave within two chunks."""
    window = 16 << 20
    agent, relay = connected_pair(initial_window=window)
    bulk = open_accepted(agent, relay)
    small = open_accepted(agent, relay)
    blob = memoryview(bytes(window))
    total, queued, probes = 100 << 20, 0, 0
    sent_chunks = 0
    while queued < total or agent.wants_to_send():
        room = min(agent.send_capacity(bulk), total - queued)
        if room:
            agent.send_data(bulk, blob[:room])
            queued += room
        if sent_chunks % 5 == 3:  # probe at many points of the transfer
            agent.send_data(small, b"p" * 64)
            probes += 1
            records = [agent.next_record() or b"" for _ in range(2)]
            assert small in [struct.unpack_from("!I", record, 1)[0] for record in records]
            for record in records:
                relay.receive_record(record)
            for event in events_of(relay, DataReceived):
                relay.acknowledge(event.channel_id, len(event.data))
            transfer(relay, agent)
            sent_chunks += 2
            continue
        record = agent.next_record()
        if record is None:
            break
        relay.receive_record(record)
        for event in events_of(relay, DataReceived):
            relay.acknowledge(event.channel_id, len(event.data))
        transfer(relay, agent)
        sent_chunks += 1
    assert queued == total and probes > 20  # (1 MiB solo chunks: ~100 of them)


def test_a_write_size_below_the_chunk_size_cuts_small_chunks_and_ends_turns() -> None:
    """next_record(max_size) caps DATA at max_size and hands the turn on after each chunk."""
    agent, relay = connected_pair(quantum=4 * DEFAULT_MAX_CHUNK_SIZE)
    first = open_accepted(agent, relay)
    second = open_accepted(agent, relay)
    agent.send_data(first, bytes(10 * KIB))
    agent.send_data(second, bytes(10 * KIB))
    cut = [(struct.unpack_from("!I", r, 1)[0], len(r) - 5)
           for r in iter(lambda: agent.next_record(4 * KIB), None)]
    assert cut == [(first, 4 * KIB), (second, 4 * KIB)] * 2 + [(first, 2 * KIB),
                                                               (second, 2 * KIB)]
    agent.send_data(first, bytes(40 * KIB))
    agent.send_data(second, bytes(40 * KIB))
    # both came in with empty queues: one chunk each first (fresh), then first's
    # 64 KiB turn takes its remaining 24 KiB, then second alone: one solo chunk
    assert [len(r) - 5 for r in iter(agent.next_record, None)] == [16 * KIB, 16 * KIB, 16 * KIB,
                                                                   8 * KIB, 24 * KIB]


def test_grown_windows_shrink_back_once_another_channel_is_live() -> None:
    """Only a channel alone grows its window; in company it returns to initial_window."""
    agent, relay = connected_pair()
    bulk = open_accepted(agent, relay)
    _stream(agent, relay, bulk, 40 * DEFAULT_INITIAL_WINDOW)
    assert relay.window_growth > 0
    open_accepted(agent, relay)
    _stream(agent, relay, bulk, 40 * DEFAULT_INITIAL_WINDOW)
    assert relay.window_growth == 0
    assert agent.send_capacity(bulk) == DEFAULT_INITIAL_WINDOW
    assert agent.failure is None and relay.failure is None


def test_a_failed_session_holds_no_window_growth() -> None:
    """Failure ends every channel at once: their grown windows go back to the pool."""
    agent, relay = connected_pair()
    bulk = open_accepted(agent, relay)
    _stream(agent, relay, bulk, 40 * DEFAULT_INITIAL_WINDOW)
    assert relay.window_growth > 0
    relay.receive_record(b"\xff")  # an unknown record type
    assert relay.failure is not None and relay.channel_ids() == []
    assert relay.window_growth == 0


# -- solo chunks -----------------------------------------------------------------


def test_a_channel_alone_sends_one_record_per_write() -> None:
    """Alone, a channel's chunk is as big as the write (max_size), the peer's limit
    and its credit allow: one record per write instead of one per 16 KiB."""
    agent, relay = connected_pair(initial_window=4 << 20)
    bulk = open_accepted(agent, relay)
    agent.send_data(bulk, bytes(1 << 20))
    sizes = [len(r) - 5 for r in iter(lambda: agent.next_record(256 * KIB), None)]
    assert sizes == [256 * KIB] * 4
    agent.send_data(bulk, bytes(100 * KIB))
    assert [len(r) - 5 for r in iter(lambda: agent.next_record(64 * KIB), None)] == \
        [64 * KIB, 36 * KIB]


def test_solo_chunks_stop_as_soon_as_another_channel_is_ready() -> None:
    """The next cut after a second channel becomes ready is a fair-sized chunk, and the
    newcomer is served right after it."""
    agent, relay = connected_pair(initial_window=4 << 20)
    bulk = open_accepted(agent, relay)
    small = open_accepted(agent, relay)
    agent.send_data(bulk, bytes(2 << 20))
    first = agent.next_record(256 * KIB) or b""
    assert len(first) - 5 == 256 * KIB
    agent.send_data(small, b"p" * 64)
    cut = [(struct.unpack_from("!I", r, 1)[0], len(r) - 5)
           for r in (agent.next_record(256 * KIB) for _ in range(3)) if r]
    # the newcomer's queue was empty: it goes first (fresh), then bulk is alone again
    assert cut == [(small, 64), (bulk, 256 * KIB), (bulk, 256 * KIB)]


def test_solo_chunks_respect_a_peer_that_accepts_less() -> None:
    """A peer announcing 16 KiB (an older wstunnel) never gets a bigger DATA."""
    agent = Session(Role.AGENT, initial_window=4 << 20)
    relay = Session(Role.RELAY, initial_window=4 << 20, solo_chunk_size=DEFAULT_MAX_CHUNK_SIZE)
    pump(agent, relay)
    bulk = open_accepted(agent, relay)
    agent.send_data(bulk, bytes(100 * KIB))
    sizes = [len(r) - 5 for r in iter(lambda: agent.next_record(256 * KIB), None)]
    assert max(sizes) == DEFAULT_MAX_CHUNK_SIZE and sum(sizes) == 100 * KIB


def test_solo_chunk_size_is_checked() -> None:
    with pytest.raises(LocalProtocolError, match="solo_chunk_size"):
        Session(Role.AGENT, max_chunk_size=32 * KIB, solo_chunk_size=16 * KIB)


def test_competing_channels_share_a_fast_write_in_halves_and_a_slow_one_in_chunks() -> None:
    """Chunks follow the write size: two turns per 256 KiB write on a fast link, the
    configured chunk (16 KiB) once writes are small; every channel gets the same bytes."""
    agent, relay = connected_pair(initial_window=4 << 20)
    channels = [open_accepted(agent, relay) for _ in range(4)]
    for channel_id in channels:
        agent.send_data(channel_id, bytes(1 << 20))

    def cut(max_size: int, count: int) -> list[tuple[int, int]]:
        return [(struct.unpack_from("!I", r, 1)[0], len(r) - 5)
                for r in (agent.next_record(max_size) for _ in range(count)) if r]

    fast = cut(256 * KIB, 8)
    assert [size for _, size in fast] == [128 * KIB] * 8
    assert [channel for channel, _ in fast] == channels * 2
    slow = cut(48 * KIB, 8)
    assert [size for _, size in slow] == [DEFAULT_MAX_CHUNK_SIZE] * 8
    assert sorted(channel for channel, _ in slow) == sorted(channels * 2)


def test_a_keystroke_goes_next_however_many_channels_are_busy() -> None:
    """A write on a channel whose queue was empty is the next record out, even with 16
    bulk channels competing (new-flow priority); its wait does not grow with their number."""
    agent, relay = connected_pair(initial_window=4 << 20, max_queued_size=32 << 20)
    bulk = [open_accepted(agent, relay) for _ in range(16)]
    ssh = open_accepted(agent, relay)
    for channel_id in bulk:
        agent.send_data(channel_id, bytes(1 << 20))
    for _ in range(16):  # each bulk channel's own first chunk ahead (they started fresh)
        agent.next_record(256 * KIB)
    for probe in range(20):
        for _ in range(probe % 7):
            assert agent.next_record(256 * KIB) is not None
        agent.send_data(ssh, b"k" * 64)
        record = agent.next_record(256 * KIB) or b""
        assert struct.unpack_from("!I", record, 1)[0] == ssh and len(record) == 5 + 64


def test_more_data_on_a_backlogged_channel_does_not_jump_the_queue() -> None:
    """Only an empty queue makes a channel fresh: adding to a backlog keeps its place."""
    agent, relay = connected_pair(initial_window=1 << 20,
                                  solo_chunk_size=DEFAULT_MAX_CHUNK_SIZE)
    first = open_accepted(agent, relay)
    second = open_accepted(agent, relay)
    agent.send_data(first, bytes(64 * KIB))
    agent.send_data(second, bytes(64 * KIB))
    agent.next_record()  # first's fresh chunk; then second's
    agent.next_record()
    agent.send_data(second, bytes(64 * KIB))  # second still has 48 KiB queued
    order = [struct.unpack_from("!I", agent.next_record() or b"", 1)[0] for _ in range(2)]
    assert order == [first, second]


def test_a_solo_chunk_gathers_several_queued_pieces() -> None:
    """Pieces queued by several reads leave as one record when the channel is alone,
    in order, and a FIN queued behind them follows that record."""
    agent, relay = connected_pair(initial_window=1 << 20)
    channel_id = open_accepted(agent, relay)
    pieces = [bytes([i]) * (3000 + i) for i in range(5)]
    for piece in pieces:
        agent.send_data(channel_id, piece)
    agent.send_eof(channel_id)
    records = [decode_record(r) for r in iter(lambda: agent.next_record(256 * KIB), None)]
    assert records == [Data(channel_id, b"".join(pieces)), Fin(channel_id)]


def test_opens_the_session_refuses_by_itself_are_counted_by_reason() -> None:
    """OPENs past max_channels and OPENs that crossed our GOAWAY never reach the
    application as channels; ``refused_opens`` counts them by reason, for the relay's
    metrics, and each is reported as it happens (PeerOpenRefused), so that the relay
    logs it without polling every session."""
    relay = Session(Role.RELAY, max_channels=2)
    agent = Session(Role.AGENT)
    pump(agent, relay)
    ids = [agent.open_channel("db", 5432) for _ in range(5)]
    pump(agent, relay)
    events = relay.events_received()
    assert len([e for e in events if isinstance(e, ChannelOpenRequested)]) == 2
    assert [e for e in events if isinstance(e, PeerOpenRefused)] == [
        PeerOpenRefused(channel_id, OpenFailure.LIMIT_REACHED) for channel_id in ids[2:]]
    assert len(events_of(agent, ChannelOpenFailed)) == 3
    assert relay.refused_opens == {OpenFailure.LIMIT_REACHED: 3}
    relay.go_away()
    late = agent.open_channel("db", 5432)  # crosses the GOAWAY
    pump(agent, relay)
    assert events_of(relay, PeerOpenRefused) == [PeerOpenRefused(late, OpenFailure.GOING_AWAY)]
    assert relay.refused_opens == {OpenFailure.LIMIT_REACHED: 3, OpenFailure.GOING_AWAY: 1}
