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

import trio
import trio.testing

from wstunnel import mux, ws
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


async def test_the_relay_pings_only_a_peer_that_has_gone_quiet(
    autojump_clock: trio.abc.Clock,
) -> None:
    """While the agent pings (every 4 s, interval 10 s) the relay sends no ping of its
    own, only answers; when the agent stops pinging but still answers, the relay pings
    once an interval; when the agent stops answering too, the relay drops the session
    within ping_interval + ping_timeout."""
    agent_end, relay_end = trio.testing.memory_stream_pair()
    relay = TunnelTransport(relay_end, TunnelProtocol(mux.Role.RELAY), name="relay",
                            ping_interval=INTERVAL, ping_timeout=TIMEOUT)
    peer = Peer(agent_end)
    async with trio.open_nursery() as nursery:
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
    assert spared == 0
    assert 5 <= quiet <= 6  # one ping per 10 s of quiet
    assert reason == [f"no answer to ping within {TIMEOUT:g} s"]
    assert dropped_after <= INTERVAL + TIMEOUT + 0.01
