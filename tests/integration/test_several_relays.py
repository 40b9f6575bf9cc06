"""Several relay processes behind real haproxy (and nginx): the documented way past one core.

configs/haproxy-relay.cfg as shipped (only addresses, certificate and, for the
drain tests, an admin socket filled in) in front of two ``wstunnel relay``
processes started from the CLI; agents run in-process. One test puts README's
nginx upstream block with configs/nginx-relay.conf there instead. Which relay holds a
session is read from the relays' own logs ("session up", "resumes its session").
README, "Running several relays", is what these tests hold to.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from benchmarks._cutter import PathCutter
from benchmarks._haproxy_admin import admin_command

from .log_watch import LogWatch
from .process_helpers import Program, relay_process
from .real_peers import LOOPBACK, Pki, ReloadableHaproxy, haproxy, nginx, reloadable_haproxy
from .test_http_fallback import _churn, _readme_nginx_upstream
from .tunnel_helpers import (
    agent_config,
    digest_handler,
    echo_handler,
    pattern_block,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
    upload_and_download,
)

TIMEOUT = 60
MiB = 1 << 20
#: One attempt through an agent whose relay just died: a connection accepted while
#: the agent still tries to resume on the dead relay may stall (reported; then the
#: next attempt, on the new session, must work).
ECHO_TIMEOUT = 3.0
AGENTS = 4
SESSION_UP = rb"session up for agent"


@pytest.fixture
def trust_test_ca(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's default TLS context (system CAs) trusts the test CA."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))


def _times(pattern: bytes, count: int) -> bytes:
    """A regex matching once ``pattern`` has appeared ``count`` times."""
    return rb"(?:" + pattern + rb"[\s\S]*?){%d}" % count


async def _echo(port: int, payload: bytes = b"through haproxy") -> bool:
    """One connection through an agent's forward echoes ``payload`` within
    ECHO_TIMEOUT; False if it broke or stalled."""
    with trio.move_on_after(ECHO_TIMEOUT):
        return await _echo_once(port, payload)
    return False


async def _echo_once(port: int, payload: bytes) -> bool:
    try:
        async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
            return await _echo_on(stream, payload)
    except (trio.BrokenResourceError, OSError):
        return False


async def _echo_until_ok(port: int) -> None:
    while not await _echo(port):
        await trio.sleep(0.05)  # (the agent is reconnecting; nothing to wait on from here)


def _sessions(relay: Program) -> int:
    return bytes(relay.log).count(SESSION_UP)


async def test_agents_spread_over_two_relay_processes_and_move_when_one_dies(
    pki: Pki, trust_test_ca: None
) -> None:
    """Four agents through haproxy (leastconn): both relays get sessions and carry
    channels; SIGKILL one relay and its agents reconnect, through haproxy, to the
    other, where new connections work."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            async with relay_process() as (first, first_port), \
                    relay_process() as (second, second_port):
                with haproxy(pki, [first_port, second_port]) as front:
                    config = agent_config(0, [target], relay=f"wss://{LOOPBACK}:{front}/tunnel",
                                          reconnect_min_interval=0.2,
                                          reconnect_max_interval=1.0)
                    agents = []
                    for count in range(1, AGENTS + 1):
                        agents.append(await start_agent(nursery, config))
                        assert await _echo(agents[-1].ports[0])
                        assert _sessions(first) + _sessions(second) == count
                    spread = (_sessions(first), _sessions(second))
                    first.kill()
                    await second.wait_for(_times(SESSION_UP, AGENTS))
                    for agent in agents:
                        await _echo_until_ok(agent.ports[0])
                    nursery.cancel_scope.cancel()
    assert spread == (AGENTS // 2, AGENTS // 2), spread


async def test_a_resume_reaches_the_relay_holding_the_session(
    pki: Pki, trust_test_ca: None, tmp_path: Path
) -> None:
    """The relay holding a session is drained in haproxy (no new sessions) and its
    connections cut there: the agent's resume still reaches that relay, by the
    session id haproxy remembered, and the open connection carries on."""
    admin = tmp_path / "haproxy.sock"
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            async with relay_process() as (first, first_port), \
                    relay_process() as (second, second_port):
                with haproxy(pki, [first_port, second_port],
                             {"\nglobal\n": f"\nglobal\n    stats socket {admin} level admin\n"}
                             ) as front:
                    config = agent_config(0, [target], relay=f"wss://{LOOPBACK}:{front}/tunnel",
                                          reconnect_min_interval=0.2,
                                          reconnect_max_interval=1.0)
                    agent = await start_agent(nursery, config)
                    async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                        await stream.send_all(b"before")
                        assert await stream.receive_some() == b"before"
                        holder = first if _sessions(first) else second
                        name = "relay1" if holder is first else "relay2"
                        await admin_command(admin, f"set server relays/{name} state drain")
                        await admin_command(admin, f"shutdown sessions server relays/{name}")
                        with trio.fail_after(15):
                            await holder.wait_for(rb"resumes its session")
                        await stream.send_all(b"after")
                        assert await stream.receive_some() == b"after"
                    nursery.cancel_scope.cancel()


async def test_a_cut_in_front_of_haproxy_resumes_on_the_relay_holding_the_session(
    pki: Pki, trust_test_ca: None, logs: LogWatch
) -> None:
    """The path between agent and haproxy is cut twice in the middle of 8 MiB each
    way; round robin would send each reconnect to the other relay, but the resume
    reaches the holder by the id haproxy stored (table resume_ids): every byte
    arrives once, in order, and no channel is reset."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            digest = await serve_target(nursery, digest_handler(8 * MiB, b"down"))
            async with relay_process() as (first, first_port), \
                    relay_process() as (second, second_port):
                with haproxy(pki, [first_port, second_port],
                             {"balance leastconn": "balance roundrobin"}) as front:
                    cutter = PathCutter(front)
                    await nursery.start(cutter.serve)
                    config = agent_config(0, [digest],
                                          relay=f"wss://{LOOPBACK}:{cutter.port}/tunnel")
                    agent = await start_agent(nursery, config)
                    for mark in (2, 9):
                        cutter.cut_after(mark * MiB)
                    await upload_and_download(agent.ports[0], 8 * MiB, 8 * MiB)
                    assert cutter.cuts == 2
                    resumes = [bytes(relay.log).count(b"resumes its session")
                               for relay in (first, second)]
                    sessions = _sessions(first) + _sessions(second)
                nursery.cancel_scope.cancel()
    assert sorted(resumes) == [0, 2] and sessions == 1, (resumes, sessions)
    assert not [line for line in logs.lines if "all reset" in line]


DRAIN = 2.0


@asynccontextmanager
async def _holder_stopped(pki: Pki, tmp_path: Path
                          ) -> AsyncIterator[tuple[int, trio.SocketStream, Program]]:
    """Two relay processes (drain_timeout DRAIN) behind haproxy and an agent with an
    echo connection open through it; the relay holding the session has just got
    SIGTERM (and logged it). Yields the agent's port, that connection, the relay."""
    config = tmp_path / "relay.yaml"
    config.write_text(f"drain_timeout: {DRAIN}\n")
    async with trio.open_nursery() as nursery:
        target = await serve_target(nursery, echo_handler)
        async with relay_process("-c", str(config)) as (first, first_port), \
                relay_process("-c", str(config)) as (second, second_port):
            with haproxy(pki, [first_port, second_port]) as front:
                agent = await start_agent(nursery, agent_config(
                    0, [target], relay=f"wss://{LOOPBACK}:{front}/tunnel",
                    reconnect_min_interval=0.2, reconnect_max_interval=1.0))
                async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                    assert await _echo_on(stream, b"before")
                    holder = first if _sessions(first) else second
                    holder.process.send_signal(signal.SIGTERM)
                    await holder.wait_for(rb"relay stopping: draining 1 sessions")
                    yield agent.ports[0], stream, holder
        nursery.cancel_scope.cancel()


async def _echo_on(stream: trio.SocketStream, payload: bytes) -> bool:
    """Send ``payload`` on ``stream``; True when it comes back whole (False: EOF first)."""
    await stream.send_all(payload)
    echoed = b""
    while len(echoed) < len(payload):
        data = await stream.receive_some()
        if not data:
            return False
        echoed += data
    return echoed == payload


async def test_a_relay_stopped_behind_haproxy_lets_channels_finish_then_resets_them(
    pki: Pki, trust_test_ca: None, tmp_path: Path
) -> None:
    """SIGTERM to the relay holding the session (README: stop accepting, GOAWAY,
    open channels finish for up to drain_timeout): the open connection carries on
    during the drain, is reset when it is over (never a clean end of stream, which
    would pass for a complete transfer), the relay exits 0, and the agent's next
    session is on the other relay."""
    with trio.fail_after(TIMEOUT):
        async with _holder_stopped(pki, tmp_path) as (port, stream, holder):
            assert await _echo_on(stream, b"during the drain")
            with pytest.raises(trio.BrokenResourceError):
                with trio.fail_after(DRAIN + 5):
                    data = await stream.receive_some()
                    pytest.fail(f"a clean end of stream ({data!r}) on a cut connection")
            assert await holder.process.wait() == 0
            await _echo_until_ok(port)


async def test_a_new_connection_during_a_relay_drain_goes_to_another_relay_at_once(
    pki: Pki, trust_test_ca: None, tmp_path: Path, logs: LogWatch
) -> None:
    """While the stopped relay drains (DRAIN), a new connection through the agent is
    carried within a second, by a new session through haproxy to the other relay,
    while the open one still echoes on the draining relay. (A connection made in the
    instant between the relay's GOAWAY and the agent reading it crosses the GOAWAY
    and is opened again on the new session: test_goaway_race.py.)"""
    with trio.fail_after(TIMEOUT):
        async with _holder_stopped(pki, tmp_path) as (port, stream, _holder):
            await logs.wait_for("the relay is going away; its open channels finish on it")
            with trio.fail_after(DRAIN / 2):
                assert await _echo_once(port, b"a new connection")
            assert await _echo_on(stream, b"the old one still")


async def test_a_draining_relay_behind_haproxy_takes_resumes_while_new_agents_go_elsewhere(
    pki: Pki, trust_test_ca: None, tmp_path: Path, logs: LogWatch
) -> None:
    """SIGTERM to the relay holding a session that downloads: it answers /health 404,
    which haproxy (the shipped `http-check disable-on-404`) takes as NOLB: no new
    session goes there, what the tables stick to it still does. The agent's path is
    cut (in front of haproxy) mid-download: its resume reaches the draining relay by
    the stick table and the download arrives whole; an agent started meanwhile gets
    its session on the other relay at its first try; the drained relay exits 0. (The
    relay used to close its listener as the drain began: haproxy sent the resume to
    the other relay, which did not know the session, and the download was reset.)"""
    admin, config = tmp_path / "haproxy.sock", tmp_path / "relay.yaml"
    config.write_text("drain_timeout: 30\n")
    size = 32 * MiB  # (well past what windows and socket buffers hold: cut mid-transfer)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            digest = await serve_target(nursery, digest_handler(size, b"down"))
            async with relay_process("-c", str(config)) as (first, first_port), \
                    relay_process("-c", str(config)) as (second, second_port):
                with haproxy(pki, [first_port, second_port],
                             {"\nglobal\n": f"\nglobal\n    stats socket {admin} level admin\n"}
                             ) as front:
                    async with _drained_mid_download(nursery, front, digest,
                                                     first, second) as download:
                        holder, other = download.holder, download.other
                        await _wait_for_status(admin, "relay1" if holder is first else "relay2",
                                               "NOLB")
                        download.cutter.cut()
                        newcomer = f"wss://{LOOPBACK}:{front}/tunnel"
                        await start_agent(nursery, agent_config(0, [digest], relay=newcomer))
                        await other.wait_for(_times(SESSION_UP, 2))  # (the agent's next, its)
                        async for data in download.stream:
                            download.got += data
                    assert await holder.process.wait() == 0
                nursery.cancel_scope.cancel()
    assert bytes(download.got) == _pattern(size) + hashlib.sha256(b"").digest()
    assert b"resumes its session" in holder.log and _sessions(holder) == 1
    assert not [line for line in logs.lines if f"cannot reach relay {newcomer}" in line]
    assert not [line for line in logs.lines if "all reset" in line]


async def test_a_draining_relay_behind_the_readme_nginx_upstream_takes_resumes(
    pki: Pki, trust_test_ca: None, tmp_path: Path, logs: LogWatch
) -> None:
    """README's nginx block for several relays (hash per agent) with
    configs/nginx-relay.conf: the relay holding a download gets SIGTERM; the agent's
    next session, hashed to that relay, gets its 503 and nginx passes it on to the
    other (proxy_next_upstream http_503). The path is cut mid-download: the old
    session's resume reaches the draining relay by the hash (max_fails=0: the 503
    did not mark it down) and the download arrives whole; the new session's resume,
    503 there too, reaches the other relay."""
    config = tmp_path / "relay.yaml"
    config.write_text("drain_timeout: 30\n")
    size = 32 * MiB
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            digest = await serve_target(nursery, digest_handler(size, b"down"))
            async with relay_process("-c", str(config)) as (first, first_port), \
                    relay_process("-c", str(config)) as (second, second_port):
                upstream = _readme_nginx_upstream([first_port, second_port])
                with nginx(pki, 0, upstream=upstream) as front:
                    async with _drained_mid_download(nursery, front.port, digest,
                                                     first, second) as download:
                        holder, other = download.holder, download.other
                        await logs.wait_for_count("session up to", 2)  # (its next one)
                        await other.wait_for(SESSION_UP)  # (there, not on the holder)
                        download.cutter.cut()
                        async for data in download.stream:
                            download.got += data
                        await other.wait_for(rb"resumes its session")
                    assert await holder.process.wait() == 0
                nursery.cancel_scope.cancel()
    assert bytes(download.got) == _pattern(size) + hashlib.sha256(b"").digest()
    assert b"resumes its session" in holder.log and _sessions(holder) == 1


@dataclass
class _Download:
    stream: trio.SocketStream
    got: bytearray
    cutter: PathCutter
    #: The relay that held the session and was told to drain, and the other one.
    holder: Program
    other: Program


@asynccontextmanager
async def _drained_mid_download(nursery: trio.Nursery, front: int, digest: int,
                                first: Program, second: Program) -> AsyncIterator[_Download]:
    """A download through a PathCutter in front of ``front`` (the cut is the test's),
    and SIGTERM to the relay holding its session once the first bytes have arrived."""
    cutter = PathCutter(front)
    await nursery.start(cutter.serve)
    agent = await start_agent(nursery, agent_config(
        0, [digest], relay=f"wss://{LOOPBACK}:{cutter.port}/tunnel",
        reconnect_min_interval=0.2, reconnect_max_interval=1.0))
    async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
        await stream.send_eof()  # (nothing up: the download starts)
        got = bytearray(await stream.receive_some())
        holder, other = await _holder(first, second)
        holder.process.send_signal(signal.SIGTERM)
        yield _Download(stream, got, cutter, holder, other)


async def _holder(first: Program, second: Program) -> tuple[Program, Program]:
    """The relay that logged the agent's session up, and the other: once one has (a
    relay's log is read by a task of its own, so it may lag the session)."""
    found: list[Program] = []
    async with trio.open_nursery() as nursery:
        for relay in (first, second):
            nursery.start_soon(_found, relay, found, nursery.cancel_scope)
    return (found[0], second if found[0] is first else first)


async def _found(relay: Program, found: list[Program], scope: trio.CancelScope) -> None:
    await relay.wait_for(SESSION_UP)
    found.append(relay)
    scope.cancel()


async def _wait_for_status(admin: Path, server: str, status: str) -> None:
    """Until haproxy's `show stat` gives ``server`` (backend relays) ``status``: polled
    (an external program's state, with nothing to wait on); it checks every 0.5 s."""
    with trio.fail_after(5):
        while True:
            for line in (await admin_command(admin, "show stat")).splitlines():
                fields = line.split(",")
                if fields[:2] == ["relays", server] and fields[17] == status:
                    return
            await trio.sleep(0.05)


def _pattern(size: int) -> bytes:
    """What ``digest_handler(size, b"down")`` sends before its digest."""
    block = pattern_block(b"down")
    return (block * (size // len(block) + 1))[:size]


async def test_a_haproxy_reload_keeps_the_sessions_on_their_relays(
    pki: Pki, trust_test_ca: None, logs: LogWatch
) -> None:
    """A reload (a new haproxy process, the old one told to finish) keeps which relay
    holds which session: the shipped config's peers section hands the stick tables
    over, so a polling session's requests after it still reach its relay. Without
    it the new process starts empty and a request lands on the other relay (401:
    the session is lost, or at best resumed)."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relays = [await start_relay(nursery, relay_config()) for _ in range(2)]
            with reloadable_haproxy(pki, [relay.ports[0] for relay in relays]) as front:
                config = agent_config(0, [target], relay=f"wss://{LOOPBACK}:{front.port}/tunnel",
                                      transport="polling")
                agent = await start_agent(nursery, config)
                await _churn(agent.ports[0], 20)
                await _wait_until_haproxy_can_hand_over(front)
                front.reload()
                await _wait_for_newest_haproxy(front)
                await _churn(agent.ports[0], 200)
                tables = [await admin_command(front.admin, f"show table {name}")
                          for name in ("relays", "resume_ids")]
                nursery.cancel_scope.cancel()
    assert not [line for line in logs.lines if "does not know this session" in line]
    assert all("used:1" in table for table in tables), tables


async def _wait_until_haproxy_can_hand_over(front: ReloadableHaproxy) -> None:
    """A haproxy hands its tables over only once it has finished taking them over
    itself (from its predecessor, or after waiting 5 s for one): polled."""
    while "resync_timeout=<PAST>" not in await admin_command(front.admin, "show peers"):
        await trio.sleep(0.2)


async def _wait_for_newest_haproxy(front: ReloadableHaproxy) -> None:
    """The newest process answers the admin socket, with the tables handed over (or
    given up on: then the test's assertions say what is missing)."""
    newest = f"Pid: {front.processes[-1].pid}\n"
    while newest not in await admin_command(front.admin, "show info"):
        await trio.sleep(0.05)
    with trio.move_on_after(3):
        while "used:0" in await admin_command(front.admin, "show table relays"):
            await trio.sleep(0.05)


