"""Deficit round robin (wstunnel.mux.scheduler)."""

from __future__ import annotations

import pytest

from wstunnel.errors import LocalProtocolError
from wstunnel.mux.scheduler import DeficitRoundRobin


def serve(drr: DeficitRoundRobin[str], backlog: dict[str, int], chunk: int,
          turns: int) -> list[tuple[str, int]]:
    """Serve up to ``turns`` chunks the way Session.next_record does."""
    sent = []
    for _ in range(turns):
        key = drr.peek()
        if key is None:
            break
        size = min(drr.budget, chunk, backlog[key])
        backlog[key] -= size
        drr.charge(size, backlog[key] > 0)
        sent.append((key, size))
    return sent


def test_empty_scheduler_has_no_turn() -> None:
    """Nothing ready means peek() is None."""
    assert DeficitRoundRobin[int](10).peek() is None


def test_backlogged_keys_alternate_one_quantum_each() -> None:
    """With quantum equal to the chunk size, busy keys take turns chunk by chunk."""
    drr = DeficitRoundRobin[str](10)
    for key in "abc":
        drr.add(key)
    sent = serve(drr, {"a": 30, "b": 30, "c": 5}, chunk=10, turns=20)
    assert [k for k, _ in sent] == ["a", "b", "c", "a", "b", "a", "b"]
    assert sum(size for _, size in sent) == 65


def test_quantum_larger_than_chunk_gives_several_chunks_per_turn() -> None:
    """A turn lasts until quantum bytes are sent, in chunks no larger than the chunk size."""
    drr = DeficitRoundRobin[str](25)
    drr.add("a")
    drr.add("b")
    sent = serve(drr, {"a": 100, "b": 100}, chunk=10, turns=6)
    assert sent == [("a", 10), ("a", 10), ("a", 5), ("b", 10), ("b", 10), ("b", 5)]


def test_bytes_are_shared_fairly_whatever_the_chunk_pattern() -> None:
    """Over whole rounds each backlogged key gets exactly quantum bytes per round."""
    drr = DeficitRoundRobin[str](16)
    for key in "xyz":
        drr.add(key)
    sent = serve(drr, {"x": 1000, "y": 1000, "z": 1000}, chunk=7, turns=300)
    totals = {key: sum(size for k, size in sent if k == key) for key in "xyz"}
    assert max(totals.values()) - min(totals.values()) <= 16


def test_add_is_idempotent() -> None:
    """Adding a ready key again does not give it a second place in the queue."""
    drr = DeficitRoundRobin[str](10)
    drr.add("a")
    drr.add("a")
    drr.add("b")
    assert len(drr) == 2
    assert [k for k, _ in serve(drr, {"a": 20, "b": 20}, 10, 4)] == ["a", "b", "a", "b"]


def test_discard_anywhere_and_add_again() -> None:
    """A discarded key loses its place, at the head or behind it, and can rejoin at the back."""
    drr = DeficitRoundRobin[str](10)
    for key in "abc":
        drr.add(key)
    drr.discard("b")
    drr.discard("a")
    drr.discard("zz")  # not ready: nothing happens
    drr.add("a")
    assert "b" not in drr
    assert [k for k, _ in serve(drr, {"a": 20, "c": 20}, 10, 4)] == ["c", "a", "c", "a"]


def test_discarding_the_head_mid_turn_resets_the_budget() -> None:
    """The next key starts a full turn even if the discarded head had spent part of one."""
    drr = DeficitRoundRobin[str](30)
    drr.add("a")
    drr.add("b")
    drr.charge(10, True)
    drr.discard("a")
    assert drr.peek() == "b"
    assert drr.budget == 30


def test_charging_more_than_the_budget_is_a_bug() -> None:
    """A chunk larger than the turn budget means the caller cut it wrong."""
    drr = DeficitRoundRobin[str](10)
    drr.add("a")
    with pytest.raises(LocalProtocolError):
        drr.charge(11, True)
    with pytest.raises(LocalProtocolError):
        DeficitRoundRobin[str](0)


def test_fresh_keys_go_first_in_arrival_order_for_one_chunk_each() -> None:
    """add_first: ahead of the backlog, first come first served among themselves; after
    one chunk a fresh key queues at the back like any other."""
    drr = DeficitRoundRobin[str](10)
    for key in "ab":
        drr.add(key)
    backlog = {"a": 100, "b": 100, "x": 25, "y": 5}
    assert serve(drr, backlog, chunk=10, turns=1) == [("a", 10)]
    drr.add_first("x")
    drr.add_first("y")
    sent = serve(drr, backlog, chunk=10, turns=6)
    assert sent == [("x", 10), ("y", 5), ("b", 10), ("a", 10), ("x", 10), ("b", 10)]
    assert drr.fresh == 0


def test_discarding_a_fresh_key_keeps_the_others_first() -> None:
    drr = DeficitRoundRobin[str](10)
    drr.add("old")
    for key in "xyz":
        drr.add_first(key)
    drr.discard("y")
    assert drr.fresh == 2
    drr.add_first("w")  # after the remaining fresh ones, before "old"
    assert list(drr.queue) == ["x", "z", "w", "old"]
    drr.clear()
    assert drr.fresh == 0 and drr.peek() is None
