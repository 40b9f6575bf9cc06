"""What a Session holds for a peer that grants big windows and reads slowly, or not
at all: max_send_window per channel, max_queued_size per session, and the wake-ups
that resume reading once there is room (wstunnel.mux.session, wstunnel.mux.send_budget)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.mux_helpers import events_of, pump, received_bytes
from wstunnel.errors import LocalProtocolError
from wstunnel.mux import (
    MAX_WINDOW,
    ChannelClosed,
    DataReceived,
    Event,
    OutboundBudgetExhausted,
    ResetCode,
    Role,
    Session,
    WindowUpdated,
)
from wstunnel.mux.channel import PIECE_OVERHEAD_SIZE
from wstunnel.mux.send_budget import LANE_CHUNK, reserve
from wstunnel.mux.wire import Reset, encode_record

KIB = 1024
MIB = 1024 * KIB


def reader_and_sender(reader_window: int = MAX_WINDOW,
                      **options: int) -> tuple[Session, Session]:
    """An agent that grants ``reader_window`` per channel, and a relay built with
    ``options``, SETTINGS exchanged: the relay is the sender in these tests."""
    agent = Session(Role.AGENT, initial_window=reader_window)
    relay = Session(Role.RELAY, **options)
    pump(agent, relay)
    agent.events_received()
    relay.events_received()
    return agent, relay


def open_channels(agent: Session, relay: Session, count: int) -> list[int]:
    ids = [agent.open_channel("source.invalid", 9) for _ in range(count)]
    pump(agent, relay)
    for channel_id in ids:
        relay.accept_channel(channel_id)
    pump(agent, relay)
    agent.events_received()
    relay.events_received()
    return ids


def fill(relay: Session, channel_id: int) -> int:
    """Queue what send_capacity allows; return it."""
    capacity = relay.send_capacity(channel_id)
    if capacity:
        relay.send_data(channel_id, bytes(capacity))
    return capacity


def records_until(relay: Session, done: Callable[[], bool]) -> list[bytes]:
    """Pull records (never delivered: the reader is stalled) until ``done()``."""
    records = []
    while not done():
        record = relay.next_record(16 * KIB)
        assert record is not None, "nothing left to send"
        records.append(record)
    return records


def test_a_big_window_is_used_only_up_to_max_send_window() -> None:
    """A peer's 16 MiB window: one channel queues at most max_send_window."""
    agent, relay = reader_and_sender(max_send_window=1 * MIB, max_queued_size=64 * MIB)
    [channel_id] = open_channels(agent, relay, 1)
    assert relay.send_capacity(channel_id) == 1 * MIB
    with pytest.raises(LocalProtocolError):
        relay.send_data(channel_id, bytes(1 * MIB + 1))
    relay.send_data(channel_id, bytes(1 * MIB))
    assert relay.send_capacity(channel_id) == 0
    assert relay.queued_size == 1 * MIB


def test_a_channel_held_back_by_the_cap_wakes_when_half_its_queue_is_sent() -> None:
    """WindowUpdated comes once the queue is at most half the cap (not on every cut),
    though no WINDOW arrived: the peer's credit was never the limit."""
    agent, relay = reader_and_sender(max_send_window=256 * KIB, max_queued_size=64 * MIB)
    [channel_id] = open_channels(agent, relay, 1)
    fill(relay, channel_id)
    assert relay.send_capacity(channel_id) == 0
    relay.next_record(16 * KIB)
    assert events_of(relay, WindowUpdated) == []
    records_until(relay, lambda: relay.queued_size <= 128 * KIB)
    assert events_of(relay, WindowUpdated) == [WindowUpdated(channel_id, 128 * KIB)]
    assert relay.send_capacity(channel_id) == 128 * KIB


def test_the_budget_spans_channels_and_reports_each_episode_once() -> None:
    """What all channels queue together stops at max_queued_size: a busy channel
    stops short of the last sixteenth (the lane), which channels with nothing queued
    take one LANE_CHUNK at a time; the first channel turned away emits
    OutboundBudgetExhausted, the others do not."""
    budget = 1 * MIB
    agent, relay = reader_and_sender(max_send_window=4 * MIB, max_queued_size=budget)
    first, second, third = open_channels(agent, relay, 3)
    assert fill(relay, first) == budget - reserve(budget) - PIECE_OVERHEAD_SIZE
    assert relay.held_size == budget - reserve(budget)
    assert relay.send_capacity(first) == 0  # (busy: not the lane)
    for channel in (second, third):  # (nothing queued: one chunk of the lane each)
        assert fill(relay, channel) == LANE_CHUNK
        assert relay.send_capacity(channel) == 0
    assert relay.held_size <= budget
    assert events_of(relay, OutboundBudgetExhausted) == [
        OutboundBudgetExhausted(budget - reserve(budget), budget)]
    assert relay.budget_exhaustions == 1
    with pytest.raises(LocalProtocolError):  # (past the whole budget)
        relay.send_data(third, bytes(reserve(budget)))


def test_a_channel_with_nothing_queued_passes_while_busy_ones_hold_the_budget() -> None:
    """Many busy channels keep the session at its budget: each time the writer frees
    room, one of them (woken by credit, not by the budget) takes it, so the budget
    never falls to half, where those told to wait are woken. A channel with
    nothing queued (a keystroke, a datagram) still gets room at once, every time,
    and the session never holds more than max_queued_size."""
    budget = 1 * MIB
    agent, relay = reader_and_sender(max_send_window=4 * MIB, max_queued_size=budget)
    *busy, quiet = open_channels(agent, relay, 5)
    for channel in busy:
        fill(relay, channel)
    for turn in range(20):
        records_until(relay, lambda: relay.held_size < budget - reserve(budget) - 64 * KIB)
        for channel in busy:  # (they refill what the writer took)
            fill(relay, channel)
        assert relay.send_capacity(quiet) > 0, turn
        relay.send_data(quiet, b"keystroke")
        assert relay.held_size <= budget
        sent = [relay.next_record(16 * KIB) for _ in range(len(busy) + 1)]  # (one turn each)
        assert any(record is not None and record.endswith(b"keystroke") for record in sent)


def test_waiting_channels_resume_once_half_the_budget_is_sent() -> None:
    """Below half the budget, each channel turned away gets one WindowUpdated, in the
    order they were turned away; a later exhaustion is a new episode."""
    budget = 1 * MIB
    agent, relay = reader_and_sender(max_send_window=4 * MIB, max_queued_size=budget)
    first, second, third = open_channels(agent, relay, 3)
    while (capacity := relay.send_capacity(first)) > 0:  # as reads come: 16 KiB pieces
        relay.send_data(first, bytes(min(capacity, 16 * KIB)))
    fill(relay, third)  # (their lane chunks: with those queued, they wait too)
    fill(relay, second)
    relay.send_capacity(third)
    relay.send_capacity(second)
    relay.events_received()
    records_until(relay, lambda: relay.held_size < budget * 3 // 4)
    assert events_of(relay, WindowUpdated) == []  # not before half
    records_until(relay, lambda: relay.held_size < budget // 2)
    woken = events_of(relay, WindowUpdated)
    assert [e.channel_id for e in woken] == [first, third, second]
    assert all(e.send_capacity > 0 for e in woken)
    assert fill(relay, second) > 0
    fill(relay, third)  # (the lane again: its chunk went meanwhile)
    assert relay.send_capacity(third) == 0
    assert relay.budget_exhaustions == 2


def test_a_reset_gives_its_queue_back_to_the_budget() -> None:
    """Resetting the channel that holds the budget wakes the others at once."""
    budget = 1 * MIB
    agent, relay = reader_and_sender(max_queued_size=budget)
    first, second = open_channels(agent, relay, 2)
    fill(relay, first)
    fill(relay, second)  # (a lane chunk; then it waits)
    assert relay.send_capacity(second) == 0
    relay.events_received()
    relay.reset_channel(first)
    assert relay.held_size == LANE_CHUNK + PIECE_OVERHEAD_SIZE  # (second's)
    assert WindowUpdated(second, 4 * MIB - LANE_CHUNK) in relay.events_received()  # (its cap)


def test_what_the_peer_resets_or_the_session_loses_is_freed() -> None:
    """A peer RESET discards the queue, and so does a failed session: held_size is 0."""
    agent, relay = reader_and_sender(max_queued_size=1 * MIB)
    first, second = open_channels(agent, relay, 2)
    relay.send_data(first, bytes(100 * KIB))
    relay.send_data(second, b"y" * 1000)
    relay.receive_record(encode_record(Reset(first, ResetCode.CANCELLED, "")))
    assert relay.held_size == 1000 + PIECE_OVERHEAD_SIZE
    relay.receive_record(b"\xff garbage")
    assert relay.failure is not None and relay.held_size == 0


def test_data_behind_a_fin_or_a_late_reset_is_counted_until_sent() -> None:
    """send_eof and reset_channel(after_data=True) keep the queue, and its count, until
    it is sent; then the budget is whole again."""
    agent, relay = reader_and_sender(max_queued_size=1 * MIB)
    first, second = open_channels(agent, relay, 2)
    relay.send_data(first, b"a" * 5000)
    relay.send_eof(first)
    relay.send_data(second, b"b" * 7000)
    relay.reset_channel(second, ResetCode.CONNECTION_RESET, after_data=True)
    assert relay.held_size == 12000 + 2 * PIECE_OVERHEAD_SIZE
    pump(agent, relay)
    events = agent.events_received()
    assert received_bytes(events, first) == b"a" * 5000
    assert received_bytes(events, second) == b"b" * 7000
    assert relay.held_size == 0


def test_the_sent_part_of_a_piece_counts_until_the_whole_piece_is_gone() -> None:
    """A chunk cut from a bigger piece leaves a view that keeps all of it in memory:
    held_size counts the whole piece until its last byte is sent."""
    agent, relay = reader_and_sender(max_chunk_size=16 * KIB, max_queued_size=4 * MIB)
    first, second = open_channels(agent, relay, 2)
    relay.send_data(first, bytes(64 * KIB))
    relay.send_data(second, bytes(64 * KIB))
    relay.next_record(16 * KIB)  # two channels compete: a 16 KiB chunk
    assert relay.queued_size == 112 * KIB
    assert relay.held_size == 128 * KIB + 2 * PIECE_OVERHEAD_SIZE
    pump(agent, relay)
    assert relay.held_size == relay.queued_size == 0


def test_options_out_of_range_are_refused() -> None:
    """Both limits are range-checked like every other limit."""
    for options in ({"max_send_window": 1024}, {"max_send_window": MAX_WINDOW + 1},
                    {"max_queued_size": 1024}):
        with pytest.raises(LocalProtocolError):
            Session(Role.RELAY, **options)


def test_early_data_past_the_budget_is_refused_before_the_open() -> None:
    """open_channel's early data must fit what a new channel may queue."""
    agent, relay = reader_and_sender(max_queued_size=64 * KIB)
    with pytest.raises(LocalProtocolError):
        relay.open_channel("x.invalid", 9, early_data=bytes(64 * KIB))
    assert relay.channel_ids() == []


_OPS = st.lists(st.tuples(st.sampled_from(["send"] * 4 + ["cut"] * 3 + [
                              "read", "eof", "reset", "late_reset", "peer_reset"]),
                          st.integers(0, 2), st.integers(1, 48 * KIB)),
                max_size=60)


@settings(max_examples=300)
@given(_OPS)
@example([("send", 0, 40 * KIB), ("send", 0, 40 * KIB), ("send", 0, 1)])  # the cap
@example([("send", index, 40 * KIB) for index in (0, 1, 2, 0)])  # the budget
def test_the_budget_holds_and_no_wake_up_is_lost(ops: list[tuple[str, int, int]]) -> None:
    """Whatever is queued, cut, read, ended or reset: held_size stays within
    max_queued_size and counts at least the queued bytes, is 0 when nothing is queued,
    and once the reader has taken everything every channel that was told 0 has had
    its WindowUpdated (no channel waits for ever)."""
    budget = 96 * KIB
    # (the reader's window is so big that no WINDOW comes back: only the budget's
    # and the cap's own wake-ups can resume a channel)
    agent, relay = reader_and_sender(MAX_WINDOW, max_chunk_size=4 * KIB,
                                     max_send_window=64 * KIB, max_queued_size=budget)
    ids = open_channels(agent, relay, 3)
    live = set(ids)
    waiting: set[int] = set()
    ended: set[int] = set()  # send half closed: send_data is not allowed

    def settle(events: list[Event]) -> None:
        for event in events:
            if isinstance(event, WindowUpdated):
                waiting.discard(event.channel_id)
            elif isinstance(event, ChannelClosed):
                waiting.discard(event.channel_id)
                live.discard(event.channel_id)

    for op, index, size in ops:
        channel_id = ids[index]
        if op == "send" and channel_id in live - ended:
            capacity = relay.send_capacity(channel_id)
            if capacity:
                relay.send_data(channel_id, bytes(min(size, capacity)))
            else:
                waiting.add(channel_id)
        elif op == "cut":
            record = relay.next_record(size)
            if record is not None:
                agent.receive_record(record)
        elif op == "read":
            for event in agent.events_received():
                if isinstance(event, DataReceived):
                    agent.acknowledge(event.channel_id, len(event.data))
            while (back := agent.next_record()) is not None:
                relay.receive_record(back)
        elif op == "eof" and channel_id in live:
            relay.send_eof(channel_id)
            ended.add(channel_id)  # (and it waits for nothing any more)
            waiting.discard(channel_id)
        elif op == "reset" and channel_id in live:
            relay.reset_channel(channel_id)
        elif op == "late_reset" and channel_id in live:
            relay.reset_channel(channel_id, after_data=True)
            ended.add(channel_id)
            waiting.discard(channel_id)
        elif op == "peer_reset" and channel_id in live:
            relay.receive_record(encode_record(Reset(channel_id, ResetCode.CANCELLED, "")))
        settle(relay.events_received())
        assert relay.queued_size <= relay.held_size <= budget
        assert (relay.held_size == 0) == (relay.queued_size == 0)
    for _ in range(1000):  # the reader takes everything and returns the credit
        moved = 0
        while (record := relay.next_record()) is not None:
            agent.receive_record(record)
            moved += 1
        for event in agent.events_received():
            if isinstance(event, DataReceived):
                agent.acknowledge(event.channel_id, len(event.data))
        while (back := agent.next_record()) is not None:
            relay.receive_record(back)
            moved += 1
        settle(relay.events_received())
        if not moved:
            break
    assert relay.held_size == relay.queued_size == 0
    assert waiting == set()
    assert relay.failure is None and agent.failure is None
