"""The rate sampler (``TunnelStats.sample``, once a second) and sessions that go idle.

What users rely on: the dashboard's per-session rate says what moved in the
last sample, also for a session that was idle for a long time before (the
sampler leaves idle sessions alone: 1,000 idle agents on a relay cost it half a
percent of a core when each was metered every second), and falls to zero once
the session's channels are done. Stand-ins for the transport and channel: the
sampler reads only a few attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import trio

from wstunnel import mux
from wstunnel.service.metrics import TunnelStats


@dataclass(eq=False)
class FakeChannel:
    session: Any
    forward: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(eq=False)
class FakeTransport:
    name: str = "agent"
    stream: Any = None
    channels: dict[int, FakeChannel] = field(default_factory=dict)

    @property
    def protocol(self) -> Any:
        return self

    @property
    def session(self) -> Any:
        return self

    refused_opens: dict[Any, int] = field(default_factory=dict)
    budget_exhaustions: int = 0


async def _samples(stats: TunnelStats, count: int) -> None:
    for _ in range(count):
        await trio.sleep(1.0)
        stats.sample()


async def test_a_session_idle_for_long_shows_its_new_rate_then_zero(
    autojump_clock: trio.abc.Clock,
) -> None:
    stats = TunnelStats("relay")
    transport = FakeTransport()
    stats.session_started(cast(Any, transport), agent="a", peer="127.0.0.1:1")
    [info] = stats.session_info.values()
    await _samples(stats, 30)  # (idle: nothing to meter)
    await trio.sleep(0.5)
    channel = FakeChannel(transport)
    transport.channels[1] = channel
    stats.channel_opened(cast(Any, channel))
    await trio.sleep(0.5)
    channel.bytes_sent = 100_000  # (within the second before the sample)
    stats.sample()
    assert info.meter.sent_rate >= 100_000  # (not spread over the idle half minute)
    assert stats.bytes_carried() == (100_000, 0)
    channel.bytes_sent = 150_000  # (its last bytes, then it closes between two samples)
    del transport.channels[1]
    stats.channel_closed(cast(Any, channel))
    await _samples(stats, 1)
    assert info.meter.sent_rate == 50_000
    await _samples(stats, 1)
    assert info.meter.sent == 150_000
    assert info.meter.sent_rate == 0.0
    assert stats.bytes_carried() == (150_000, 0)


async def test_an_idle_sessions_multiplexer_refusal_shows_at_the_next_sample(
    autojump_clock: trio.abc.Clock,
) -> None:
    """OPENs a session's multiplexer refuses by itself (here: after GOAWAY) reach the
    recent refusals at the next sample, counted together, also for a session with no
    channels; the session reports them as they happen (``peer_open_refused``), so
    the sampler does not have to look at every idle session each second."""
    stats = TunnelStats("relay")
    quiet, refusing = FakeTransport(name="quiet"), FakeTransport(name="refusing")
    for transport in (quiet, refusing):
        stats.session_started(cast(Any, transport), agent="a", peer="127.0.0.1:1")
    await _samples(stats, 2)
    refusing.refused_opens[mux.OpenFailure.GOING_AWAY] = 3
    for _ in range(3):
        stats.peer_open_refused(refusing, mux.OpenFailure.GOING_AWAY)
    await _samples(stats, 1)
    assert [(r.session, r.reason, r.count) for r in stats.recent_refusals] == [
        ("refusing", "going_away", 3)]
    await _samples(stats, 2)  # (nothing new: nothing more)
    assert len(stats.recent_refusals) == 1
