"""Connections that never finish their handshake cannot keep an agent out.

What operators rely on: at most ``max_pending_handshakes`` connections are
held before a login lets them in; a new one closes the oldest (a real agent
finishes in milliseconds: the oldest is the one holding its place), so an
agent still gets in however many idle connections someone opens, from
whatever address. A session already let in is never closed for room, and a
connection stops counting once its login lets it in.
"""

from __future__ import annotations

import resource
import select
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from benchmarks._children import PYTHON_M_WSTUNNEL, relay_argv
from wstunnel.config import RelayTLS
from wstunnel.relay import run_relay
from wstunnel.relay.relay import Relay
from wstunnel.service.metrics import TunnelStats

from ..log_watch import LogWatch
from ..process_helpers import ROOT, Program, stop
from ..real_peers import Pki
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_exact,
    echo_handler,
    relay_config,
    serve_target,
    start_agent,
)

BOUND = 8
#: Half an upgrade request, and a TLS record header announcing a ClientHello that never comes.
HALF_REQUEST = b"GET /tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: web"
HALF_HELLO = b"\x16\x03\x01\x02\x00"


def _closed_by_relay(stream: trio.SocketStream) -> bool:
    """The relay closed it: its EOF or reset waits to be read (the relay sends an idle
    connection nothing else). Polled without reading, so an open one stays as it is."""
    poller = select.poll()
    poller.register(stream.socket.fileno(), select.POLLIN | select.POLLRDHUP)
    return bool(poller.poll(0))


async def _open_idle(idle: list[trio.SocketStream], port: int, count: int,
                     half: bytes) -> list[trio.SocketStream]:
    """``count`` more connections in ``idle``, every other one sending ``half``, each one
    seen by the relay before the next (so their age is their order)."""
    for i in range(count):
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        idle.append(stream)
        if i % 2:
            await stream.send_all(half)
        await trio.testing.wait_all_tasks_blocked()
    return idle


@asynccontextmanager
async def _closing() -> AsyncIterator[list[trio.SocketStream]]:
    """A list of connections, closed on the way out."""
    idle: list[trio.SocketStream] = []
    try:
        yield idle
    finally:
        for stream in idle:
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def _relay(tls: RelayTLS | None = None) -> AsyncIterator[tuple[int, TunnelStats, int]]:
    """A relay with ``max_pending_handshakes`` BOUND; (its port, its stats, an echo port)."""
    stats = TunnelStats("relay")
    async with trio.open_nursery() as nursery:
        echo = await serve_target(nursery, echo_handler)
        bound = await nursery.start(partial(
            run_relay, relay_config(max_pending_handshakes=BOUND, tls=tls),
            shutdown=trio.Event(), stats=stats))
        yield bound[0][1], stats, echo
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_a_full_relay_closes_the_oldest_idle_connection_for_an_agent(
        scheme: str, pki: Pki, logs: LogWatch) -> None:
    """BOUND idle connections (nothing, or half a request or TLS hello): an agent still
    connects and carries data; the oldest idle one, and only it, is closed, counted and
    logged."""
    tls = RelayTLS(str(pki.cert), str(pki.key)) if scheme == "wss" else None
    with trio.fail_after(15):
        async with _relay(tls) as (port, stats, echo), _closing() as idle, \
                trio.open_nursery() as nursery:
            await _open_idle(idle, port, BOUND, HALF_HELLO if tls else HALF_REQUEST)
            assert not any(_closed_by_relay(stream) for stream in idle)
            agent = await start_agent(nursery, agent_config(
                port, [echo], relay=f"{scheme}://{LOOPBACK}:{port}/tunnel", ca_file=str(pki.ca)))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as client:
                assert await echo_exact(client, b"through") == b"through"
            await trio.testing.wait_all_tasks_blocked()
            assert [_closed_by_relay(stream) for stream in idle] == [True] + [False] * (BOUND - 1)
            assert stats.handshakes_evicted == 1 and stats.sessions_total == 1
            line = await logs.wait_for("without finishing its handshake, to make room")
            assert f"{BOUND} connections were in theirs (max_pending_handshakes)" in line
            nursery.cancel_scope.cancel()


async def test_a_connection_let_in_no_longer_counts_and_is_never_closed_for_room(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent's connection whose login let it in, held just before its session starts:
    BOUND idle connections after it close nothing (it no longer counts, and is never the
    one closed). Once its session is up, 2 x BOUND more close the oldest idle ones, one
    each, and the session carries data throughout, never replaced."""
    let_in, go_on = trio.Event(), trio.Event()
    admit_resume = Relay.admit_resume

    async def held_after_login(self: Relay, *args: Any) -> Any:
        let_in.set()
        await go_on.wait()
        return await admit_resume(self, *args)

    monkeypatch.setattr(Relay, "admit_resume", held_after_login)
    with trio.fail_after(15):
        async with _relay() as (port, stats, echo), _closing() as idle, \
                trio.open_nursery() as nursery:
            agent = await start_agent(nursery, agent_config(port, [echo]))
            await let_in.wait()
            await _open_idle(idle, port, BOUND, HALF_REQUEST)
            assert not any(_closed_by_relay(stream) for stream in idle)
            assert stats.handshakes_evicted == 0
            go_on.set()
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as client:
                assert await echo_exact(client, b"before") == b"before"
                await _open_idle(idle, port, 2 * BOUND, HALF_REQUEST)
                closed = [_closed_by_relay(stream) for stream in idle]
                assert closed == [True] * (2 * BOUND) + [False] * BOUND
                assert stats.handshakes_evicted == 2 * BOUND
                assert await echo_exact(client, b"after") == b"after"
            assert stats.sessions_total == 1
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _relay_with_few_files(files: int) -> AsyncIterator[tuple[Program, int]]:
    """The relay program with RLIMIT_NOFILE ``files`` (soft and hard), once it listens."""
    process = await trio.lowlevel.open_process(
        [*PYTHON_M_WSTUNNEL, *relay_argv(0)], stderr=subprocess.PIPE, cwd=ROOT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (files, files)))
    program = Program(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(program.collect_log)
            with trio.fail_after(15):
                match = await program.wait_for(rb"relay listening on 127\.0\.0\.1:(\d+)")
            yield program, int(match[1])
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await stop(process)


async def test_a_flood_of_idle_connections_leaves_descriptors_for_an_agent() -> None:
    """The relay program with 64 descriptors: 150 idle connections (it could hold about
    50 before running out, and then accepted nothing until handshake_timeout, 10 s, let
    one go) take at most a quarter; an agent connecting after them carries data within
    a few seconds."""
    async with _relay_with_few_files(64) as (relay, port), _closing() as idle, \
            trio.open_nursery() as nursery:
        idle += [await trio.open_tcp_stream(LOOPBACK, port) for _ in range(150)]
        echo = await serve_target(nursery, echo_handler)
        with trio.fail_after(4):
            agent = await start_agent(nursery, agent_config(port, [echo]))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as client:
                assert await echo_exact(client, b"through") == b"through"
        assert b"16 connections were in theirs (max_pending_handshakes)" in relay.log
        nursery.cancel_scope.cancel()
