"""The socket pump (net/pump.py): channels carried over real TCP sockets, no task each.

Two transports over a memory stream pair; on the agent side the test attaches
one end of a loopback TCP connection to a channel and talks through the other
end, so every byte passes the pump's recv/send. The relay side either attaches
a socket too or hands the test its ChannelStream.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from wstunnel import mux
from wstunnel.errors import ChannelReset
from wstunnel.net import pump
from wstunnel.net.channel_stream import ChannelStream
from wstunnel.net.ending import abort_stream
from wstunnel.net.transport import TunnelTransport
from wstunnel.protocol import TunnelProtocol

from ..tunnel_helpers import LOOPBACK, pattern_block, receive_all, receive_until_reset

pytestmark = pytest.mark.skipif(not pump.AVAILABLE, reason="no select.epoll here")

WINDOW = mux.DEFAULT_INITIAL_WINDOW


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Both ends of one loopback TCP connection."""
    listener = (await trio.open_tcp_listeners(0, host=LOOPBACK))[0]
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream(LOOPBACK, port)
        server = await listener.accept()
    assert isinstance(server, trio.SocketStream)
    return client, server


@dataclass
class Pair:
    """An agent and a relay transport; what the relay side accepted arrives in ``incoming``."""

    agent: TunnelTransport
    relay: TunnelTransport
    incoming: trio.MemoryReceiveChannel[tuple[ChannelStream, trio.SocketStream | None]]
    finished: list[int] = field(default_factory=list)
    ends: list[trio.SocketStream] = field(default_factory=list)  # the test's, closed at the end

    async def tcp_pair(self) -> tuple[trio.SocketStream, trio.SocketStream]:
        local, ours = await tcp_pair()
        self.ends.append(ours)
        return local, ours

    async def attached_channel(self) -> tuple[ChannelStream, trio.SocketStream, trio.Event]:
        """An agent channel carried by the pump; (channel, the test's end, finished)."""
        local, ours = await self.tcp_pair()
        channel = self.agent.open_channel("example.net", 80)
        done = trio.Event()
        assert self.agent.attach(local, channel, done.set)
        return channel, ours, done


@asynccontextmanager
async def session_pair(*, relay_attaches: bool,
                       hold: Callable[[ChannelStream], trio.Event] | None = None,
                       ) -> AsyncIterator[Pair]:
    """Agent and relay transports over memory streams; stopped and cleaned up on exit."""
    send, receive = trio.open_memory_channel[tuple[ChannelStream, "trio.SocketStream | None"]](
        1000)
    agent_end, relay_end = trio.testing.memory_stream_pair()

    async def on_open(transport: TunnelTransport, channel: ChannelStream) -> None:
        assert transport.accept(channel)
        if not relay_attaches:
            await send.send((channel, None))
            return
        if hold is not None:
            await hold(channel).wait()
        local, ours = await pair.tcp_pair()
        assert transport.attach(local, channel, lambda: pair.finished.append(channel.channel_id))
        await send.send((channel, ours))

    agent = TunnelTransport(agent_end, TunnelProtocol(mux.Role.AGENT), name="agent",
                            ping_interval=0)
    relay = TunnelTransport(relay_end, TunnelProtocol(mux.Role.RELAY), name="relay",
                            on_open=on_open, ping_interval=0)
    pair = Pair(agent, relay, receive)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await nursery.start(relay.run)
            yield pair
            nursery.cancel_scope.cancel()
    finally:
        for stream in pair.ends:
            await trio.aclose_forcefully(stream)


async def test_bytes_and_half_close_both_ways_through_attached_sockets() -> None:
    """Local FIN reaches the far end after the data; the far end's answer and FIN come
    back; the pump then closes the socket and says so, and the session forgets it."""
    with trio.fail_after(10):
        async with session_pair(relay_attaches=False) as pair:
            channel, ours, done = await pair.attached_channel()
            remote, _ = await pair.incoming.receive()
            request = pattern_block(b"up", 300_000)
            await ours.send_all(request)
            await ours.send_eof()
            assert await receive_all(remote) == request
            answer = pattern_block(b"down", 200_000)
            await remote.send_all(answer)
            await remote.send_eof()
            assert await receive_all(ours) == answer
            await done.wait()
            await pair.agent.wait_idle()
            assert channel.bytes_sent == len(request)
            assert channel.bytes_received == len(answer)


async def test_far_end_closes_first_then_local() -> None:
    """The channel's FIN becomes shutdown(SHUT_WR) while the local side keeps sending."""
    with trio.fail_after(10):
        async with session_pair(relay_attaches=False) as pair:
            _channel, ours, done = await pair.attached_channel()
            remote, _ = await pair.incoming.receive()
            await remote.send_all(b"bye")
            await remote.send_eof()
            assert await receive_all(ours) == b"bye"
            await ours.send_all(b"still here")
            assert await remote.receive_some() == b"still here"
            assert not done.is_set()
            await ours.send_eof()
            assert await remote.receive_some() == b""
            await done.wait()


async def test_slow_local_reader_holds_at_most_the_window() -> None:
    """A local reader that stops reading stops the far sender: the session never holds
    more than the window for it, other channels keep flowing, and nothing is lost."""
    total = 32 << 20
    with trio.fail_after(30):
        async with session_pair(relay_attaches=False) as pair:
            channel, ours, _done = await pair.attached_channel()
            remote, _ = await pair.incoming.receive()
            block = pattern_block(b"slow")
            sent = trio.Event()

            async def sender() -> None:
                for _ in range(total // len(block)):
                    await remote.send_all(block)
                await remote.send_eof()
                sent.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await trio.testing.wait_all_tasks_blocked()
                assert not sent.is_set()
                assert pair.agent.protocol.session.buffered_size <= WINDOW
                assert channel.bytes_received < remote.bytes_sent <= channel.bytes_received + WINDOW
                _other, other_ours, _ = await pair.attached_channel()
                other_remote, _ = await pair.incoming.receive()
                await other_ours.send_all(b"ping")
                assert await other_remote.receive_some() == b"ping"
                digest = hashlib.sha256()
                got = 0
                while data := await ours.receive_some(1 << 20):
                    digest.update(data)
                    got += len(data)
                    assert pair.agent.protocol.session.buffered_size <= WINDOW
                assert got == total
            assert digest.digest() == hashlib.sha256(block * (total // len(block))).digest()
            assert sent.is_set()


async def test_local_close_with_unread_data_resets_the_channel() -> None:
    """Closing the local socket with our bytes unread (TCP RST) resets the channel."""
    with trio.fail_after(10):
        async with session_pair(relay_attaches=False) as pair:
            channel, ours, done = await pair.attached_channel()
            remote, _ = await pair.incoming.receive()
            await remote.send_all(b"x" * 1000)
            while channel.bytes_received < 1000:
                await trio.testing.wait_all_tasks_blocked()
            await ours.aclose()  # 1000 bytes unread: the kernel answers with RST
            with pytest.raises(trio.BrokenResourceError):
                await remote.receive_some()
            assert isinstance(remote.error, Exception)
            await done.wait()


async def test_far_reset_resets_the_local_socket_after_the_data_before_it() -> None:
    """A RESET from the far end behind DATA: the local application reads that data,
    then ECONNRESET, never a clean end."""
    with trio.fail_after(10):
        async with session_pair(relay_attaches=False) as pair:
            _channel, ours, done = await pair.attached_channel()
            remote, _ = await pair.incoming.receive()
            data = pattern_block(b"before the reset", 100_000)
            await remote.send_all(data)
            remote.abort("the destination reset the connection", after_data=True)
            await done.wait()
            assert await receive_until_reset(ours) == data


async def test_far_reset_waits_for_a_slow_local_reader() -> None:
    """The data before a RESET reaches a local reader that is slow to read it: the
    socket is reset only once the kernel has sent all of it."""
    with trio.fail_after(10):
        async with session_pair(relay_attaches=False) as pair:
            _channel, ours, done = await pair.attached_channel()
            remote, _ = await pair.incoming.receive()
            data = pattern_block(b"more than the socket buffers hold", 6_000_000)
            async with trio.open_nursery() as nursery:
                async def send_then_reset() -> None:
                    await remote.send_all(data)
                    remote.abort("reset after data", after_data=True)
                nursery.start_soon(send_then_reset)
                await trio.testing.wait_all_tasks_blocked()  # buffers full, nobody reads
                assert not done.is_set()
                assert await receive_until_reset(ours) == data
            await done.wait()


async def test_local_reset_reaches_the_far_end_after_the_bytes_before_it() -> None:
    """The local application sends bytes and resets: the far end reads those bytes,
    then a ChannelReset carrying CONNECTION_RESET."""
    with trio.fail_after(10):
        async with session_pair(relay_attaches=False) as pair:
            _channel, ours, done = await pair.attached_channel()
            remote, _ = await pair.incoming.receive()
            data = pattern_block(b"then RST", 200_000)
            await ours.send_all(data)
            await abort_stream(ours, after_sent=True)  # (RST would drop what is unsent)
            received = b""
            with pytest.raises(trio.BrokenResourceError) as caught:
                while True:
                    chunk = await remote.receive_some()
                    assert chunk, "clean end instead of a reset"
                    received += chunk
            assert received == data
            error = caught.value.__cause__
            assert isinstance(error, ChannelReset) and error.code == mux.ResetCode.CONNECTION_RESET
            await done.wait()


async def test_data_and_fin_that_came_before_the_attach_go_first() -> None:
    """Early data and FIN queued on the channel before its socket was ready arrive."""
    release = trio.Event()
    with trio.fail_after(10):
        async with session_pair(relay_attaches=True, hold=lambda _c: release) as pair:
            early = agent_channel = pair.agent.open_channel("example.net", 80)
            await early.send_all(b"early bytes")
            await agent_channel.send_eof()
            await trio.testing.wait_all_tasks_blocked()
            release.set()
            _remote, ours = await pair.incoming.receive()
            assert ours is not None
            assert await receive_all(ours) == b"early bytes"
            await ours.send_all(b"answer")
            await ours.send_eof()
            assert await receive_all(agent_channel) == b"answer"


async def _held_waiting(payloads: list[bytes]) -> int:
    """Send ``payloads`` as one DATA record each to a relay-side socket that does not
    read; return the bytes the relay's objects hold once all is in, after checking
    that it all arrives in order when the socket is read."""
    agent_end, relay_end = trio.testing.memory_stream_pair()
    attached: list[trio.SocketStream] = []
    ready = trio.Event()

    async def on_open(transport: TunnelTransport, channel: ChannelStream) -> None:
        assert transport.accept(channel)
        local, ours = await tcp_pair()
        local.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        attached.append(ours)
        assert transport.attach(local, channel, lambda: None)
        ready.set()

    relay = TunnelTransport(relay_end, TunnelProtocol(mux.Role.RELAY), name="relay",
                            on_open=on_open, ping_interval=0)
    agent = TunnelProtocol(mux.Role.AGENT)  # (the test's: one record per payload)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(relay.run)
                agent.receive_data(await agent_end.receive_some())  # (its SETTINGS)
                channel = agent.open_channel("example.net", 80)
                records = [bytes(agent.data_to_send())]
                for payload in payloads:
                    agent.send_data(channel, payload)
                    records.append(bytes(agent.data_to_send()))
                wire = b"".join(records)
                del records
                agent.send_data(channel, b".")
                last = bytes(agent.data_to_send())
                tracemalloc.start()
                try:
                    before = tracemalloc.get_traced_memory()[0]
                    for start in range(0, len(wire), 1 << 16):
                        await agent_end.send_all(wire[start:start + (1 << 16)])
                    await ready.wait()
                    await trio.testing.wait_all_tasks_blocked()
                    # (a last read of its own: the reader's last batch of events stays
                    # referenced until the next read, and is not what waits)
                    await agent_end.send_all(last)
                    await trio.testing.wait_all_tasks_blocked()
                    held = tracemalloc.get_traced_memory()[0] - before
                finally:
                    tracemalloc.stop()
                expected = b"".join(payloads) + b"."
                got = bytearray()
                while len(got) < len(expected):
                    got += await attached[0].receive_some(1 << 16)
                assert got == expected
                nursery.cancel_scope.cancel()
    finally:
        for stream in attached:
            await trio.aclose_forcefully(stream)
    return held


async def test_tiny_records_waiting_for_a_slow_socket_cost_about_their_size() -> None:
    """A peer sends 40,000 2-byte DATA records to a destination that does not read
    (docs/SECURITY.md, "Memory per session"): what waits in the pump costs about
    its size, not ~50 bytes per record, measured against the same bytes sent in
    16 KiB records."""
    tiny = [bytes([n % 256, 7]) for n in range(40_000)]
    joined = b"".join(tiny)
    bulk = [joined[start:start + 16384] for start in range(0, len(joined), 16384)]
    baseline = await _held_waiting(bulk)  # (first: what a first session imports is in it)
    extra = await _held_waiting(tiny) - baseline
    assert extra < len(joined) // 2, f"{extra} bytes more for {len(tiny)} records of 2 bytes"


async def test_attaching_a_broken_channel_closes_the_socket_at_once() -> None:
    """A channel reset before its socket was attached: the socket is closed right away."""
    release = trio.Event()
    with trio.fail_after(10):
        async with session_pair(relay_attaches=True, hold=lambda _c: release) as pair:
            channel = pair.agent.open_channel("example.net", 80)
            await trio.testing.wait_all_tasks_blocked()
            channel.abort("changed my mind")
            await trio.testing.wait_all_tasks_blocked()
            release.set()
            remote, ours = await pair.incoming.receive()
            assert ours is not None
            assert pair.finished == [remote.channel_id]
            assert await receive_until_reset(ours) == b""


async def test_session_end_resets_every_attached_socket() -> None:
    """When the session ends, attached local sockets are reset, not left hanging and
    not closed as if the far end had finished."""
    with trio.fail_after(10):
        async with session_pair(relay_attaches=False) as pair:
            ends = [await pair.attached_channel() for _ in range(5)]
            for _ in ends:
                remote, _ = await pair.incoming.receive()
                await remote.send_all(b"partial answer")
            await pair.agent.close()
            for _channel, ours, done in ends:
                await done.wait()
                assert await receive_until_reset(ours) in (b"", b"partial answer")


def _task_count() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries
                       for child in nursery.child_tasks)
    return count(trio.lowlevel.current_root_task())


async def test_idle_channels_hold_no_task() -> None:
    """Channels attached on both sides cost no trio task each: the task count with 41
    idle channels equals the count with one; all of them still echo afterwards."""
    with trio.fail_after(20):
        async with session_pair(relay_attaches=True) as pair:
            ends = []

            async def open_one() -> None:
                _channel, ours, _done = await pair.attached_channel()
                _remote, far = await pair.incoming.receive()
                assert far is not None
                ends.append((ours, far))

            await open_one()
            await trio.testing.wait_all_tasks_blocked()
            with_one = _task_count()
            for _ in range(40):
                await open_one()
            await trio.testing.wait_all_tasks_blocked()
            assert _task_count() == with_one
            for index, (ours, far) in enumerate(ends):
                payload = b"%d" % index
                await ours.send_all(payload)
                assert await far.receive_some() == payload
                await far.send_all(payload)
                assert await ours.receive_some() == payload


async def test_a_bug_serving_one_socket_resets_only_its_channel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception while serving one socket is logged and resets that
    channel; the session and its other channels carry on."""
    with trio.fail_after(10):
        async with session_pair(relay_attaches=False) as pair:
            _channel, ours, done = await pair.attached_channel()
            remote, _ = await pair.incoming.receive()
            _other, other_ours, _ = await pair.attached_channel()
            other_remote, _ = await pair.incoming.receive()
            write = pump._PumpedSocket.write

            def broken_write(self: pump._PumpedSocket) -> None:
                if self.channel_id == remote.channel_id:
                    raise RuntimeError("bug")
                write(self)

            monkeypatch.setattr(pump._PumpedSocket, "write", broken_write)
            await remote.send_all(b"boom")
            await done.wait()
            with pytest.raises(trio.BrokenResourceError) as caught:
                await remote.receive_some()
            error = caught.value.__cause__
            assert isinstance(error, ChannelReset) and error.code == mux.ResetCode.INTERNAL_ERROR
            assert await receive_until_reset(ours) == b""
            await other_remote.send_all(b"still fine")
            assert await other_ours.receive_some() == b"still fine"
    assert "resetting it" in caplog.text


async def test_channel_finished_by_a_local_eof_is_forgotten_at_once() -> None:
    """When the relay's local EOF is what finishes a channel (its FIN both ways),
    the relay forgets the channel right then, not when the next record arrives
    (an idle session would otherwise hold it until the next ping)."""
    with trio.fail_after(10):
        async with session_pair(relay_attaches=True) as pair:
            _channel, ours, done = await pair.attached_channel()
            _remote_channel, remote = await pair.incoming.receive()
            assert remote is not None
            await ours.send_all(b"request")
            await ours.send_eof()
            assert await receive_all(remote) == b"request"
            await remote.send_all(b"answer")
            await remote.send_eof()
            assert await receive_all(ours) == b"answer"
            await done.wait()
            await pair.relay.wait_idle()
            await pair.agent.wait_idle()


def _epoll_descriptors() -> int:
    """This process's open epoll descriptors (trio's own included)."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # (the directory's own descriptor, gone by now)
            count += os.readlink(fd) == "anon_inode:[eventpoll]"
    return count


async def test_an_idle_session_holds_no_epoll_until_its_first_channel_attaches() -> None:
    """A relay with many idle agents pays no descriptor for a pump none of them uses:
    the session's epoll appears with the first attached socket."""
    before = _epoll_descriptors()
    with trio.fail_after(10):
        async with session_pair(relay_attaches=False) as pair:
            await trio.testing.wait_all_tasks_blocked()
            assert _epoll_descriptors() == before
            _channel, ours, _done = await pair.attached_channel()
            assert _epoll_descriptors() == before + 1  # (the agent's; the relay splices)
            await ours.send_all(b"through the pump")
            remote, _ = await pair.incoming.receive()
            assert await remote.receive_some() == b"through the pump"
