"""A peer that sends and never reads cannot make a session queue answers without bound
(docs/SECURITY.md, "Memory per session"): the transport stops reading while
MAX_CONTROL_BACKLOG control records wait, and TCP holds the peer back."""

from __future__ import annotations

import trio
import trio.testing

from wstunnel import mux, ws
from wstunnel.mux import wire
from wstunnel.net.carrier_io import MAX_CONTROL_BACKLOG
from wstunnel.net.channel_stream import ChannelStream
from wstunnel.net.transport import TunnelTransport
from wstunnel.protocol import TunnelProtocol

OPENS = 20_000
BATCH = 100
KEY = b"\x01\x02\x03\x04"


def _opens(first_id: int, count: int) -> bytes:
    """``count`` OPENs from a raw agent (odd ids from ``first_id``), one message each."""
    return b"".join(
        ws.encode_frame(ws.Opcode.BINARY, wire.encode_record(
            wire.Open(first_id + 2 * i, mux.ChannelKind.TCP, "db.example", 5432)), mask_key=KEY)
        for i in range(count))


async def test_a_peer_that_opens_and_never_reads_is_held_back() -> None:
    """20,000 OPENs, each refused at once, from a peer that does not read: the session
    reads (and answers) no more than MAX_CONTROL_BACKLOG and one read beyond while
    its answers wait; once the peer reads, every OPEN gets its OPEN_FAILED."""
    agent_end, relay_end = trio.testing.lockstep_stream_pair()  # (a send waits for a read)
    read: list[int] = []

    def refuse(transport: TunnelTransport, channel: ChannelStream) -> None:
        read.append(channel.channel_id)
        transport.refuse(channel, mux.OpenFailure.FORBIDDEN,
                         "no allow rule matches db.example port 5432")

    relay = TunnelTransport(relay_end, TunnelProtocol(mux.Role.RELAY), name="relay",
                            open_now=refuse, ping_interval=0)
    agent = TunnelProtocol(mux.Role.AGENT)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)

            async def flood() -> None:
                await agent_end.send_all(agent.data_to_send())  # SETTINGS
                for first in range(1, 2 * OPENS, 2 * BATCH):
                    await agent_end.send_all(_opens(first, BATCH))

            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked()
            assert len(read) <= MAX_CONTROL_BACKLOG + 2 * BATCH
            failed = 0
            answers = ws.FrameDecoder(client=True)
            while failed < OPENS:
                answers.receive_data(await agent_end.receive_some())
                while (frame := answers.next_frame()) is not None:
                    failed += isinstance(wire.decode_record(frame.payload), wire.OpenFailed)
            assert len(read) == OPENS
            nursery.cancel_scope.cancel()
