"""The relay's memory bound holds against an agent that announces big windows and
never reads (docs/SECURITY.md, "Memory per session"): the relay program's RSS grows
by at most max_queued_size plus a small constant, another session keeps moving,
and the log names the session that filled its budget."""

from __future__ import annotations

import hashlib
import os
import re
from functools import partial
from pathlib import Path

import trio

from wstunnel import mux
from wstunnel.agent.connect import open_websocket
from wstunnel.config import parse_relay_url
from wstunnel.net.transport import TunnelTransport
from wstunnel.protocol import SessionLimits, TunnelProtocol
from wstunnel.relay import run_relay
from wstunnel.replay import RESUMABLE_HEADER, RESUME_HEADER
from wstunnel.security.auth import hash_token, new_token
from wstunnel.service.metrics import TunnelStats
from wstunnel.service.metrics_output import samples

from ..process_helpers import wstunnel
from ..security_helpers import watch_logs
from ..tunnel_helpers import LOOPBACK, relay_config, serve_target

MIB = 1024 * 1024
MAX_QUEUED_SIZE = 16 * MIB  # the relay's budget per session, as its config states it
#: What the relay may hold beyond the budget: the other session's own queue and
#: write (a few MiB), read buffers, 64 sockets' bookkeeping, allocator slack.
SLACK = 16 * MIB
CHANNELS = 64
BULK_SIZE = 32 * MIB
BLOCK = bytes(MIB)


def _rss(pid: int) -> int:
    """VmRSS of ``pid`` in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match[1]) * 1024


async def _flood(stream: trio.SocketStream) -> None:
    """A fast source: as much as the reader takes, until it goes away."""
    async with stream:
        try:
            while True:
                await stream.send_all(BLOCK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _bulk(stream: trio.SocketStream) -> None:
    """BULK_SIZE bytes, then close."""
    async with stream:
        for _ in range(BULK_SIZE // len(BLOCK)):
            await stream.send_all(BLOCK)


def _write_config(path: Path, greedy: str, normal: str) -> Path:
    accounts = "".join(f"  - name: {token.split('.')[0]}\n    token_hash: {hash_token(token)}\n"
                       f"    allow: [{LOOPBACK}]\n" for token in (greedy, normal))
    path.write_text(f"listen: {LOOPBACK}:0\nmax_queued_size: {MAX_QUEUED_SIZE}\n"
                    f"agents:\n{accounts}")
    return path


async def _greedy_session(port: int, token: str, source: int) -> trio.abc.Stream:
    """Log in, grant 16 MiB per channel, open CHANNELS channels to ``source``, and
    never read (the stream is returned so that it stays open)."""
    url = parse_relay_url(f"ws://{LOOPBACK}:{port}/tunnel")
    stream, trailing = await open_websocket(url, headers=[("Authorization", f"Bearer {token}")])
    agent = TunnelProtocol(mux.Role.AGENT, trailing_data=trailing,
                           limits=SessionLimits(initial_window=mux.MAX_WINDOW))
    for _ in range(CHANNELS):
        agent.open_channel(LOOPBACK, source)
    await stream.send_all(agent.data_to_send())
    return stream


async def _wait_until_steady(pid: int, settle: float = 1.5) -> int:
    """Poll RSS until it has not grown for ``settle`` seconds; return it."""
    peak = _rss(pid)
    steady_since = trio.current_time()
    while trio.current_time() - steady_since < settle:
        await trio.sleep(0.1)
        now = _rss(pid)
        if now > peak + 256 * 1024:
            steady_since = trio.current_time()
        peak = max(peak, now)
    return peak


async def _download(port: int, token: str, source: int) -> int:
    """A normal session: one channel, read to the end; returns the bytes read."""
    url = parse_relay_url(f"ws://{LOOPBACK}:{port}/tunnel")
    stream, trailing = await open_websocket(url, headers=[("Authorization", f"Bearer {token}")])
    transport = TunnelTransport(stream, TunnelProtocol(mux.Role.AGENT, trailing_data=trailing),
                                name="normal", ping_interval=0)
    received = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        channel = transport.open_channel(LOOPBACK, source)
        while data := await channel.receive_some():
            received += len(data)
        await transport.close()
        nursery.cancel_scope.cancel()
    await stream.aclose()
    return received


async def test_an_agent_that_never_reads_holds_no_more_than_the_budget(tmp_path: Path) -> None:
    """64 channels to a fast source with 16 MiB windows, never read: the relay's RSS
    grows by at most max_queued_size + SLACK; a 32 MiB download on another session
    completes meanwhile; the relay names the greedy session in its log."""
    greedy, normal = new_token("greedy"), new_token("normal")
    config = _write_config(tmp_path / "relay.yaml", greedy, normal)
    async with trio.open_nursery() as nursery:
        flood = await serve_target(nursery, _flood)
        bulk = await serve_target(nursery, _bulk)
        async with wstunnel("relay", "-c", str(config)) as relay:
            with trio.fail_after(15):
                port = int((await relay.wait_for(rb"relay listening on [\d.]+:(\d+)"))[1])
            pid = relay.process.pid
            before = await _wait_until_steady(pid, settle=0.5)
            with trio.fail_after(30):
                held = await _greedy_session(port, greedy, flood)
                with trio.move_on_after(10):  # (without a budget: no line, and RSS says why)
                    await relay.wait_for(rb"agent greedy\): outbound budget full")
                stalled = await _wait_until_steady(pid)
            with trio.fail_after(20):  # generous: on loopback it takes well under a second
                assert await _download(port, normal, bulk) == BULK_SIZE
            after = await _wait_until_steady(pid, settle=0.5)
            growth = max(stalled, after) - before
            assert growth <= MAX_QUEUED_SIZE + SLACK, (
                f"relay RSS grew by {growth / MIB:.1f} MiB (stalled {(stalled - before) / MIB:.1f},"
                f" after the download {(after - before) / MIB:.1f})\n{relay.text()}")
            assert len(re.findall(rb"outbound budget full", relay.log)) == 1, relay.text()
            if os.environ.get("WSTUNNEL_MEMORY_REPORT"):
                print(f"relay RSS: +{(stalled - before) / MIB:.1f} MiB stalled, "
                      f"+{(after - before) / MIB:.1f} MiB after the download")
            await held.aclose()
        nursery.cancel_scope.cancel()


async def _unacknowledging_session(port: int, token: str, source: int,
                                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                                   ) -> None:
    """A resumable session whose agent reads all it is sent (so returns window) but
    never acknowledges a record (PROTOCOL.md section 12): runs until cancelled."""
    url = parse_relay_url(f"ws://{LOOPBACK}:{port}/tunnel")
    answer: dict[str, str] = {}
    stream, trailing = await open_websocket(
        url, headers=[("Authorization", f"Bearer {token}"), (RESUME_HEADER, "new")],
        answer=answer)
    assert RESUMABLE_HEADER.lower() in answer, answer
    protocol = TunnelProtocol(mux.Role.AGENT)
    protocol.enable_resume()
    assert protocol.replay is not None
    protocol.replay.take_ack = lambda: None  # type: ignore[method-assign]
    protocol.receive_data(trailing)
    transport = TunnelTransport(stream, protocol, name="unacknowledging", ping_interval=0)
    async with stream, trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        channel = transport.open_channel(LOOPBACK, source)
        task_status.started()
        while await channel.receive_some():
            pass


async def test_an_agent_that_never_acknowledges_holds_no_more_than_the_budget(
        tmp_path: Path) -> None:
    """A resumable session's agent reads all it is sent but never acknowledges a
    record: the relay keeps at most max_queued_size for a replay, stops sending,
    says so naming the session, and its RSS stops growing within twice the budget
    (what it keeps, and what it queues) + SLACK."""
    greedy, normal = new_token("greedy"), new_token("normal")
    config = _write_config(tmp_path / "relay.yaml", greedy, normal)
    async with trio.open_nursery() as nursery:
        flood = await serve_target(nursery, _flood)
        async with wstunnel("relay", "-c", str(config)) as relay:
            with trio.fail_after(15):
                port = int((await relay.wait_for(rb"relay listening on [\d.]+:(\d+)"))[1])
            pid = relay.process.pid
            before = await _wait_until_steady(pid, settle=0.5)
            with trio.fail_after(30):
                async with trio.open_nursery() as session:
                    await session.start(_unacknowledging_session, port, greedy, flood)
                    await relay.wait_for(
                        rb"agent greedy\): the peer has not acknowledged \d+ KiB")
                    stalled = await _wait_until_steady(pid)
                    session.cancel_scope.cancel()  # (before the relay goes)
            growth = stalled - before
            assert growth <= 2 * MAX_QUEUED_SIZE + SLACK, (
                f"relay RSS grew by {growth / MIB:.1f} MiB\n{relay.text()}")
            if os.environ.get("WSTUNNEL_MEMORY_REPORT"):
                print(f"relay RSS: +{growth / MIB:.1f} MiB, never acknowledged")
        nursery.cancel_scope.cancel()


def _pattern(size: int) -> bytes:
    return hashlib.sha256(b"%d" % size).digest() * (size // 32)


async def _patterned(stream: trio.SocketStream) -> None:
    """4 MiB of a known pattern in small writes, then close."""
    data = _pattern(4 * MIB)
    async with stream:
        for start in range(0, len(data), 64 * 1024):
            await stream.send_all(data[start:start + 64 * 1024])


async def test_channels_held_back_by_the_budget_resume_and_finish() -> None:
    """A budget far below what 8 parallel downloads want (64 KiB for 8 x 4 MiB): the
    relay pauses and resumes its destinations again and again, and every download
    arrives whole -- no channel is left waiting once the agent has read; the
    pauses are counted in wstunnel_outbound_budget_exhaustions_total."""
    stats = TunnelStats("relay")
    with watch_logs() as logs:
        async with trio.open_nursery() as nursery:
            source = await serve_target(nursery, _patterned)
            config = relay_config(max_queued_size=64 * 1024, max_send_window=64 * 1024)
            bound = await nursery.start(partial(run_relay, config, shutdown=trio.Event(),
                                                stats=stats))
            url = parse_relay_url(f"ws://{LOOPBACK}:{bound[0][1]}/tunnel")
            stream, trailing = await open_websocket(url)
            transport = TunnelTransport(stream, TunnelProtocol(mux.Role.AGENT,
                                                               trailing_data=trailing),
                                        name="agent", ping_interval=0)
            results: list[bytes] = []

            async def download() -> None:
                channel = transport.open_channel(LOOPBACK, source)
                parts = []
                while data := await channel.receive_some():
                    parts.append(data)
                results.append(b"".join(parts))

            with trio.fail_after(30):
                await nursery.start(transport.run)
                async with trio.open_nursery() as downloads:
                    for _ in range(8):
                        downloads.start_soon(download)
                await transport.close()
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert results == [_pattern(4 * MIB)] * 8
    assert logs.matching("outbound budget full")
    (exhaustions,) = [value for name, _, value in samples(stats)
                      if name == "wstunnel_outbound_budget_exhaustions_total"]
    assert exhaustions >= 1
