"""DatagramFlow (net/udp_flow.py): a flow never waits and never grows. Without send
capacity its queue keeps the newest datagrams up to its bound, dropping (and
counting) the oldest; a datagram once started is finished, never dropped."""

from __future__ import annotations

import trio

from wstunnel import mux
from wstunnel.mux.datagram import MAX_DATAGRAM_SIZE, DatagramDecoder, frame_datagram
from wstunnel.net.channel_stream import ChannelStream
from wstunnel.net.udp_flow import FIN_WAIT_TIMEOUT, DatagramBudget, DatagramFlow, UdpStats


class FakeHost:
    """A ChannelHost whose send capacity the test sets; it records the DATA."""

    name = "fake"
    role = mux.Role.AGENT

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.sent = bytearray()
        self.eof_at: int | None = None  # len(sent) when the FIN was queued
        self.reset_code: mux.ResetCode | None = None

    def send_capacity(self, channel: ChannelStream) -> int:
        return 0 if self.eof_at is not None else self.capacity

    def send_data(self, channel: ChannelStream, data: bytes) -> None:
        assert len(data) <= self.capacity, "a flow must never send past its capacity"
        assert self.eof_at is None, "no DATA after FIN"
        self.capacity -= len(data)
        self.sent += data

    def send_eof(self, channel: ChannelStream) -> None:
        self.eof_at = len(self.sent)

    def reset(self, channel: ChannelStream, code: mux.ResetCode, text: str, *,
              after_data: bool = False) -> bool:
        self.reset_code = code
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


async def test_the_fin_answering_the_peers_follows_the_queued_datagrams() -> None:
    """The peer's FIN arrives while datagrams wait for credit: they go first, then our
    FIN (docs/PROTOCOL.md 4.2: "after the datagrams it had queued")."""
    host = FakeHost(capacity=0)
    channel = ChannelStream(host, 1, "10.0.0.53", 53, kind=mux.ChannelKind.UDP)
    stats = UdpStats()
    flow = DatagramFlow(lambda data: None, idle_timeout=None, stats=stats, channel=channel)
    for n in range(3):
        flow.send(datagram(n))
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flow.run, channel)
            await trio.testing.wait_all_tasks_blocked()
            channel._deliver_eof()  # (the peer's FIN)
            await trio.testing.wait_all_tasks_blocked()
            assert not flow.accepting, "a new datagram goes to a new flow"
            host.capacity = 1 << 20  # (the peer's WINDOW, after its FIN)
            channel._wake_writable()
    assert host.eof_at == len(host.sent), "our FIN was sent, after the datagrams"
    assert DatagramDecoder().receive_data(bytes(host.sent)) == [datagram(n) for n in range(3)]
    assert stats.datagrams_sent == 3


async def test_without_credit_the_answering_fin_still_leaves_within_the_fin_wait(
        autojump_clock: trio.abc.Clock) -> None:
    """The queued datagrams never get credit: the FIN goes anyway before the peer's FIN
    wait (FIN_WAIT_TIMEOUT) runs out, and the datagrams left are counted as dropped."""
    host = FakeHost(capacity=0)
    channel = ChannelStream(host, 1, "10.0.0.53", 53, kind=mux.ChannelKind.UDP)
    stats = UdpStats()
    flow = DatagramFlow(lambda data: None, idle_timeout=None, stats=stats, channel=channel)
    for n in range(3):
        flow.send(datagram(n))
    channel._deliver_eof()  # (the peer's FIN)
    with trio.fail_after(FIN_WAIT_TIMEOUT - 1):
        assert await flow.run(channel) == "the peer ended the flow"
    assert host.eof_at == 0 and host.sent == b""
    assert stats.dropped["closing"] == 3


async def test_a_datagram_begun_when_the_fin_must_go_resets_the_flow_instead(
        autojump_clock: trio.abc.Clock) -> None:
    """Credit ran out inside a datagram and never comes back: a FIN would end the flow
    cleanly with half a datagram sent, so the flow is reset instead (a datagram once
    begun is finished, or the channel fails)."""
    host = FakeHost(capacity=300)
    channel = ChannelStream(host, 1, "10.0.0.53", 53, kind=mux.ChannelKind.UDP)
    stats = UdpStats()
    flow = DatagramFlow(lambda data: None, idle_timeout=None, stats=stats, channel=channel)
    flow.send(datagram(1))  # (300 of its 1,002 framed bytes fit)
    channel._deliver_eof()  # (the peer's FIN)
    with trio.fail_after(FIN_WAIT_TIMEOUT - 1):
        await flow.run(channel)
    assert host.eof_at is None and host.reset_code is mux.ResetCode.CANCELLED
    assert len(host.sent) == 300 and stats.dropped["closing"] == 1


async def test_the_idle_fin_follows_the_queued_datagrams(
        autojump_clock: trio.abc.Clock) -> None:
    """A flow goes idle while datagrams still wait for credit: the side that starts the
    close sends them before its FIN too (as the answering side does), not drops them."""
    host = FakeHost(capacity=0)
    channel = ChannelStream(host, 1, "10.0.0.53", 53, kind=mux.ChannelKind.UDP)
    stats = UdpStats()
    flow = DatagramFlow(lambda data: None, idle_timeout=1.0, stats=stats, channel=channel)
    for n in range(3):
        flow.send(datagram(n))
    with trio.fail_after(FIN_WAIT_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flow.run, channel)
            await trio.sleep(1.5)  # (idle since 1.0 s: the close has begun)
            assert not flow.accepting, "a new datagram goes to a new flow"
            host.capacity = 1 << 20  # (a WINDOW, late)
            channel._wake_writable()
            await trio.testing.wait_all_tasks_blocked()
            assert host.eof_at == len(host.sent), "our FIN was sent, after the datagrams"
            channel._deliver_eof()  # (the peer's answering FIN)
    assert DatagramDecoder().receive_data(bytes(host.sent)) == [datagram(n) for n in range(3)]
    assert stats.datagrams_sent == 3 and not stats.dropped


async def test_without_credit_the_idle_fin_still_leaves_in_bounded_time(
        autojump_clock: trio.abc.Clock) -> None:
    """The queued datagrams never get credit: the idle FIN waits for them no longer than
    an answering FIN would (half of FIN_WAIT_TIMEOUT), and they are counted as dropped."""
    host = FakeHost(capacity=0)
    channel = ChannelStream(host, 1, "10.0.0.53", 53, kind=mux.ChannelKind.UDP)
    stats = UdpStats()
    flow = DatagramFlow(lambda data: None, idle_timeout=1.0, stats=stats, channel=channel)
    for n in range(3):
        flow.send(datagram(n))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flow.run, channel)
        await trio.sleep(1.0 + FIN_WAIT_TIMEOUT / 2 + 0.1)
        assert host.eof_at == 0 and host.sent == b""
        assert stats.dropped["closing"] == 3
        channel._deliver_eof()  # (the peer's answering FIN)


async def test_tiny_datagrams_cost_no_more_than_the_queue_bound() -> None:
    """100,000 empty datagrams into a flow whose channel has no credit: what the queue
    holds, objects included, stays near its bound (64 KiB), as for big ones; counted
    by size alone, each 2-byte datagram would cost an object of ~35 bytes (~1.2 MB)."""
    import tracemalloc

    host = FakeHost(capacity=0)
    channel = ChannelStream(host, 1, "10.0.0.53", 53, kind=mux.ChannelKind.UDP)
    stats = UdpStats()
    flow = DatagramFlow(lambda data: None, idle_timeout=None, stats=stats, channel=channel)
    tracemalloc.start()
    try:
        for _ in range(100_000):
            flow.send(b"")
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2 * 64 * 1024
    assert stats.dropped["queue_full"] > 90_000


async def test_a_datagram_of_the_largest_size_is_queued() -> None:
    """The queue bound counts objects, yet a lone datagram of MAX_DATAGRAM_SIZE still
    waits for credit rather than being dropped."""
    host = FakeHost(capacity=0)
    channel = ChannelStream(host, 1, "10.0.0.53", 53, kind=mux.ChannelKind.UDP)
    stats = UdpStats()
    flow = DatagramFlow(lambda data: None, idle_timeout=None, stats=stats, channel=channel)
    flow.send(b"\x00" * MAX_DATAGRAM_SIZE)
    assert flow.queued_size == len(frame_datagram(b"\x00" * MAX_DATAGRAM_SIZE))
    assert not stats.dropped


async def test_the_flows_of_a_session_hold_no_more_than_its_budget_together() -> None:
    """1,000 flows, none with credit, each sent 64 KiB: together they hold at most the
    session's budget (256 KiB here), not 1,000 x 64 KiB; a flow that ends gives back
    what it held, however it ends (here: cancelled, as when its -R udp lease ends)."""
    budget = DatagramBudget(256 * 1024)
    stats = UdpStats()
    flows = []
    for n in range(1000):
        channel = ChannelStream(FakeHost(capacity=0), 2 * n + 1, "10.0.0.53", 53,
                                kind=mux.ChannelKind.UDP)
        flow = DatagramFlow(lambda data: None, idle_timeout=None, stats=stats,
                            channel=channel, budget=budget)
        for i in range(64):
            flow.send(datagram(i))
        flows.append((flow, channel))
        assert sum(f.queued_size for f, _ in flows) <= budget.limit
    assert stats.dropped["queue_full"] > 60_000
    assert budget.held <= budget.limit
    flow, channel = flows[0]
    for i in range(64):
        flow.send(datagram(i))
    held, before = flow.queued_size, budget.held
    assert held > 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flow.run, channel)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # (as when its -R udp lease ends)
    assert flow.queued_size == 0
    assert budget.held <= before - held
