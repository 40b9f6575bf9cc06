"""DatagramFlow (net/udp_flow.py): a flow never waits and never grows. Without send
capacity its queue keeps the newest datagrams up to its bound, dropping (and
counting) the oldest; a datagram once started is finished, never dropped."""

from __future__ import annotations

import trio

from wstunnel import mux
from wstunnel.mux.datagram import DatagramDecoder, frame_datagram
from wstunnel.net.channel_stream import ChannelStream
from wstunnel.net.udp_flow import DatagramFlow, UdpStats


class FakeHost:
    """A ChannelHost whose send capacity the test sets; it records the DATA."""

    name = "fake"
    role = mux.Role.AGENT

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.sent = bytearray()

    def send_capacity(self, channel: ChannelStream) -> int:
        return self.capacity

    def send_data(self, channel: ChannelStream, data: bytes) -> None:
        assert len(data) <= self.capacity, "a flow must never send past its capacity"
        self.capacity -= len(data)
        self.sent += data

    def send_eof(self, channel: ChannelStream) -> None: ...

    def reset(self, channel: ChannelStream, code: mux.ResetCode, text: str, *,
              after_data: bool = False) -> bool:
        return True

    def acknowledge(self, channel: ChannelStream, size: int) -> None: ...
    def wake_writer(self) -> None: ...
    def dispatch_local_events(self) -> None: ...


def datagram(n: int) -> bytes:
    return n.to_bytes(4, "big") * 250  # 1,000 bytes


async def test_without_capacity_the_oldest_datagrams_are_dropped_and_counted() -> None:
    """10,000 datagrams into a flow whose channel has no credit: memory stays at the
    queue's bound (64 KiB), the survivors are the newest, the rest counted as drops;
    when credit comes, exactly the survivors cross, whole and in order."""
    host = FakeHost(capacity=0)
    channel = ChannelStream(host, 1, "10.0.0.53", 53, kind=mux.ChannelKind.UDP)
    stats = UdpStats()
    flow = DatagramFlow(lambda data: None, idle_timeout=None, stats=stats, channel=channel)
    for n in range(10_000):
        flow.send(datagram(n))
        assert flow.queued_size <= 64 * 1024
    kept = flow.queued_size // len(frame_datagram(datagram(0)))
    assert stats.dropped["queue_full"] == 10_000 - kept
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flow.run, channel)
        await trio.testing.wait_all_tasks_blocked()
        host.capacity = 10_500  # ten datagrams and a half
        channel._wake_writable()  # (what a WINDOW does)
        await trio.testing.wait_all_tasks_blocked()
        host.capacity = 1 << 20
        channel._wake_writable()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    out = DatagramDecoder().receive_data(bytes(host.sent))
    assert out == [datagram(n) for n in range(10_000 - kept, 10_000)]
    assert stats.datagrams_sent == kept


async def test_with_capacity_a_datagram_leaves_at_once() -> None:
    """With credit and nothing queued, ``send`` puts the datagram into the channel in
    the caller's task (no task switch, nothing held)."""
    host = FakeHost(capacity=1 << 20)
    channel = ChannelStream(host, 1, "10.0.0.53", 53, kind=mux.ChannelKind.UDP)
    flow = DatagramFlow(lambda data: None, idle_timeout=None, stats=UdpStats(), channel=channel)
    flow.send(b"query")
    assert bytes(host.sent) == frame_datagram(b"query")
    assert flow.queued_size == 0
