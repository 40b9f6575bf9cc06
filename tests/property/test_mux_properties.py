"""Property tests for the multiplexer: random interleavings, garbage, state walks."""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.mux_helpers import connected_pair
from wstunnel.mux import (
    ChannelClosed,
    ChannelOpened,
    ChannelOpenFailed,
    ChannelOpenRequested,
    ChannelReset,
    DataReceived,
    EndOfStream,
    Event,
    OpenFailure,
    ReceiveState,
    Role,
    SendState,
    Session,
    SessionFailed,
    SettingsReceived,
    WindowUpdated,
)
from wstunnel.mux.channel import RECEIVE_TRANSITIONS, SEND_TRANSITIONS, Input
from wstunnel.mux.wire import (
    MAX_WINDOW,
    Data,
    Fin,
    GoAway,
    Open,
    OpenFailed,
    OpenOk,
    Record,
    Reset,
    Settings,
    Window,
    decode_record,
    encode_record,
)

BLOB = os.urandom(1 << 20)


def content(channel_id: int, direction: int, offset: int, size: int) -> bytes:
    """Deterministic stream bytes, different per channel and direction."""
    start = (channel_id * 7919 + direction * 104729 + offset) % (len(BLOB) - size)
    return BLOB[start:start + size]


@dataclass
class Stream:
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    unacked: int = 0
    eof_received: bool = False


@dataclass
class Peer:
    """A Session plus an application that checks every event it is given."""

    session: Session
    direction: int
    stuck: set[int] = field(default_factory=set)     # readers that never acknowledge
    refuse: set[int] = field(default_factory=set)
    streams: dict[int, Stream] = field(default_factory=dict)
    live: set[int] = field(default_factory=set)
    finished: set[int] = field(default_factory=set)  # we called send_eof
    reset: set[int] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)
    wire: deque[bytes] = field(default_factory=deque)  # records in flight to the other peer

    def handle(self, events: list[Event]) -> None:
        for event in events:
            assert not isinstance(event, SessionFailed), event
            if isinstance(event, ChannelOpenRequested):
                self.streams[event.channel_id] = Stream()
                self.live.add(event.channel_id)
                if event.channel_id in self.refuse:
                    self.session.refuse_channel(event.channel_id, OpenFailure.FORBIDDEN)
                else:
                    self.session.accept_channel(event.channel_id)
            elif isinstance(event, DataReceived):
                stream = self.streams[event.channel_id]
                assert not stream.eof_received
                stream.received += event.data
                stream.unacked += len(event.data)
            elif isinstance(event, EndOfStream):
                self.streams[event.channel_id].eof_received = True
            elif isinstance(event, (ChannelReset, ChannelOpenFailed)):
                self.reset.add(event.channel_id)
            elif isinstance(event, ChannelClosed):
                assert event.channel_id not in self.closed
                self.closed.add(event.channel_id)
                self.live.discard(event.channel_id)
            elif isinstance(event, WindowUpdated):
                assert event.send_capacity >= 0
            else:
                assert isinstance(event, (ChannelOpened, SettingsReceived))

    def check_bounds(self) -> None:
        session = self.session
        for channel_id in session.channel_ids():
            assert session.send_capacity(channel_id) >= 0
        assert 0 <= session.buffered_size <= session.max_buffered_size

    def open(self, early: int) -> None:
        channel_id = self.session.open_channel("h", 1)
        self.streams[channel_id] = Stream()
        self.live.add(channel_id)
        self.send(channel_id, early)

    def send(self, channel_id: int, size: int) -> None:
        stream = self.streams[channel_id]
        size = min(size, self.session.send_capacity(channel_id))
        data = content(channel_id, self.direction, len(stream.sent), size)
        self.session.send_data(channel_id, data)
        stream.sent += data

    def ack(self, channel_id: int, size: int) -> None:
        stream = self.streams[channel_id]
        size = min(size, stream.unacked)
        if channel_id not in self.stuck:
            stream.unacked -= size
            self.session.acknowledge(channel_id, size)

    def emit(self, limit: int) -> None:
        for _ in range(limit):
            record = self.session.next_record()
            if record is None:
                return
            self.wire.append(record)

    def deliver_to(self, other: Peer, limit: int) -> None:
        for _ in range(min(limit, len(self.wire))):
            other.session.receive_record(self.wire.popleft())
            other.handle(other.session.events_received())


def settle(a: Peer, b: Peer) -> None:
    """Acknowledge everything (except stuck readers), finish every stream, pump to rest."""
    for _ in range(100_000):
        for peer in (a, b):
            peer.handle(peer.session.events_received())
            for channel_id in peer.session.channel_ids():  # all accepted by handle()
                peer.ack(channel_id, peer.streams[channel_id].unacked)
                peer.session.send_eof(channel_id)  # idempotent
            peer.handle(peer.session.events_received())
            peer.emit(1 << 30)
        if not (a.wire or b.wire):
            return
        a.deliver_to(b, 1 << 30)
        b.deliver_to(a, 1 << 30)
    raise AssertionError("did not settle")


OPS = st.one_of(
    st.tuples(st.just("open"), st.booleans(), st.integers(0, 40_000)),
    st.tuples(st.just("send"), st.booleans(), st.integers(0, 1 << 30), st.integers(1, 50_000)),
    st.tuples(st.just("eof"), st.booleans(), st.integers(0, 1 << 30)),
    st.tuples(st.just("reset"), st.booleans(), st.integers(0, 1 << 30)),
    st.tuples(st.just("ack"), st.booleans(), st.integers(0, 1 << 30), st.integers(1, 70_000)),
    st.tuples(st.just("emit"), st.booleans(), st.integers(1, 20)),
    st.tuples(st.just("deliver"), st.booleans(), st.integers(1, 20)),
)


def apply(op: tuple[Any, ...], me: Peer, other: Peer) -> None:
    """Apply one random operation for ``me``; channel picks wrap around live channels."""
    name = op[0]
    live = sorted(cid for cid in me.live if cid in me.session.channel_ids())
    if name == "open":
        me.open(op[2])
    elif name == "emit":
        me.emit(op[2])
    elif name == "deliver":
        me.deliver_to(other, op[2])
    elif live:
        channel_id = live[op[2] % len(live)]
        if name == "send" and channel_id not in me.finished:
            me.send(channel_id, op[3])
        elif name == "eof":
            me.session.send_eof(channel_id)
            me.finished.add(channel_id)
        elif name == "reset" and op[2] % 5 == 0:  # resets are rarer than the rest
            me.session.reset_channel(channel_id)
            me.reset.add(channel_id)  # our own reset aborts the stream both ways too
        elif name == "ack":
            me.ack(channel_id, op[3])
    me.handle(me.session.events_received())


@given(channels=st.integers(1, 1000), data=st.data())
def test_random_interleavings_deliver_every_byte_in_order(channels: int,
                                                           data: st.DataObject) -> None:
    """Random open/data/fin/reset/ack/delivery orders keep every stream intact and in order,
    no window goes negative, and a reader that never acknowledges blocks only its channel."""
    agent_session, relay_session = connected_pair()
    agent, relay = Peer(agent_session, 1), Peer(relay_session, 2)
    for _ in range(channels):
        agent.open(data.draw(st.integers(0, 2000), label="early"))
    relay.stuck = {1}  # the relay's reader on channel 1 never acknowledges
    relay.refuse = set(data.draw(st.sets(st.integers(1, channels * 2), max_size=3),
                                 label="refuse"))
    for op in data.draw(st.lists(OPS, max_size=120), label="ops"):
        me, other = (agent, relay) if op[1] else (relay, agent)
        apply(op, me, other)
        agent.check_bounds()
        relay.check_bounds()
    settle(agent, relay)
    assert agent.session.failure is None and relay.session.failure is None
    check_streams(agent, relay)


def check_streams(agent: Peer, relay: Peer) -> None:
    for sender, receiver in ((agent, relay), (relay, agent)):
        for channel_id, stream in sender.streams.items():
            got = receiver.streams.get(channel_id, Stream()).received
            assert got == stream.sent[:len(got)], f"channel {channel_id} corrupted"
            aborted = channel_id in agent.reset | relay.reset
            blocked = channel_id == 1
            if not (aborted or blocked):
                assert len(got) == len(stream.sent), f"channel {channel_id} incomplete"
    for peer in (agent, relay):
        assert set(peer.session.channel_ids()) <= {1}
        assert peer.live <= {1}


# -- garbage ----------------------------------------------------------------------


def records() -> st.SearchStrategy[Record]:
    ids = st.integers(0, 2**32 - 1)
    text = st.text(max_size=40)
    return st.one_of(
        st.builds(Settings, st.just(1), st.integers(0, 2**32 - 1),
                  st.integers(0, 2**32 - 1)),
        st.builds(Open, ids, st.integers(0, 255),
                  st.text(min_size=1, max_size=60).filter(lambda h: len(h.encode()) <= 255),
                  st.integers(1, 65535)),
        st.builds(OpenOk, ids),
        st.builds(OpenFailed, ids, st.integers(0, 65535), text),
        st.builds(Data, ids, st.binary(min_size=1, max_size=64)),
        st.builds(Window, ids, st.integers(1, MAX_WINDOW)),
        st.builds(Fin, ids),
        st.builds(Reset, ids, st.integers(0, 65535), text),
        st.builds(GoAway, ids, st.integers(0, 65535), text),
    )


@given(records())
def test_records_round_trip(record: Record) -> None:
    """Every encodable record decodes to itself."""
    assert decode_record(encode_record(record)) == record


def small_id_records() -> st.SearchStrategy[bytes]:
    """Valid-looking records for ids near the ones in use, so they hit real channels."""
    return records().map(encode_record).map(
        lambda r: r[:1] + bytes([0, 0, 0, r[4] % 8]) + r[5:] if len(r) >= 5 else r)


@given(st.lists(st.one_of(st.binary(max_size=40), small_id_records(),
                          small_id_records().map(lambda r: r[:-1])), max_size=30),
       st.booleans())
def test_garbage_yields_events_or_a_clean_failure(garbage: list[bytes], settled: bool) -> None:
    """Random and mutated records never raise: they give events, or one SessionFailed
    followed by nothing but a GOAWAY on the way out."""
    agent, relay = connected_pair() if settled else (Session(Role.AGENT), Session(Role.RELAY))
    channel_id = agent.open_channel("h", 1, early_data=b"x")
    while (record := agent.next_record()) is not None:
        relay.receive_record(record)
    relay.events_received()
    events: list[Event] = []
    for record in garbage:
        relay.receive_record(record)
        events += relay.events_received()
        while relay.failure is None and relay.next_record() is not None:
            pass
    failures = [e for e in events if isinstance(e, SessionFailed)]
    assert len(failures) == (relay.failure is not None)
    if relay.failure is not None:
        assert events[-1] is failures[0] and relay.closed
        out = [decode_record(r) for r in iter(relay.next_record, None)]
        assert out and isinstance(out[-1], GoAway) and out[-1].code == failures[0].code
    assert channel_id == 1


# -- walking the channel table through a real session ------------------------------

REMOTE: dict[Input, Callable[[int], Record]] = {
    Input.WINDOW: lambda cid: Window(cid, 1),
    Input.DATA: lambda cid: Data(cid, b"x"),
    Input.FIN: lambda cid: Fin(cid),
    Input.RESET: lambda cid: Reset(cid, 1, ""),
    Input.OPEN_OK: lambda cid: OpenOk(cid),
    Input.OPEN_FAILED: lambda cid: OpenFailed(cid, 1, ""),
}


def session_in(opener: bool, send: SendState, receive: ReceiveState) -> tuple[Session, int]:
    """Drive a session's channel into (send, receive) using only records and API calls."""
    session = Session(Role.AGENT)
    session.receive_record(encode_record(Settings()))
    if opener:
        channel_id = session.open_channel("h", 1, early_data=b"x")
        if receive is not ReceiveState.PENDING:
            session.receive_record(encode_record(OpenOk(channel_id)))
    else:
        channel_id = 2
        session.receive_record(encode_record(Open(channel_id, 1, "h", 1)))
        if send is not SendState.PENDING:
            session.accept_channel(channel_id)
            session.send_data(channel_id, b"x")
    while session.next_record() is not None:  # one byte spent: WINDOW(1) is within bounds
        pass
    if send is SendState.FIN_QUEUED:
        session.send_data(channel_id, b"y")
        session.send_eof(channel_id)
    elif send is SendState.CLOSED:
        session.send_eof(channel_id)
    if receive is ReceiveState.CLOSED:
        session.receive_record(encode_record(Fin(channel_id)))
    session.events_received()
    return session, channel_id


LIVE_STATES = [
    (opener, send, receive)
    for opener, send, receive in itertools.product((True, False), SendState, ReceiveState)
    if (send is SendState.PENDING) != opener and (receive is ReceiveState.PENDING) != (not opener)
    and not (send is SendState.CLOSED and receive is ReceiveState.CLOSED)
]


@pytest.mark.parametrize("opener, send, receive", LIVE_STATES,
                         ids=lambda x: getattr(x, "value", str(x)))
@pytest.mark.parametrize("event", list(REMOTE), ids=lambda e: e.value)
def test_session_follows_the_table_for_every_state_and_record(
        opener: bool, send: SendState, receive: ReceiveState, event: Input) -> None:
    """Every peer record in every live channel state is accepted iff the table has the pair."""
    session, channel_id = session_in(opener, send, receive)
    legal = ((send, event) in SEND_TRANSITIONS if event is Input.WINDOW
             else (receive, event) in RECEIVE_TRANSITIONS)
    session.receive_record(encode_record(REMOTE[event](channel_id)))
    assert (session.failure is None) == legal
