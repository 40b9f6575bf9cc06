"""Flow-control windows, and how a session's receive budget sizes them (wstunnel.mux.flow)."""

from __future__ import annotations

import pytest

from wstunnel.errors import FlowControlError, LocalProtocolError
from wstunnel.mux.flow import (
    DEFAULT_OPEN_WINDOW,
    ReceiveWindow,
    SendCredit,
    WindowBudget,
    plan_windows,
)
from wstunnel.mux.wire import MAX_WINDOW

KIB = 1024
MIB = 1024 * KIB


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


@pytest.mark.parametrize("increment", [0, -5, MAX_WINDOW - 9])
def test_grant_beyond_max_window_is_a_flow_control_error(increment: int) -> None:
    """A WINDOW that is not positive or lifts credit above MAX_WINDOW is the peer's bug."""
    credit = SendCredit(10)
    with pytest.raises(FlowControlError):
        credit.grant(increment)
    assert credit.credit == 10


def test_grant_beyond_the_window_grows_it() -> None:
    """Credit beyond what we sent is the peer growing its window: the limit follows."""
    credit = SendCredit(10)
    credit.grant(30)
    assert (credit.credit, credit.limit) == (40, 40)
    credit.consume(40)
    credit.grant(40)
    assert (credit.credit, credit.limit) == (40, 40)


def _drain_and_read(window: ReceiveWindow, room: int) -> int:
    """The peer spends the whole window; the reader consumes it all at once."""
    window.receive(window.available)
    return window.acknowledge(window.unacknowledged, room)


def test_window_doubles_when_the_peer_starves_and_the_reader_keeps_up() -> None:
    """A window the peer exhausts while the reader keeps up doubles, growth in the WINDOW."""
    window = ReceiveWindow(100)
    assert _drain_and_read(window, room=1000) == 200
    assert (window.size, window.available, window.threshold) == (200, 200, 50)
    assert _drain_and_read(window, room=50) == 250  # limited by the room
    assert window.size == 250


def test_window_does_not_grow_without_room_or_for_a_slow_reader() -> None:
    """No room, or the reader leaving data unread, or the peer still holding credit: no growth."""
    window = ReceiveWindow(100)
    assert _drain_and_read(window, room=0) == 100
    window.receive(100)
    assert window.acknowledge(25, room=1000) == 25  # 75 still unread: the reader is the limit
    assert window.size == 100
    window.acknowledge(75, room=1000)
    fresh = ReceiveWindow(100)
    fresh.receive(30)
    assert fresh.acknowledge(30, room=1000) == 30  # the peer still holds 70 of credit
    assert fresh.size == 100


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


def test_negative_room_shrinks_by_keeping_back_consumed_credit() -> None:
    """A shrinking window returns less than was consumed, never below zero, and stays consistent."""
    window = ReceiveWindow(400)
    window.receive(400)
    assert window.acknowledge(400, room=-300) == 100
    assert (window.size, window.available, window.threshold) == (100, 100, 25)


def test_a_budget_that_covers_every_channel_opens_them_at_initial_window() -> None:
    """While max_buffered_size covers max_channels x initial_window (or there is no
    budget), windows open at initial_window and an eighth of that is the pool."""
    for budget in (None, 100 * 256 * KIB, 1 << 40):
        plan = plan_windows(100, 256 * KIB, budget)
        assert (plan.open_window, plan.max_channels) == (256 * KIB, 100)
        assert (plan.pool, plan.max_buffered_size) == (100 * 32 * KIB, 100 * 256 * KIB)


@pytest.mark.parametrize("budget, channels", [(256 * MIB, 10240), (64 * MIB, 3072)])
def test_a_budget_too_small_opens_windows_small_and_bounds_them_all(budget: int,
                                                                     channels: int) -> None:
    """Past the budget, windows open at DEFAULT_OPEN_WINDOW, their floors take at most
    3/4 of the budget (fewer channels if need be), and the pool is the rest: the
    windows together never exceed max_buffered_size."""
    plan = plan_windows(10240, 256 * KIB, budget)
    assert (plan.open_window, plan.max_channels) == (DEFAULT_OPEN_WINDOW, channels)
    assert plan.max_channels * plan.open_window <= budget * 3 // 4
    assert plan.max_channels * plan.open_window + plan.pool == plan.max_buffered_size == budget


def test_a_small_initial_window_past_the_budget_caps_the_channels() -> None:
    """With initial_window at DEFAULT_OPEN_WINDOW there is nothing to top up: the
    channel limit is what the budget holds of them."""
    plan = plan_windows(1000, DEFAULT_OPEN_WINDOW, MIB)
    assert (plan.open_window, plan.max_channels) == (DEFAULT_OPEN_WINDOW, 64)
    assert (plan.pool, plan.max_buffered_size) == (MIB // 8, MIB)


def test_window_budget_tops_up_channels_while_the_pool_has_it() -> None:
    """Past max_buffered_size, channels open small and get the rest of initial_window
    from the pool, one after another, until it is spent; a channel that ends gives
    its growth back."""
    plan = plan_windows(10240, 256 * KIB, MIB)
    budget = WindowBudget(plan, 256 * KIB)
    extra = 256 * KIB - plan.open_window
    windows = [ReceiveWindow(plan.open_window) for _ in range(plan.pool // extra + 1)]
    assert [budget.top_up(w) for w in windows] == [extra] * (plan.pool // extra) + [0]
    assert budget.growth == plan.pool // extra * extra <= plan.pool
    assert windows[0].size == 256 * KIB and windows[-1].size == plan.open_window
    budget.release(windows[0])
    assert budget.growth == (plan.pool // extra - 1) * extra
    assert budget.top_up(windows[-1]) == extra
    budget.clear()
    assert budget.growth == 0


def test_window_budget_tops_up_nothing_when_windows_open_full() -> None:
    """Within max_buffered_size every window opens at initial_window: no WINDOW to
    add, and the pool stays whole for auto-tuning."""
    plan = plan_windows(4, 64 * KIB, None)
    budget = WindowBudget(plan, 64 * KIB)
    window = ReceiveWindow(plan.open_window)
    assert budget.top_up(window) == 0
    assert window.size == 64 * KIB and budget.growth == 0
