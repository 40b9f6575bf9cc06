"""The resumption log: what is kept, what an ACK frees, what a resume replays."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wstunnel.errors import RemoteProtocolError
from wstunnel.replay import (
    ACK_BYTES,
    ACK_RECORDS,
    Instance,
    ReplayLog,
    ack_record,
    parse_ack,
    parse_instance,
)


def record(n: int) -> tuple[bytes, bytes]:
    return b"\x05" + n.to_bytes(4, "big"), b"x" * (n % 7 + 1)


@given(total=st.integers(0, 200), data=st.data())
def test_a_resume_replays_exactly_what_the_peer_missed(total: int, data: st.DataObject) -> None:
    """Whatever was acknowledged on the way and however much of the rest arrived,
    the replay after a break is exactly the records the peer did not receive, in
    order: nothing lost, nothing twice."""
    log = ReplayLog()
    acked = 0
    for n in range(1, total + 1):
        log.sent_record(*record(n))
        if data.draw(st.booleans()):  # an ACK arrives for some prefix received so far
            acked = data.draw(st.integers(acked, n))
            log.acknowledged(acked)
    received = data.draw(st.integers(acked, total))  # then the carrier breaks
    assert log.replay(received) == [record(n) for n in range(received + 1, total + 1)]
    assert log.kept_size == sum(len(h) + len(p) for h, p in map(record, range(received + 1,
                                                                                total + 1)))


def test_acks_free_what_was_kept() -> None:
    log = ReplayLog()
    for n in range(1, 11):
        log.sent_record(*record(n))
    log.acknowledged(4)
    assert (log.kept_count, log.first_kept) == (6, 5)
    log.acknowledged(4)  # a repeat changes nothing
    log.acknowledged(10)
    assert (log.kept_count, log.kept_size) == (0, 0)


@pytest.mark.parametrize(("sent", "acked", "claim"), [(3, 0, 4), (5, 3, 2)])
def test_impossible_counts_are_protocol_errors(sent: int, acked: int, claim: int) -> None:
    """An ACK or resume count beyond what was sent, or before what was already
    acknowledged (those records are gone), is the peer's error."""
    log = ReplayLog()
    for n in range(1, sent + 1):
        log.sent_record(*record(n))
    log.acknowledged(acked)
    with pytest.raises(RemoteProtocolError):
        log.replay(claim)


def test_the_receiver_acknowledges_every_so_many_records_or_bytes() -> None:
    log = ReplayLog()
    due = [log.received_record(10) for _ in range(ACK_RECORDS)]
    assert due == [False] * (ACK_RECORDS - 1) + [True]
    ack = log.take_ack()
    assert ack is not None and parse_ack(ack) == ACK_RECORDS
    assert log.take_ack() is None  # nothing new since
    assert log.received_record(ACK_BYTES)  # one big record is enough
    assert parse_ack(log.take_ack() or b"") == ACK_RECORDS + 1


def test_ack_records_have_one_shape() -> None:
    assert parse_ack(ack_record(2**40)) == 2**40
    with pytest.raises(RemoteProtocolError):
        parse_ack(ack_record(1)[:-1])


@pytest.mark.parametrize("value", [None, "", "id", "id 12 extra", "id -5", "id 1.5",
                                   "id ١٢", "x" * 65 + " 1", "id " + "9" * 21])
def test_a_malformed_instance_header_is_ignored(value: str | None) -> None:
    """An instance header that is absent or malformed names no instance (the session
    is then kept its whole grace, as an old agent's)."""
    assert parse_instance(value) is None


def test_an_instance_header_round_trips() -> None:
    """What the agent sends is what the relay reads, spaces around it ignored."""
    instance = Instance("k3Jx-_a", 1_765_000_000_123_456_789)
    assert parse_instance(f" {instance} ") == instance
