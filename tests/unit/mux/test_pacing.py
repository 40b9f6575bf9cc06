"""Rate limits (wstunnel.mux.pacing): the token bucket, and a session pulled under one.

Time is a float passed in (the fake clock): these tests never sleep.
"""

from __future__ import annotations

import struct

import pytest

from tests.mux_helpers import connected_pair, open_accepted, transfer
from wstunnel.errors import LocalProtocolError
from wstunnel.mux import DataReceived, Pacer, RecordType, Session, TokenBucket
from wstunnel.mux.pacing import MIN_BURST_SIZE, Limits, default_burst

KiB = 1024
MiB = 1024 * KiB
STEP = 0.005  # simulated seconds per writer turn


# -- the bucket -------------------------------------------------------------------------


def test_a_new_bucket_holds_its_burst_and_never_saves_more() -> None:
    """An idle agent may send one burst at once, however long it was idle."""
    bucket = TokenBucket(1 * MiB, 300 * KiB, now=10.0)
    assert bucket.tokens == 300 * KiB
    bucket.refill(1000.0)
    assert bucket.tokens == 300 * KiB


def test_refill_adds_the_rate_times_the_time_passed() -> None:
    """Permission grows at ``rate`` bytes per second of the clock passed in."""
    bucket = TokenBucket(1 * MiB, 1 * MiB, now=0.0)
    bucket.spend(1 * MiB)
    bucket.refill(0.25)
    assert bucket.tokens == pytest.approx(MiB / 4)
    bucket.refill(0.1)  # an earlier reading changes nothing
    assert bucket.tokens == pytest.approx(MiB / 4)


def test_the_default_burst_is_a_tenth_of_a_second_at_least_256_kib() -> None:
    """burst: omitted means 0.1 s at the rate, never below MIN_BURST_SIZE."""
    assert default_burst(1 * MiB) == MIN_BURST_SIZE == 256 * KiB
    assert default_burst(100 * MiB) == 10 * MiB
    assert TokenBucket(100 * MiB).burst == 10 * MiB


def test_a_deficit_is_repaid_before_anything_may_go() -> None:
    """Spending past zero is allowed (a record goes whole) and delays what follows."""
    bucket = TokenBucket(1 * MiB, 256 * KiB, now=0.0)
    bucket.spend(512 * KiB)
    assert not bucket.positive
    assert bucket.delay() == pytest.approx((256 * KiB + bucket.grain) / MiB)
    bucket.refill(0.2)
    assert not bucket.positive
    bucket.refill(0.26)
    assert bucket.positive


def test_throttled_time_counts_only_the_time_below_the_grain() -> None:
    """The metric counts how long traffic waited, not how long the agent was idle."""
    bucket = TokenBucket(1 * MiB, 1 * MiB, now=0.0)
    bucket.spend(1 * MiB)  # empty: it takes grain / rate to be ready again
    bucket.refill(5.0)
    assert bucket.throttled_time == pytest.approx(bucket.grain / MiB)
    bucket.refill(6.0)  # full all along
    assert bucket.throttled_time == pytest.approx(bucket.grain / MiB)


def test_configure_changes_the_rate_and_cuts_what_is_saved() -> None:
    """A reload to a smaller burst cannot leave more saved up than the new burst."""
    bucket = TokenBucket(10 * MiB, 4 * MiB)
    bucket.configure(1 * MiB, 512 * KiB)
    assert (bucket.rate, bucket.burst, bucket.tokens) == (MiB, 512 * KiB, 512 * KiB)
    with pytest.raises(LocalProtocolError):
        bucket.configure(0)
    with pytest.raises(LocalProtocolError):
        TokenBucket(1 * MiB, 0)


# -- a session under a limit ------------------------------------------------------------


def _feed(session: Session, channel_id: int, piece: int = 64 * KiB) -> None:
    """Keep the channel's send queue full, as a fast source would."""
    while session.send_capacity(channel_id) >= piece:
        session.send_data(channel_id, bytes(piece))


def _deliver(pacer: Pacer, sender: Session, receiver: Session) -> dict[int, int]:
    """One writer turn: pull under the pacer, the receiver reads and acknowledges all
    of it, its WINDOWs come back. Returns the DATA bytes moved, per channel."""
    moved: dict[int, int] = {}
    while (parts := pacer.next_parts(1 * MiB)) is not None:
        head, payload = parts
        receiver.receive_record(head + bytes(payload))
    for event in receiver.events_received():
        if isinstance(event, DataReceived):
            moved[event.channel_id] = moved.get(event.channel_id, 0) + len(event.data)
            receiver.acknowledge(event.channel_id, len(event.data))
    transfer(receiver, sender)  # (one way: the sender's own output goes through the pacer)
    sender.events_received()
    return moved


def _download(rate: int, channels: int, seconds: int) -> list[dict[int, int]]:
    """The relay sends to the agent under ``down``; bytes per simulated second, per channel."""
    agent, relay = connected_pair()
    ids = [open_accepted(agent, relay) for _ in range(channels)]
    pacer = Pacer(relay, outbound=TokenBucket(rate, now=0.0))
    per_second: list[dict[int, int]] = [{} for _ in range(seconds)]
    for turn in range(int(seconds / STEP)):
        now = turn * STEP
        pacer.refill(now)
        for channel_id in ids:
            _feed(relay, channel_id)
        for channel_id, size in _deliver(pacer, relay, agent).items():
            second = per_second[int(now)]
            second[channel_id] = second.get(channel_id, 0) + size
    return per_second


def test_data_pulled_per_second_stays_within_the_limit() -> None:
    """After the first second (which may add one burst), each second moves the rate,
    give or take one record of at most the bucket's grain."""
    rate = 4 * MiB
    per_second = _download(rate, channels=1, seconds=4)
    grain = TokenBucket(rate).grain
    assert sum(per_second[0].values()) <= rate + default_burst(rate) + grain
    for second in per_second[1:]:
        assert abs(sum(second.values()) - rate) <= grain + rate * STEP


def test_two_channels_of_a_limited_agent_share_its_limit_fairly() -> None:
    """The scheduler still chooses whose turn it is: two busy channels get equal
    shares of the limit (within a few records), together the limit."""
    rate = 4 * MiB
    per_second = _download(rate, channels=2, seconds=3)
    totals: dict[int, int] = {}
    for second in per_second[1:]:
        for channel_id, size in second.items():
            totals[channel_id] = totals.get(channel_id, 0) + size
    first, second_channel = totals.values()
    assert abs(first - second_channel) <= 4 * TokenBucket(rate).grain
    assert abs(first + second_channel - 2 * rate) <= 0.05 * 2 * rate


def test_control_records_pass_while_the_bucket_is_empty() -> None:
    """An empty bucket holds DATA back, never OPEN_OK, FIN or GOAWAY."""
    agent, relay = connected_pair()
    busy = open_accepted(agent, relay)
    down = TokenBucket(1 * MiB, now=0.0)
    down.spend(int(down.tokens) + 1 * MiB)  # a deficit of one second
    pacer = Pacer(relay, outbound=down)
    relay.send_data(busy, b"x" * 1000)
    new = agent.open_channel("db.invalid", 5432)
    for record in iter(agent.next_record, None):
        relay.receive_record(record)
    relay.accept_channel(new)
    relay.send_eof(new)
    relay.go_away(0, "bye")
    kinds = [RecordType(parts[0][0]) for parts in iter(pacer.next_parts, None)]
    assert kinds == [RecordType.OPEN_OK, RecordType.FIN, RecordType.GOAWAY]
    assert pacer.delay() == pytest.approx(down.delay())
    pacer.refill(2.0)
    assert [RecordType(parts[0][0]) for parts in iter(pacer.next_parts, None)] == [
        RecordType.DATA]


def _upload(rate: int, seconds: int) -> list[int]:
    """The agent sends as fast as its credit allows; the relay acknowledges all it
    receives and paces its WINDOWs under ``up``. Bytes per simulated second."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    agent_pacer = Pacer(agent)  # no limit: pulls as the session does
    relay_pacer = Pacer(relay, inbound=TokenBucket(rate, now=0.0))
    per_second = [0] * seconds
    for turn in range(int(seconds / STEP)):
        now = turn * STEP
        relay_pacer.refill(now)
        _feed(agent, channel_id)
        while (parts := agent_pacer.next_parts(1 * MiB)) is not None:
            relay.receive_record(parts[0] + bytes(parts[1]))
        for event in relay.events_received():
            if isinstance(event, DataReceived):
                per_second[int(now)] += len(event.data)
                relay.acknowledge(event.channel_id, len(event.data))
        while (parts := relay_pacer.next_parts(1 * MiB)) is not None:
            agent.receive_record(parts[0] + bytes(parts[1]))
        agent.events_received()
    return per_second


def test_held_back_credit_holds_the_peer_to_the_up_limit() -> None:
    """WINDOW records wait while the up bucket is not positive: the peer's sender,
    which may send only what it was granted, is held near the limit."""
    rate = 2 * MiB
    per_second = _upload(rate, seconds=5)
    assert per_second[0] <= rate + default_burst(rate) + 4 * MiB  # + the windows granted
    steady = sum(per_second[2:]) / 3
    assert abs(steady - rate) <= 0.05 * rate


def test_held_windows_go_in_order_once_the_bucket_is_positive() -> None:
    """Credit is delayed, never lost or reordered, and returned in pieces of at most the
    bucket's grain; other control records overtake it."""
    agent, relay = connected_pair()
    first = open_accepted(agent, relay)
    second = open_accepted(agent, relay)
    up = TokenBucket(1 * MiB, now=0.0)
    up.spend(int(up.tokens) + 64 * KiB)
    pacer = Pacer(relay, inbound=up)
    for channel_id in (first, second):
        agent.send_data(channel_id, bytes(128 * KiB))
    for record in iter(agent.next_record, None):
        relay.receive_record(record)
    relay.events_received()
    relay.acknowledge(first, 128 * KiB)
    relay.acknowledge(second, 128 * KiB)
    relay.send_eof(first)
    kinds = [parts[0] for parts in iter(pacer.next_parts, None)]
    assert [RecordType(record[0]) for record in kinds] == [RecordType.FIN]
    assert len(pacer.held) == 2
    assert pacer.delay() == pytest.approx(up.delay())
    pacer.refill(1.0)
    released = [parts[0] for parts in iter(pacer.next_parts, None)]
    assert {RecordType(record[0]) for record in released} == {RecordType.WINDOW}
    assert _credit(released) == [(first, 128 * KiB), (second, 128 * KiB)]
    assert max(struct.unpack_from("!II", record, 1)[1] for record in released) <= up.grain


def _credit(windows: list[bytes]) -> list[tuple[int, int]]:
    """WINDOW records as (channel, credit), consecutive ones of a channel summed."""
    merged: list[tuple[int, int]] = []
    for record in windows:
        channel_id, increment = struct.unpack_from("!II", record, 1)
        if merged and merged[-1][0] == channel_id:
            merged[-1] = (channel_id, merged[-1][1] + increment)
        else:
            merged.append((channel_id, increment))
    return merged


def test_a_failed_session_sends_its_goaway_and_no_held_credit() -> None:
    """Once the peer broke the protocol only GOAWAY goes out, even when the up bucket
    has refilled meanwhile: held WINDOWs are dropped, not released."""
    agent, relay = connected_pair()
    channel_id = open_accepted(agent, relay)
    up = TokenBucket(1 * MiB, now=0.0)
    up.spend(int(up.tokens) + 1)
    pacer = Pacer(relay, inbound=up)
    agent.send_data(channel_id, bytes(128 * KiB))
    for record in iter(agent.next_record, None):
        relay.receive_record(record)
    relay.events_received()
    relay.acknowledge(channel_id, 128 * KiB)
    assert list(iter(pacer.next_parts, None)) == [] and len(pacer.held) == 1
    relay.receive_record(b"\xff")  # no such record type
    pacer.refill(1.0)
    assert [RecordType(parts[0][0]) for parts in iter(pacer.next_parts, None)] == [
        RecordType.GOAWAY]


# -- per forward (the agent's forwards[].rate_limit) --------------------------------------


def _two_channels(limits: dict[str, Limits]) -> dict[str, list[int]]:
    """Two busy channels of the agent, of forwards "db" and "web"; bytes per second each."""
    agent, relay = connected_pair()
    ids = {"db": open_accepted(agent, relay), "web": open_accepted(agent, relay)}
    pacer = Pacer(agent, forwards=limits)
    for forward, channel_id in ids.items():
        pacer.limit_channel(channel_id, forward)
    moved = {forward: [0, 0, 0] for forward in ids}
    for turn in range(int(3 / STEP)):
        now = turn * STEP
        pacer.refill(now)
        for channel_id in ids.values():
            _feed(agent, channel_id)
        for channel_id, size in _deliver(pacer, agent, relay).items():
            moved["db" if channel_id == ids["db"] else "web"][int(now)] += size
    return moved


def test_a_limited_forwards_channel_is_held_to_its_rate_while_another_takes_the_rest() -> None:
    """A channel whose forward's bucket is empty loses its turns; the scheduler serves
    the other channels meanwhile, so the unlimited one moves what it moves without
    the limited one beside it."""
    rate = 2 * MiB
    moved = _two_channels({"db": (TokenBucket(rate, now=0.0), None)})
    unlimited = _two_channels({})
    grain = TokenBucket(rate).grain
    for second in (1, 2):
        assert abs(moved["db"][second] - rate) <= grain + rate * STEP
        assert moved["web"][second] >= 0.95 * unlimited["web"][second]


def test_credit_for_a_limited_forwards_channel_waits_and_others_pass() -> None:
    """A forward's inbound bucket holds back its channels' WINDOWs only."""
    agent, relay = connected_pair()
    limited, free = open_accepted(agent, relay), open_accepted(agent, relay)
    down = TokenBucket(1 * MiB, now=0.0)
    down.spend(int(down.tokens) + 1)
    pacer = Pacer(agent, forwards={"db": (None, down)})
    pacer.limit_channel(limited, "db")
    for channel_id in (limited, free):
        relay.send_data(channel_id, bytes(128 * KiB))
    for record in iter(relay.next_record, None):
        agent.receive_record(record)
    agent.events_received()
    agent.acknowledge(limited, 128 * KiB)
    agent.acknowledge(free, 128 * KiB)
    sent = [parts[0] for parts in iter(pacer.next_parts, None)]
    assert _credit(sent) == [(free, 128 * KiB)]
    pacer.forget_channel(limited)  # (a closed channel: nothing more is looked up)
    pacer.refill(1.0)
    assert _credit([parts[0] for parts in iter(pacer.next_parts, None)]) == [
        (limited, 128 * KiB)]
