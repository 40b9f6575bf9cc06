"""TunnelTransport's channel actions (accept, refuse) and its SessionObserver reports.

Each action must queue its record *and* wake the writer: with keepalives off,
nothing else would write the answer, so a forgotten wake-up hangs these tests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from wstunnel import mux
from wstunnel.net.channel_stream import ChannelStream
from wstunnel.net.transport import TunnelTransport
from wstunnel.protocol import TunnelEvent, TunnelProtocol

OnOpen = Callable[[TunnelTransport, ChannelStream], Awaitable[None]]


async def _events_until(stream: trio.abc.Stream, agent: TunnelProtocol,
                        wanted: type) -> list[TunnelEvent]:
    """Feed what the relay writes to ``agent`` until an event of type ``wanted``."""
    seen: list[TunnelEvent] = []
    while not any(isinstance(event, wanted) for event in seen):
        data = await stream.receive_some()
        assert data, f"the relay closed before {wanted.__name__}"
        agent.receive_data(data)
        seen += agent.events_received()
    return seen


async def _open_one(on_open: OnOpen, wanted: type, *, reset_at_once: bool = False,
                    ) -> list[TunnelEvent]:
    """A raw agent opens one channel to a relay transport that answers with
    ``on_open``; returns the agent's events up to the first ``wanted``."""
    agent_end, relay_end = trio.testing.memory_stream_pair()
    relay = TunnelTransport(relay_end, TunnelProtocol(mux.Role.RELAY), name="relay",
                            on_open=on_open, ping_interval=0)
    agent = TunnelProtocol(mux.Role.AGENT)
    channel_id = agent.open_channel("db", 5432)
    if reset_at_once:
        agent.reset_channel(channel_id, mux.ResetCode.CANCELLED)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            await agent_end.send_all(agent.data_to_send())
            events = await _events_until(agent_end, agent, wanted)
            nursery.cancel_scope.cancel()
    return events


async def test_accept_sends_open_ok_by_itself() -> None:
    """accept() answers OPEN_OK at once; the caller does not wake the writer."""
    async def on_open(transport: TunnelTransport, channel: ChannelStream) -> None:
        assert transport.accept(channel)
        await trio.sleep_forever()

    events = await _open_one(on_open, mux.ChannelOpened)
    assert [e for e in events if isinstance(e, mux.ChannelOpened)] == [mux.ChannelOpened(1)]


async def test_refuse_sends_open_failed_with_reason_and_text() -> None:
    """refuse() answers OPEN_FAILED with the reason and text given, by itself."""
    async def on_open(transport: TunnelTransport, channel: ChannelStream) -> None:
        transport.refuse(channel, mux.OpenFailure.FORBIDDEN, "not this one")
        await trio.sleep_forever()

    events = await _open_one(on_open, mux.ChannelOpenFailed)
    failed = [e for e in events if isinstance(e, mux.ChannelOpenFailed)]
    assert [(e.reason, e.text) for e in failed] == [(mux.OpenFailure.FORBIDDEN, "not this one")]


async def test_accept_after_the_peer_reset_the_channel_reports_false() -> None:
    """A channel the opener reset while it was being dialled is not accepted:
    accept() says so, and the caller drops what it dialled."""
    answers: list[bool] = []

    async def on_open(transport: TunnelTransport, channel: ChannelStream) -> None:
        with trio.CancelScope() as broken:
            channel.cancel_on_break(broken)
            await trio.sleep_forever()
        answers.append(transport.accept(channel))
        transport.go_away("done")  # (something for the agent to wait for)

    events = await _open_one(on_open, mux.GoAwayReceived, reset_at_once=True)
    assert answers == [False]
    assert not any(isinstance(e, mux.ChannelOpened) for e in events)


class _Recorder:
    """A SessionObserver that writes down what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.closed = trio.Event()
        self.refused = trio.Event()

    def channel_opened(self, channel: ChannelStream) -> None:
        self.calls.append(("opened", channel.channel_id))

    def channel_closed(self, channel: ChannelStream) -> None:
        self.calls.append(("closed", channel.channel_id))
        self.closed.set()

    def channel_reset(self, channel: ChannelStream, code: int, text: str) -> None:
        self.calls.append(("reset", code))

    def channel_carried(self, channel: ChannelStream, sock: object) -> None:
        pass

    def open_failed(self, reason: int) -> None:
        self.calls.append(("open failed", reason))

    def peer_open_refused(self, session: object, reason: int) -> None:
        self.calls.append(("peer open refused", reason))
        self.refused.set()


async def test_the_observer_hears_a_refused_channel_open_and_close() -> None:
    """The opener's transport reports the channel's opening, the refusal's reason,
    then its end, to the observer it was given (net owns the interface)."""
    agent_end, relay_end = trio.testing.memory_stream_pair()
    recorder = _Recorder()

    async def on_open(transport: TunnelTransport, channel: ChannelStream) -> None:
        transport.refuse(channel, mux.OpenFailure.REFUSED, "connection refused")

    agent = TunnelTransport(agent_end, TunnelProtocol(mux.Role.AGENT), name="agent",
                            ping_interval=0, observer=recorder)
    relay = TunnelTransport(relay_end, TunnelProtocol(mux.Role.RELAY), name="relay",
                            on_open=on_open, ping_interval=0)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await nursery.start(relay.run)
            agent.open_channel("db", 5432)
            await recorder.closed.wait()
            nursery.cancel_scope.cancel()
    assert recorder.calls == [("opened", 1), ("open failed", mux.OpenFailure.REFUSED),
                              ("closed", 1)]


async def test_the_observer_hears_an_open_the_multiplexer_refused_by_itself() -> None:
    """An OPEN that crossed the relay's GOAWAY is refused by its multiplexer, which
    the application never sees as a channel: the transport tells its observer (the
    metrics log it from there), and the opener hears GOING_AWAY."""
    agent_end, relay_end = trio.testing.memory_stream_pair()
    recorder = _Recorder()
    # (the agent reads nothing until the relay has refused its OPEN: read first, the
    # GOAWAY would refuse it on the agent's side, and the agent could close first)
    agent = TunnelTransport(_ReadsAfter(agent_end, recorder.refused),
                            TunnelProtocol(mux.Role.AGENT), name="agent", ping_interval=0)
    relay = TunnelTransport(relay_end, TunnelProtocol(mux.Role.RELAY), name="relay",
                            on_open=_never_called, ping_interval=0, observer=recorder)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            relay.go_away("restarting")
            await nursery.start(agent.run)  # (its OPEN is on the way before it reads GOAWAY)
            channel = agent.open_channel("db", 5432)
            with pytest.raises(trio.BrokenResourceError):
                await channel.receive_some()
            nursery.cancel_scope.cancel()
    assert recorder.calls == [("peer open refused", mux.OpenFailure.GOING_AWAY)]


class _ReadsAfter(trio.abc.Stream):
    """``stream``, whose reads wait for ``event`` first."""

    def __init__(self, stream: trio.abc.Stream, event: trio.Event) -> None:
        self._stream = stream
        self._event = event

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self._event.wait()
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _never_called(transport: TunnelTransport, channel: ChannelStream) -> None:
    raise AssertionError("the relay's application saw a refused channel")
