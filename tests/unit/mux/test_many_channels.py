"""Thousands of channels in one session, memory still bounded by max_buffered_size.

When max_buffered_size cannot cover every channel at initial_window, channels open
at DEFAULT_OPEN_WINDOW (what our SETTINGS announce) and get the rest of
initial_window in one WINDOW from a session-wide pool while it lasts; busy channels
grow from the pool. See mux/flow.py (plan_windows) and docs/PROTOCOL.md section 5.
"""

from __future__ import annotations

from tests.mux_helpers import connected_pair, open_accepted, pump, transfer
from wstunnel.mux import (
    DEFAULT_INITIAL_WINDOW,
    DEFAULT_MAX_CHANNELS,
    DEFAULT_OPEN_WINDOW,
    ChannelOpenFailed,
    ChannelOpenRequested,
    OpenFailure,
    RecordType,
    Role,
    Session,
)

KIB = 1024
MIB = 1024 * KIB
BUDGET = 2 * MIB  # 96 channels of 16 KiB take 3/4 of it; the pool is 512 KiB
TOP_UP = DEFAULT_INITIAL_WINDOW - DEFAULT_OPEN_WINDOW


def _open_all(agent: Session, relay: Session, count: int) -> list[int]:
    """The agent opens ``count`` channels and the relay accepts every one it is asked."""
    opened = []
    for _ in range(count):
        opened.append(agent.open_channel("h", 1))
        pump(agent, relay)
        for event in relay.events_received():
            if isinstance(event, ChannelOpenRequested):
                relay.accept_channel(event.channel_id)
        pump(agent, relay)
    return opened


def test_channels_past_what_the_budget_covers_open_small_and_the_bound_holds() -> None:
    """With max_buffered_size below channels x initial_window, OPENs are accepted at the
    16 KiB window up to 3/4 of the budget, the first few get initial_window from the pool,
    and a peer that fills every window makes us hold no more than max_buffered_size."""
    agent = Session(Role.AGENT)
    relay = Session(Role.RELAY, max_buffered_size=BUDGET)
    opened = _open_all(agent, relay, 100)
    assert agent.peer_settings is not None
    assert agent.peer_settings.initial_window == DEFAULT_OPEN_WINDOW
    refused = [e.channel_id for e in agent.events_received()
               if isinstance(e, ChannelOpenFailed) and e.reason == OpenFailure.LIMIT_REACHED]
    assert refused == opened[96:]
    capacities = [agent.send_capacity(cid) for cid in opened[:96]]
    assert capacities == [DEFAULT_INITIAL_WINDOW] * 2 + [DEFAULT_OPEN_WINDOW] * 94
    for channel_id in opened[:96]:
        agent.send_data(channel_id, bytes(agent.send_capacity(channel_id)))
    pump(agent, relay)
    assert relay.buffered_size == 2 * DEFAULT_INITIAL_WINDOW + 94 * DEFAULT_OPEN_WINDOW
    assert relay.buffered_size <= relay.max_buffered_size == BUDGET
    assert all(agent.send_capacity(cid) == 0 for cid in opened)
    assert agent.failure is None and relay.failure is None


def _stream(agent: Session, relay: Session, channel_id: int, size: int) -> None:
    """Send ``size`` bytes as fast as credit allows; the relay reads everything at once."""
    while size:
        chunk = min(size, agent.send_capacity(channel_id))
        agent.send_data(channel_id, bytes(chunk))
        size -= chunk
        transfer(agent, relay)
        relay.acknowledge(channel_id, relay.buffered_size)
        transfer(relay, agent)


def test_a_channel_opened_small_grows_to_initial_window_once_the_pool_has_room() -> None:
    """A busy channel that opened at 16 KiB grows from what the pool has left, and to
    initial_window (not beyond: it has company) once a topped-up channel ends."""
    agent, relay = connected_pair(max_buffered_size=BUDGET)
    first, _second, third = (open_accepted(agent, relay) for _ in range(3))
    _stream(agent, relay, third, 40 * DEFAULT_INITIAL_WINDOW)
    assert agent.send_capacity(third) == DEFAULT_OPEN_WINDOW + 2 * 16 * KIB  # the pool's rest
    agent.reset_channel(first)
    pump(agent, relay)
    _stream(agent, relay, third, 40 * DEFAULT_INITIAL_WINDOW)
    assert agent.send_capacity(third) == DEFAULT_INITIAL_WINDOW
    assert agent.failure is None and relay.failure is None


def test_a_channel_we_open_small_is_topped_up_only_after_the_peers_open_ok() -> None:
    """Our own OPENs get their top-up WINDOW after the peer's OPEN_OK: before it the
    peer's send half is PENDING, where a WINDOW is a protocol error (old peers too)."""
    agent, relay = connected_pair(max_buffered_size=BUDGET)
    channel_id = relay.open_channel("h", 1)
    pump(agent, relay)
    assert agent.failure is None
    agent.accept_channel(channel_id)
    pump(agent, relay)
    assert agent.send_capacity(channel_id) == DEFAULT_INITIAL_WINDOW
    assert agent.failure is None and relay.failure is None


def test_the_default_budget_carries_the_default_channel_limit() -> None:
    """256 MiB (the relay's max_buffered_size) carries DEFAULT_MAX_CHANNELS channels
    of at least 16 KiB, with the first ~400 opening at initial_window, and every
    window the peer could fill together stays within the 256 MiB."""
    budget = 256 * MIB
    relay = Session(Role.RELAY, max_buffered_size=budget)
    assert relay.max_channels == DEFAULT_MAX_CHANNELS >= 10_000
    assert relay.open_window == DEFAULT_OPEN_WINDOW
    full = (budget - DEFAULT_MAX_CHANNELS * DEFAULT_OPEN_WINDOW) // TOP_UP
    assert full >= 400
    agent = Session(Role.AGENT, max_channels=2 * DEFAULT_MAX_CHANNELS)
    pump(agent, relay)
    opened = [agent.open_channel("h", 1) for _ in range(DEFAULT_MAX_CHANNELS + 1)]
    pump(agent, relay)
    requested = [e.channel_id for e in relay.events_received()
                 if isinstance(e, ChannelOpenRequested)]
    assert requested == opened[:DEFAULT_MAX_CHANNELS]
    for channel_id in requested:
        relay.accept_channel(channel_id)
    pump(agent, relay)
    granted = [agent.send_capacity(cid) for cid in requested]
    assert granted.count(DEFAULT_INITIAL_WINDOW) == full
    assert sum(granted) <= budget


def test_no_top_up_for_a_channel_whose_opener_already_sent_fin() -> None:
    """After a peer's FIN no WINDOW goes out for that channel (PROTOCOL.md section 5),
    so a channel accepted after its OPEN and FIN gets no top-up either."""
    agent, relay = connected_pair(max_buffered_size=BUDGET)
    channel_id = agent.open_channel("h", 1)
    agent.send_eof(channel_id)
    pump(agent, relay)
    relay.accept_channel(channel_id)
    records = list(iter(relay.next_record, None))
    assert records and all(record[0] != RecordType.WINDOW for record in records)
