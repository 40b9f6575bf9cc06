"""Resumption at the protocol level, bytes only: a session loses its carrier midway,
both ends resume on new ones, and every byte arrives once, in order."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import counting_random_bytes
from wstunnel import mux, replay
from wstunnel.protocol import SessionLimits, TunnelProtocol
from wstunnel.replay import CONTROL_ROOM, ReplayLimitReached


def _pair() -> tuple[TunnelProtocol, TunnelProtocol]:
    agent = TunnelProtocol(mux.Role.AGENT, random_bytes=counting_random_bytes())
    relay = TunnelProtocol(mux.Role.RELAY)
    agent.enable_resume()
    relay.enable_resume()
    return agent, relay


def _received(protocol: TunnelProtocol, into: dict[int, bytearray],
              held: list[ReplayLimitReached] | None = None) -> None:
    for event in protocol.events_received():
        if isinstance(event, ReplayLimitReached) and held is not None:
            held.append(event)
        elif isinstance(event, mux.DataReceived):
            into.setdefault(event.channel_id, bytearray()).extend(event.data)
            protocol.acknowledge(event.channel_id, len(event.data))
        elif isinstance(event, mux.ChannelOpenRequested):
            protocol.accept_channel(event.channel_id)


def _exchange(agent: TunnelProtocol, relay: TunnelProtocol, got: dict[str, dict[int, bytearray]],
              *, limit: int | None = None, held: list[ReplayLimitReached] | None = None) -> int:
    """Move bytes both ways until quiet, or until ``limit`` bytes moved (a cut may then
    fall anywhere, mid-frame included); returns the bytes moved."""
    moved = 0
    while True:
        progress = False
        for sender, receiver, name in ((agent, relay, "relay"), (relay, agent, "agent")):
            data = bytes(sender.data_to_send())
            if limit is not None and moved + len(data) > limit:
                data = data[:limit - moved]
            if data:
                receiver.receive_data(data)
                moved += len(data)
                progress = True
            _received(receiver, got[name], held)
            if limit is not None and moved >= limit:
                return moved
        if not progress:
            return moved


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(1, 400_000), min_size=1, max_size=4),
       size=st.integers(1, 1_500_000))
def test_data_both_ways_arrives_once_in_order_across_cuts(cuts: list[int], size: int) -> None:
    """Whatever was in flight when each carrier broke (records half-sent, ACKs lost),
    after the resumes each direction carries exactly the bytes sent, in order."""
    agent, relay = _pair()
    up = hashlib.sha256(b"up").digest() * (size // 32 + 1)
    down = hashlib.sha256(b"down").digest() * (size // 32 + 1)
    up, down = up[:size], down[:size]
    got: dict[str, dict[int, bytearray]] = {"agent": {}, "relay": {}}
    channel = agent.open_channel("db", 5432)
    sent_up = sent_down = 0
    for cut in [*cuts, None]:
        for _ in range(10_000):  # queue what the windows allow, then move up to the cut
            room = agent.send_capacity(channel) if sent_up < size else 0
            if room:
                agent.send_data(channel, up[sent_up:sent_up + room])
                sent_up += min(room, size - sent_up)
            if channel in relay.session.channel_ids() and sent_down < size:
                room = relay.send_capacity(channel)
                if room:
                    relay.send_data(channel, down[sent_down:sent_down + room])
                    sent_down += min(room, size - sent_down)
            moved = _exchange(agent, relay, got, limit=cut)
            if cut is not None or (sent_up == size and sent_down == size and not moved):
                break
        if cut is None:
            break
        agent.carrier_broken()  # the path breaks: what was not delivered is lost
        relay.carrier_broken()
        assert agent.replay is not None and relay.replay is not None
        agent_received, relay_received = agent.replay.received, relay.replay.received
        agent.resume(b"", relay_received)
        relay.resume(b"", agent_received)
    assert bytes(got["relay"].get(channel, b"")) == up
    assert bytes(got["agent"].get(channel, b"")) == down
    assert agent.failure is None and relay.failure is None


def test_acknowledgements_keep_what_is_kept_small() -> None:
    """In a long transfer each side forgets what the other acknowledged: what it
    keeps for a replay stays near the acknowledgement interval, not the transfer."""
    agent, relay = _pair()
    got: dict[str, dict[int, bytearray]] = {"agent": {}, "relay": {}}
    channel = agent.open_channel("db", 5432)
    block = bytes(16384)
    for _ in range(2000):  # 32 MiB
        room = agent.send_capacity(channel)
        if room:
            agent.send_data(channel, block[:room])
        _exchange(agent, relay, got)
    assert len(got["relay"][channel]) > 16 << 20
    assert agent.replay is not None and agent.replay.kept_size < 2 << 20


def _download(relay: TunnelProtocol, agent: TunnelProtocol, got: dict[str, dict[int, bytearray]],
              channel: int, blocks: int) -> None:
    """The relay sends up to ``blocks`` x 16 KiB on ``channel`` as fast as the agent
    reads (and returns window)."""
    block = bytes(16384)
    for _ in range(blocks):
        room = relay.send_capacity(channel)
        if room:
            relay.send_data(channel, block[:room])
        _exchange(agent, relay, got)


def test_a_peer_that_never_acknowledges_stops_what_it_is_sent_at_the_limit() -> None:
    """An agent that reads and returns window but sends no ACK: the relay keeps at
    most max_queued_size (and one record) for a replay, sends nothing more, and
    says why once; when the agent acknowledges again, the transfer goes on."""
    agent = TunnelProtocol(mux.Role.AGENT, random_bytes=counting_random_bytes())
    relay = TunnelProtocol(mux.Role.RELAY, limits=SessionLimits(max_queued_size=4 << 20))
    agent.enable_resume()
    relay.enable_resume()
    assert agent.replay is not None and relay.replay is not None
    honest = agent.replay.take_ack
    agent.replay.take_ack = lambda: None  # type: ignore[method-assign]
    got: dict[str, dict[int, bytearray]] = {"agent": {}, "relay": {}}
    channel = agent.open_channel("db", 5432)
    _exchange(agent, relay, got)
    events: list[ReplayLimitReached] = []
    for _ in range(1000):  # 16 MiB offered
        room = relay.send_capacity(channel)
        if room:
            relay.send_data(channel, bytes(room))
        _exchange(agent, relay, got, held=events)
    limit = 4 << 20
    assert limit <= relay.replay.kept_size <= limit + (1 << 20) + 64
    assert len(got["agent"][channel]) <= relay.replay.kept_size
    assert not relay.wants_to_write()  # (the writer parks: nothing may go)
    assert [(e.limit, e.kept_size) for e in events] == [(limit, relay.replay.kept_size)]
    agent.replay.take_ack = honest  # type: ignore[method-assign]
    agent.send_ack()
    before = len(got["agent"][channel])
    _download(relay, agent, got, channel, 200)
    assert len(got["agent"][channel]) > before + (2 << 20)
    assert relay.replay.kept_size < 1 << 20


def test_answers_still_go_while_held_within_the_control_room(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Held at the limit, the relay still answers the agent's OPENs (a transport
    reads no more while thousands of answers wait, and must read on to get the ACK
    that ends the hold), but only within CONTROL_ROOM past the limit."""
    agent = TunnelProtocol(mux.Role.AGENT, random_bytes=counting_random_bytes())
    relay = TunnelProtocol(mux.Role.RELAY, limits=SessionLimits(max_queued_size=1 << 20))
    agent.enable_resume()
    relay.enable_resume()
    assert agent.replay is not None and relay.replay is not None
    agent.replay.take_ack = lambda: None  # type: ignore[method-assign]
    got: dict[str, dict[int, bytearray]] = {"agent": {}, "relay": {}}
    channel = agent.open_channel("db", 5432)
    _exchange(agent, relay, got)
    _download(relay, agent, got, channel, 200)
    assert relay.replay.full
    opened = [agent.open_channel("db", 5432) for _ in range(3000)]
    relay.receive_data(agent.data_to_send(1 << 30))
    _received(relay, got["relay"])  # (accepts each)
    assert relay.session.control_backlog == 3000
    agent.receive_data(relay.data_to_send(1 << 30))
    answered = {e.channel_id for e in agent.events_received() if isinstance(e, mux.ChannelOpened)}
    assert answered == set(opened)
    assert relay.replay.kept_size < relay.replay.limit + CONTROL_ROOM
    assert not relay.wants_to_write()
    room = relay.replay.kept_size - relay.replay.limit + 4096  # (4 KiB more: ~450 answers)
    monkeypatch.setattr(replay, "CONTROL_ROOM", room)
    many = [agent.open_channel("db", 5432) for _ in range(3000)]
    relay.receive_data(agent.data_to_send(1 << 30))
    _received(relay, got["relay"])
    agent.receive_data(relay.data_to_send(1 << 30))
    answered = {e.channel_id for e in agent.events_received() if isinstance(e, mux.ChannelOpened)}
    assert 0 < len(answered) < len(many)  # (the room is used up: the rest wait)
    assert relay.replay.kept_size <= relay.replay.limit + room + 64
    assert not relay.wants_to_write()


def test_an_honest_peer_is_never_held_by_the_smallest_limit() -> None:
    """The smallest outbound budget (16 KiB): the replay limit is then twice the
    acknowledgement interval, so an honest peer's ACKs, sent every 256 KiB it
    receives, always make room; a 32 MiB transfer needs no keepalive to finish."""
    agent = TunnelProtocol(mux.Role.AGENT, random_bytes=counting_random_bytes())
    relay = TunnelProtocol(mux.Role.RELAY, limits=SessionLimits(max_queued_size=16 << 10))
    agent.enable_resume()
    relay.enable_resume()
    got: dict[str, dict[int, bytearray]] = {"agent": {}, "relay": {}}
    channel = agent.open_channel("db", 5432)
    _exchange(agent, relay, got)
    _download(relay, agent, got, channel, 4000)
    assert len(got["agent"][channel]) >= 32 << 20
    assert relay.replay is not None and relay.replay.kept_size <= relay.replay.limit + (1 << 20)


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["cut", "answer-lost", "half-resumed"]),
                                st.integers(0, 300_000), st.integers(0, 3000)),
                      min_size=1, max_size=6),
       size=st.integers(1, 600_000))
def test_cuts_during_the_resume_handshake_lose_and_repeat_nothing(
        steps: list[tuple[str, int, int]], size: int) -> None:
    """The path breaks again while resuming: the relay resumed and began its replay
    but the agent never got the answer (it asks again with the same count), or the
    agent resumed with part of the replay and sent part of its own. Each direction
    still carries exactly the bytes sent, in order, once."""
    agent, relay = _pair()
    up = (hashlib.sha256(b"up").digest() * (size // 32 + 1))[:size]
    down = (hashlib.sha256(b"down").digest() * (size // 32 + 1))[:size]
    got: dict[str, dict[int, bytearray]] = {"agent": {}, "relay": {}}
    channel = agent.open_channel("db", 5432)
    sent = {"up": 0, "down": 0}

    def feed() -> None:
        room = agent.send_capacity(channel) if sent["up"] < size else 0
        if room:
            agent.send_data(channel, up[sent["up"]:sent["up"] + room])
            sent["up"] += min(room, size - sent["up"])
        if channel in relay.session.channel_ids() and sent["down"] < size:
            room = relay.send_capacity(channel)
            if room:
                relay.send_data(channel, down[sent["down"]:sent["down"] + room])
                sent["down"] += min(room, size - sent["down"])

    agent_log, relay_log = agent.replay, relay.replay
    assert agent_log is not None and relay_log is not None
    for kind, moved, partial in steps:
        feed()
        _exchange(agent, relay, got, limit=moved)
        agent.carrier_broken()
        relay.carrier_broken()
        if kind != "cut":  # the relay answers the agent's resume and replays at once
            answer = relay_log.received
            relay.resume(b"", agent_log.received)
            feed()
            replayed = bytes(relay.data_to_send())
            if kind == "half-resumed":  # the agent got the answer and part of the replay
                agent.resume(replayed[:partial], answer)
                _received(agent, got["agent"])
                relay.receive_data(bytes(agent.data_to_send())[:partial])
                _received(relay, got["relay"])
                agent.carrier_broken()
            relay.carrier_broken()
        agent_received, relay_received = agent_log.received, relay_log.received
        agent.resume(b"", relay_received)
        relay.resume(b"", agent_received)
    for _ in range(10_000):
        feed()
        if not _exchange(agent, relay, got) and sent["up"] == sent["down"] == size:
            break
    assert bytes(got["relay"].get(channel, b"")) == up
    assert bytes(got["agent"].get(channel, b"")) == down
    assert agent.failure is None and relay.failure is None
