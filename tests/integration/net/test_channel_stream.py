"""ChannelStream honours trio's HalfCloseableStream contract over a real session pair."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from wstunnel import mux
from wstunnel.net.channel_stream import ChannelStream
from wstunnel.net.transport import TunnelTransport
from wstunnel.protocol import TunnelProtocol


async def _session_pair(
    nursery: trio.Nursery,
) -> tuple[TunnelTransport, trio.MemoryReceiveChannel[ChannelStream]]:
    """An agent transport and the relay-side channels it opens, over memory streams."""
    agent_end, relay_end = trio.testing.memory_stream_pair()
    send, receive = trio.open_memory_channel[ChannelStream](100)

    async def on_open(transport: TunnelTransport, channel: ChannelStream) -> None:
        assert transport.accept(channel)
        await send.send(channel)

    agent = TunnelTransport(
        agent_end, TunnelProtocol(mux.Role.AGENT), name="agent", ping_interval=0
    )
    relay = TunnelTransport(
        relay_end, TunnelProtocol(mux.Role.RELAY), name="relay", on_open=on_open, ping_interval=0
    )
    await nursery.start(agent.run)
    await nursery.start(relay.run)
    return agent, receive


async def test_channel_stream_passes_trio_half_closeable_stream_checks() -> None:
    """send_all/receive_some/send_eof/aclose behave as trio requires (busy, closed, EOF rules)."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def maker() -> tuple[Any, Any]:
                agent, incoming = await _session_pair(nursery)
                local = agent.open_channel("example.net", 80)
                remote = await incoming.receive()
                return local, remote

            await trio.testing.check_half_closeable_stream(maker, None)
            nursery.cancel_scope.cancel()


async def test_slow_reader_does_not_stall_other_channels() -> None:
    """A channel nobody reads fills its window; another channel keeps flowing."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            agent, incoming = await _session_pair(nursery)
            stuck = agent.open_channel("stuck", 1)
            await incoming.receive()  # accepted, never read
            capacity = agent.protocol.send_capacity
            while capacity(stuck.channel_id) > 0:  # fill its window; nobody acknowledges
                await stuck.send_all(b"x" * capacity(stuck.channel_id))
            assert agent.protocol.send_capacity(stuck.channel_id) == 0
            live = agent.open_channel("live", 2)
            remote = await incoming.receive()
            for _ in range(50):
                await live.send_all(b"y" * 65536)
                got = 0
                while got < 65536:
                    got += len(await remote.receive_some())
            nursery.cancel_scope.cancel()
