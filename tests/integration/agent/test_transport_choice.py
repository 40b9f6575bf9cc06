"""Which transport the agent uses (agent/transports.py): the order, what stops it, memory."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from wstunnel.agent import transports
from wstunnel.agent.connect import UpgradeBlocked
from wstunnel.agent.http_transport import HttpBlocked
from wstunnel.agent.transports import Opened, Request, TransportChooser
from wstunnel.config import AgentConfig
from wstunnel.errors import AuthenticationError

from ..log_watch import LogWatch


def _request(transport: str = "auto") -> Request:
    config = AgentConfig(relay="ws://127.0.0.1:9/tunnel", transport=transport, proxy="none")
    return Request(config, config.relay_url, None, [], None)


def _fake(monkeypatch: pytest.MonkeyPatch, failures: dict[str, Exception]) -> list[str]:
    tried: list[str] = []

    async def attempt(request: Request, name: str) -> Opened:
        await trio.sleep(0)
        tried.append(name)
        if name in failures:
            raise failures[name]
        return Opened(trio.testing.memory_stream_pair()[0], b"", name)

    monkeypatch.setattr(transports, "_attempt", attempt)
    return tried


async def test_auto_falls_back_in_order_and_remembers(monkeypatch: pytest.MonkeyPatch,
                                                      logs: LogWatch) -> None:
    """WebSocket stripped, streaming buffered: polling is used and said so in one line,
    with the setting that goes straight to it; the next connect starts with polling."""
    tried = _fake(monkeypatch, {
        "websocket": UpgradeBlocked("...", 426, "WebSocket upgrade stripped by x"),
        "streaming": HttpBlocked("...", "no answer within 3 s")})
    chooser = TransportChooser()
    assert (await chooser.open(_request())).transport == "polling"
    assert tried == ["websocket", "streaming", "polling"]
    line = await logs.wait_for("using HTTP polling")
    assert line == ("WebSocket upgrade stripped by x; HTTP streaming did not pass (no answer "
                    "within 3 s); using HTTP polling (set transport: polling or --transport "
                    "polling to skip the WebSocket and HTTP streaming attempts)")
    tried.clear()
    assert (await chooser.open(_request())).transport == "polling"
    assert tried == ["polling"]


async def test_a_refused_login_is_not_a_reason_to_fall_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """401 from the relay: no other transport is tried, the error is the relay's."""
    tried = _fake(monkeypatch, {"websocket": AuthenticationError("bad token", 401)})
    with pytest.raises(AuthenticationError):
        await TransportChooser().open(_request())
    assert tried == ["websocket"]


async def test_a_forced_transport_is_the_only_one_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    """transport: streaming tries streaming alone, and its failure is the error."""
    tried = _fake(monkeypatch, {"streaming": HttpBlocked("buffered", "b")})
    with pytest.raises(HttpBlocked):
        await TransportChooser().open(_request("streaming"))
    assert tried == ["streaming"]
