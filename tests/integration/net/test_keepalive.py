"""TunnelTransport's keepalive: ping when nothing has arrived for ping_interval.

What users rely on: an idle tunnel moves bytes both ways every interval (so
proxies do not cut it), a dead peer is dropped within ``ping_interval +
ping_timeout``, and (issue 22) a relay with many idle agents does not ping
those that ping it, which halves what idle sessions cost it. The peer here is
a bare WebSocket client (``ws.WebSocketConnection``), so the relay's pings can
be counted; trio's autojump clock makes the minutes instant.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from wstunnel import mux, ws
from wstunnel.net.keepalive import Check, Due, KeepaliveTimer
from wstunnel.net.transport import TunnelTransport
from wstunnel.protocol import TunnelProtocol

INTERVAL = 10.0
TIMEOUT = 5.0


class Peer:
    """The agent's end, by hand: answers pings while it reads, pings when told."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.connection = ws.WebSocketConnection(ws.Role.CLIENT)
        self.pings_received = 0

    async def run_for(self, seconds: float, ping_every: float = math.inf) -> None:
        """Read (and answer) for ``seconds``, sending a ping every ``ping_every``."""
        until = trio.current_time() + seconds
        next_ping = trio.current_time() + ping_every
        while (now := trio.current_time()) < until:
            if now >= next_ping:
                self.connection.ping(b"agent")
                next_ping += ping_every
            with trio.move_on_at(min(next_ping, until)):
                data = await self.stream.receive_some()
                assert data, "the relay closed the connection"
                self.connection.receive_data(data)
                self.pings_received += sum(isinstance(event, ws.PingReceived)
                                           for event in self.connection.events_received())
            out = self.connection.data_to_send()
            if out:
                await self.stream.send_all(out)


@pytest.mark.parametrize("timer", ["own", "shared"])
async def test_the_relay_pings_only_a_peer_that_has_gone_quiet(
    timer: str, autojump_clock: trio.abc.Clock,
) -> None:
    """While the agent pings (every 4 s, interval 10 s) the relay sends no ping of its
    own, only answers; when the agent stops pinging but still answers, the relay pings
    once an interval; when the agent stops answering too, the relay drops the session
    within ping_interval + ping_timeout. The same whether the session runs its own
    timer (an agent) or shares a relay's with other sessions."""
    agent_end, relay_end = trio.testing.memory_stream_pair()
    shared = KeepaliveTimer() if timer == "shared" else None
    relay = TunnelTransport(relay_end, TunnelProtocol(mux.Role.RELAY), name="relay",
                            ping_interval=INTERVAL, ping_timeout=TIMEOUT, keepalive=shared)
    peer = Peer(agent_end)
    async with trio.open_nursery() as nursery:
        if shared is not None:
            await nursery.start(shared.run)
            # (other sessions' checks, due every 0.1 s: the timer is awake within the
            # relay's slack before each of its deadlines, and runs its check early)
            shared.schedule(lambda now, deadline: (deadline + 0.1, 0.0),
                            trio.current_time() + 0.05)
        ended = trio.Event()
        reason: list[str] = []
        ended_at: list[float] = []

        async def run_relay() -> None:
            reason.append(await relay.run())
            ended_at.append(trio.current_time())
            ended.set()

        nursery.start_soon(run_relay)
        await peer.run_for(60.0, ping_every=4.0)
        spared = peer.pings_received
        await peer.run_for(60.0)
        quiet = peer.pings_received - spared
        silent_at = trio.current_time()  # the peer reads and answers no more
        with trio.fail_after(INTERVAL + TIMEOUT + 1.0):
            await ended.wait()
        dropped_after = ended_at[0] - silent_at
        nursery.cancel_scope.cancel()  # (the shared timer)
    assert spared == 0
    assert 5 <= quiet <= 6  # one ping per 10 s of quiet
    assert reason == [f"no answer to ping within {TIMEOUT:g} s"]
    assert dropped_after <= INTERVAL + TIMEOUT + 0.01


async def test_a_peer_silent_since_just_after_a_check_is_dropped_within_interval_and_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A peer whose last bytes came just after the relay's keepalive check (a path gone
    dead in the middle of a transfer, no reset) is pinged once it has been quiet for
    ping_interval and dropped within ping_interval + ping_timeout of its last bytes
    (and the slack), not pinged at the check after next (it took up to twice the
    interval: 50 s instead of 30 s with the defaults)."""
    agent_end, relay_end = trio.testing.memory_stream_pair()
    relay = TunnelTransport(relay_end, TunnelProtocol(mux.Role.RELAY), name="relay",
                            ping_interval=INTERVAL, ping_timeout=TIMEOUT)
    peer = Peer(agent_end)
    ended_at: list[float] = []
    ended = trio.Event()
    async with trio.open_nursery() as nursery:
        async def run_relay() -> None:
            await relay.run()
            ended_at.append(trio.current_time())
            ended.set()

        nursery.start_soon(run_relay)
        await peer.run_for(0.5)  # (the relay's first check is due at INTERVAL)
        peer.connection.ping(b"last words")
        await agent_end.send_all(peer.connection.data_to_send())
        silent_at = trio.current_time()  # the peer reads and answers no more
        with trio.fail_after(2 * INTERVAL + TIMEOUT + 1.0):
            await ended.wait()
    assert ended_at[0] - silent_at <= INTERVAL + TIMEOUT + INTERVAL / 20 + 0.01


class Calls:
    """Checks that record when the timer called them, each rescheduled ``repeat`` times."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.start = trio.current_time()

    def check(self, name: str, repeat: int = 0, every: float = 1.0) -> Check:
        left = [repeat]

        def called(now: float, deadline: float) -> Due:
            self.calls.append((name, round(now - self.start, 6)))
            if name == "broken":
                raise RuntimeError("a bug in one session's check")
            if not left[0]:
                return None
            left[0] -= 1
            return deadline + every, 0.0

        return called


async def test_checks_due_within_their_slack_share_one_wake_up(
    autojump_clock: trio.abc.Clock,
) -> None:
    """One wake-up of a relay's timer calls every check due within its slack (many idle
    sessions, one wake-up); a check with no slack is never called early, a cancelled
    one never, a rescheduled one again; a check that raises stops only itself."""
    timer = KeepaliveTimer()
    record = Calls()
    start = record.start
    async with trio.open_nursery() as nursery:
        await nursery.start(timer.run)
        timer.schedule(record.check("a"), start + 1.0, 0.5)
        timer.schedule(record.check("b", repeat=2), start + 1.1, 0.5)
        timer.schedule(record.check("c"), start + 1.6, 0.5)
        timer.schedule(record.check("exact"), start + 1.2)
        timer.schedule(record.check("cancelled"), start + 1.05, 0.5).cancel()
        timer.schedule(record.check("broken", repeat=5), start + 0.3)
        await trio.sleep(5.0)
        nursery.cancel_scope.cancel()
    assert record.calls == [("broken", 0.3), ("a", 1.0), ("b", 1.0), ("exact", 1.2),
                            ("c", 1.2), ("b", 2.1), ("b", 3.1)]


@pytest.mark.parametrize("framed", [False, True], ids=["websocket", "http-transport"])
async def test_no_ping_once_the_close_handshake_has_begun(
    framed: bool, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture,
) -> None:
    """Shutting down while the peer is unreachable (a dead link, a stopped peer): our
    close waits for the peer's, the keepalive comes due meanwhile and must not ping a
    closing connection (it raised LocalProtocolError, logged at ERROR with a
    traceback: "keepalive check failed", on every such shutdown; chaos hunt). The
    close still ends within its timeout."""
    relay_end, _silent_peer = trio.testing.memory_stream_pair()
    relay = TunnelTransport(relay_end, TunnelProtocol(mux.Role.RELAY, framed=framed),
                            name="relay",
                            ping_interval=1.0, ping_timeout=5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        await trio.sleep(0.5)
        start = trio.current_time()
        with trio.fail_after(3.0):
            await relay.close(timeout=2.0)
        closed_after = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    assert closed_after == pytest.approx(2.0, abs=0.01)
