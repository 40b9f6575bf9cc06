"""The dashboard's data: meters, the bounded history, and the JSON document."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from wstunnel import mux
from wstunnel.service.dashboard import RECENT_REFUSALS, History, Meter, SessionInfo
from wstunnel.service.dashboard_status import MAX_SESSIONS_SHOWN, DocumentCache, status_document
from wstunnel.service.metrics import TunnelStats

CONFIG_MD = Path(__file__).resolve().parents[3] / "docs" / "CONFIG.md"


@dataclass(eq=False)
class _Transport:
    """What the document reads of a live session (hashable by identity, like the real one)."""

    channels: dict[int, Any] = field(default_factory=dict)
    opened_total: int = 0
    name: str = "session"
    protocol: Any = field(default_factory=lambda: SimpleNamespace(
        session=SimpleNamespace(refused_opens={})))


@dataclass(eq=False)
class _Channel:
    forward: str | None
    bytes_sent: int = 0
    bytes_received: int = 0


def _add_session(stats: TunnelStats, agent: str, rate: float, *forwards: str | None) -> None:
    transport = _Transport({i: _Channel(f) for i, f in enumerate(forwards)}, len(forwards) + 1)
    info = SessionInfo(agent, f"10.0.0.{len(stats.sessions) + 1}:4000", False, 1000.0,
                       forwards=Counter([*forwards, None]))
    info.meter.add(int(rate), 2 * int(rate))
    info.meter.sent_rate, info.meter.received_rate = rate, 2 * rate
    stats.sessions[transport] = 0.0  # type: ignore[index]
    stats.session_info[transport] = info  # type: ignore[index]


def test_meter_rates_cover_what_was_added_between_ticks() -> None:
    """The first tick only sets the start; later ones give bytes per second since the
    previous tick, each direction on its own."""
    meter = Meter()
    meter.add(500, 0)
    meter.tick(10.0)
    assert (meter.sent_rate, meter.received_rate) == (0.0, 0.0)
    meter.add(1000, 4000)
    meter.tick(12.0)
    assert (meter.sent_rate, meter.received_rate) == (500.0, 2000.0)
    assert (meter.sent, meter.received) == (1500, 4000)


def test_history_keeps_the_last_points_only() -> None:
    """One point per sample after the first, rates from the totals, at most `size` kept."""
    history = History(size=3)
    for second in range(6):
        history.add(float(second), 1000.0 + second, 100 * second * second, 7 * second)
    assert [p[0] for p in history.points] == [1003.0, 1004.0, 1005.0]
    assert history.points[-1][1:] == (900.0, 7.0)  # 2500 - 1600 bytes in one second
    assert history.rates == (900.0, 7.0)


def test_document_lists_sessions_busiest_first_with_their_forwards() -> None:
    """Each session shows its agent, source, transport, TLS, start, channels by forward
    ("-" for none) and rates; the busiest come first; the totals add up."""
    stats = TunnelStats("relay")
    _add_session(stats, "laptop", 10.0, "web")
    _add_session(stats, "ci", 5000.0, "db", None, "db")
    document = json.loads(json.dumps(status_document(stats)))
    assert document["role"] == "relay"
    first, second = document["sessions"]
    assert (first["agent"], second["agent"]) == ("ci", "laptop")
    assert first["peer"] == "10.0.0.2:4000" and first["transport"] == "websocket"
    assert first["tls"] is False and first["up_since"] == 1000.0
    assert (first["rate_out"], first["rate_in"]) == (5000.0, 10000.0)
    assert first["channels_open"] == 3 and first["channels_total"] == 4
    assert first["forwards"] == [
        {"forward": "-", "channels_open": 1, "channels_total": 2},
        {"forward": "db", "channels_open": 2, "channels_total": 2}]
    assert document["totals"]["sessions"] == 2 and document["totals"]["channels_open"] == 4


def test_document_lists_at_most_the_busiest_sessions() -> None:
    """Past MAX_SESSIONS_SHOWN sessions the list stops (busiest kept); totals count all."""
    stats = TunnelStats("relay")
    for index in range(MAX_SESSIONS_SHOWN + 5):
        _add_session(stats, f"agent{index}", float(index))
    document = status_document(stats)
    assert len(document["sessions"]) == MAX_SESSIONS_SHOWN
    assert document["sessions"][-1]["agent"] == "agent5"
    assert document["totals"]["sessions"] == MAX_SESSIONS_SHOWN + 5


def test_refusals_by_reason_and_the_most_recent_first() -> None:
    """Refused opens are counted by reason, and the last RECENT_REFUSALS listed newest
    first."""
    stats = TunnelStats("agent")
    for _ in range(RECENT_REFUSALS + 3):
        stats.open_failed(mux.OpenFailure.FORBIDDEN)
    stats.open_failed(mux.OpenFailure.TIMEOUT)
    refusals = status_document(stats)["refusals"]
    assert refusals["by_reason"] == {"forbidden": RECENT_REFUSALS + 3, "timeout": 1}
    assert len(refusals["recent"]) == RECENT_REFUSALS
    assert refusals["recent"][0]["reason"] == "timeout"
    assert "refused by the relay" in refusals["recent"][0]["text"]


def test_the_document_is_built_once_per_sample() -> None:
    """Pollers between two samples get the same body; a new sample makes a new one."""
    stats = TunnelStats("relay")
    stats.samples_taken = 1
    cache = DocumentCache(stats)
    first = cache.body()
    stats.reconnects = 3
    assert cache.body() is first
    stats.samples_taken = 2
    assert json.loads(cache.body())["totals"]["reconnects"] == 3


def _documented_fields() -> set[str]:
    text = CONFIG_MD.read_text(encoding="utf-8")
    section = text.split("### The dashboard", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"`([a-z_]+)`", section))


def _fields(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {name for item in value.values() for name in _fields(item)}
    if isinstance(value, list):
        return {name for item in value for name in _fields(item)}
    return set()


def test_every_field_is_documented() -> None:
    """docs/CONFIG.md's dashboard section names every field of the document."""
    stats = TunnelStats("relay")
    _add_session(stats, "laptop", 1.0, "web")
    stats.open_failed(mux.OpenFailure.FORBIDDEN)
    document = status_document(stats)
    document["refusals"]["by_reason"] = {}  # (its keys are reasons, not fields)
    assert _fields(document) - _documented_fields() == set()
