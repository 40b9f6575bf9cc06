"""Flow-control windows (wstunnel.mux.flow)."""

from __future__ import annotations

import pytest

from wstunnel.errors import FlowControlError, LocalProtocolError
from wstunnel.mux.flow import ReceiveWindow, SendCredit


def test_send_credit_is_spent_and_refilled() -> None:
    """Credit falls by what we send and rises by what the peer returns."""
    credit = SendCredit(100)
    credit.consume(60)
    assert credit.credit == 40
    credit.grant(60)
    assert credit.credit == 100


def test_send_credit_cannot_go_negative() -> None:
    """Sending past the credit is our bug: LocalProtocolError, credit unchanged."""
    credit = SendCredit(10)
    with pytest.raises(LocalProtocolError):
        credit.consume(11)
    with pytest.raises(LocalProtocolError):
        credit.consume(-1)
    assert credit.credit == 10


@pytest.mark.parametrize("increment", [0, -5, 1])
def test_grant_beyond_the_window_is_a_flow_control_error(increment: int) -> None:
    """A WINDOW that is not positive or lifts credit above the window is the peer's bug."""
    credit = SendCredit(10)
    with pytest.raises(FlowControlError):
        credit.grant(increment)
    assert credit.credit == 10


def test_resize_adds_the_difference_and_never_shrinks() -> None:
    """A larger peer window tops the credit up; a smaller one is refused."""
    credit = SendCredit(100)
    credit.consume(30)
    assert credit.resize(250) == 150
    assert (credit.credit, credit.limit) == (220, 250)
    with pytest.raises(LocalProtocolError):
        credit.resize(200)


def test_receive_window_rejects_data_past_the_grant() -> None:
    """The peer may send exactly the window, and not one byte more."""
    window = ReceiveWindow(100)
    window.receive(100)
    with pytest.raises(FlowControlError):
        window.receive(1)


def test_credit_is_returned_on_acknowledge_in_batches() -> None:
    """Consumed bytes come back only once a quarter of the window has accumulated."""
    window = ReceiveWindow(100)
    window.receive(100)
    assert window.acknowledge(24) == 0
    assert window.available == 0
    assert window.acknowledge(1) == 25
    assert window.available == 25
    assert window.acknowledge(75) == 75
    assert window.available == 100


def test_receive_window_invariant_holds_after_every_update() -> None:
    """available + unacknowledged + pending always equals the window size."""
    window = ReceiveWindow(64, threshold=10)
    steps = [("r", 30), ("a", 5), ("r", 20), ("a", 40), ("r", 14), ("a", 19)]
    for op, size in steps:
        if op == "r":
            window.receive(size)
        else:
            window.acknowledge(size)
        assert window.available + window.unacknowledged + window.pending == window.size
        assert min(window.available, window.unacknowledged, window.pending) >= 0


def test_acknowledging_more_than_received_is_a_local_error() -> None:
    """The application cannot consume bytes that never arrived."""
    window = ReceiveWindow(100)
    window.receive(10)
    with pytest.raises(LocalProtocolError):
        window.acknowledge(11)
    with pytest.raises(LocalProtocolError):
        window.acknowledge(-1)


@pytest.mark.parametrize("size, threshold", [(0, None), (10, 0), (10, 11)])
def test_bad_window_parameters_are_refused(size: int, threshold: int | None) -> None:
    """Windows must be positive and the batch threshold within 1..size."""
    with pytest.raises(LocalProtocolError):
        ReceiveWindow(size, threshold)
