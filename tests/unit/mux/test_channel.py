"""Channel state tables and the channel record (wstunnel.mux.channel)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from wstunnel.errors import LocalProtocolError, RemoteProtocolError
from wstunnel.mux.channel import (
    LOCAL_INPUTS,
    RECEIVE_INPUTS,
    RECEIVE_TRANSITIONS,
    SEND_INPUTS,
    SEND_TRANSITIONS,
    Action,
    Channel,
    Input,
    ReceiveState,
    SendState,
    transition,
)

Pair = tuple[SendState | ReceiveState, Input]
SEND_PAIRS: list[Pair] = list(
    itertools.product(SendState, sorted(SEND_INPUTS, key=lambda i: i.value)))
RECEIVE_PAIRS: list[Pair] = list(
    itertools.product(ReceiveState, sorted(RECEIVE_INPUTS, key=lambda i: i.value)))


@pytest.mark.parametrize("state, event", SEND_PAIRS + RECEIVE_PAIRS,
                         ids=lambda x: getattr(x, "value", str(x)))
def test_every_state_input_pair(state: SendState | ReceiveState, event: Input) -> None:
    """Each (state, input) pair follows its table; a missing pair is a local or remote error."""
    table: dict[Any, Any] = (SEND_TRANSITIONS if isinstance(state, SendState)
                             else RECEIVE_TRANSITIONS)
    if (state, event) in table:
        assert transition(state, event) == table[(state, event)]
    else:
        expected = LocalProtocolError if event in LOCAL_INPUTS else RemoteProtocolError
        with pytest.raises(expected):
            transition(state, event)


def test_tables_use_only_their_own_inputs_and_states() -> None:
    """Send-half inputs live in the send table, receive-half inputs in the receive table."""
    assert set(Input) == SEND_INPUTS | RECEIVE_INPUTS
    assert {e for _, e in SEND_TRANSITIONS} <= SEND_INPUTS
    assert {e for _, e in RECEIVE_TRANSITIONS} <= RECEIVE_INPUTS
    assert all(isinstance(s, SendState) for _, s in SEND_TRANSITIONS.values())
    assert all(isinstance(s, ReceiveState) for _, s in RECEIVE_TRANSITIONS.values())


def test_closed_halves_never_reopen() -> None:
    """No transition leads out of CLOSED: a finished direction stays finished."""
    for (state, _), (_, nxt) in [*SEND_TRANSITIONS.items(), *RECEIVE_TRANSITIONS.items()]:
        if state in (SendState.CLOSED, ReceiveState.CLOSED):
            assert nxt is state


def test_every_state_is_reachable_from_a_start_state() -> None:
    """Walking the tables from OPEN/PENDING reaches every state of both halves."""
    for table, starts in ((SEND_TRANSITIONS, {SendState.OPEN, SendState.PENDING}),
                          (RECEIVE_TRANSITIONS, {ReceiveState.OPEN, ReceiveState.PENDING})):
        seen = set(starts)
        frontier = list(starts)
        while frontier:
            state = frontier.pop()
            for (src, _), (_, nxt) in table.items():
                if src is state and nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert seen == set(type(next(iter(starts))))


def test_opener_and_acceptor_start_states() -> None:
    """The opener may send at once but waits for OPEN_OK; the acceptor the other way round."""
    opener = Channel(1, opener=True, send_window=10, receive_window=10)
    acceptor = Channel(1, opener=False, send_window=10, receive_window=10)
    assert (opener.send_state, opener.receive_state) == (SendState.OPEN, ReceiveState.PENDING)
    assert (acceptor.send_state, acceptor.receive_state) == (SendState.PENDING, ReceiveState.OPEN)
    assert acceptor.send_capacity() == 0
    assert acceptor.send(Input.ACCEPT) is Action.SEND_OPEN_OK
    assert acceptor.send_capacity() == 10


def test_finished_needs_both_halves() -> None:
    """A channel is finished only when both directions are closed."""
    ch = Channel(2, opener=False, send_window=10, receive_window=10)
    ch.send(Input.ACCEPT)
    ch.receive(Input.FIN)
    assert not ch.finished
    ch.send(Input.SEND_EOF)
    assert not ch.finished
    assert ch.send(Input.DRAINED) is Action.SEND_FIN
    assert ch.finished


def test_take_hands_whole_pieces_through_and_slices_big_ones_without_copying() -> None:
    """A piece that fits goes out as the same object; a bigger one is cut as a memoryview."""
    ch = Channel(1, opener=True, send_window=100, receive_window=10)
    small, big = b"abc", bytes(range(50))
    ch.pieces.extend([small, big])
    ch.queued_size = 53
    first = ch.take(20)
    assert first[0] is small
    assert isinstance(first[1], memoryview) and bytes(first[1]) == big[:17]
    assert ch.queued_size == 33
    rest = ch.take(100)
    assert b"".join(rest) == big[17:]
    assert ch.queued_size == 0 and not ch.ready()


def test_send_capacity_is_credit_minus_queued() -> None:
    """What may still be queued is the credit not already spoken for by queued data."""
    ch = Channel(1, opener=True, send_window=100, receive_window=10)
    ch.pieces.append(b"x" * 30)
    ch.queued_size = 30
    assert ch.send_capacity() == 70
    ch.send(Input.SEND_EOF)
    assert ch.send_capacity() == 0
    ch.discard_queue()
    assert ch.queued_size == 0 and not ch.pieces
