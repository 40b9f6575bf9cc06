"""Connections that outlive the path: bulk transfers and an echo while the path is cut.

An agent and a relay (processes, ws:// on loopback) with a TCP forwarder
between them that this script cuts (every connection through it reset, new
ones refused while it is down, as when a NAT forgets the mapping or a proxy
restarts). Meanwhile ``--size`` bytes go up and ``--size`` come down through a
forward, each checked with sha256 at the far end, and an interactive echo
sends one message every 10 ms on a third connection. ``--cuts`` cuts strike at
random moments of the transfers, the path staying down a random 0.1-``--max-down``
seconds each time (the next cut waits until the echo has answered again, so
that each gap measures one outage). Printed: whether every byte arrived once and in order (the
hashes), resets seen (must be 0: every outage is shorter than the relay's
resume grace), each outage, and the echo's longest gap beside the longest
outage (the difference is what a reconnect and resume cost), and the
agent's and relay's resident memory while ``--busy`` more channels are kept
busy both ways through every outage (their windows bound what is held).

    python benchmarks/resume.py [--size 256MiB] [--cuts 5] [--max-down 10]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import trio
from _children import PYTHON_M_WSTUNNEL, agent_argv, relay_argv
from _cutter import PathCutter
from _procs import BenchError, free_port, spawn, vm_rss_kib, wait_listening

BLOCK: Final = hashlib.sha256(b"resume").digest() * 32768  # 1 MiB
ECHO_EVERY: Final = 0.010


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.lower().removesuffix("ib").removesuffix("b")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


async def _send(stream: trio.SocketStream, size: int) -> str:
    digest, sent = hashlib.sha256(), 0
    while sent < size:
        piece = BLOCK[: min(len(BLOCK), size - sent)]
        await stream.send_all(piece)
        digest.update(piece)
        sent += len(piece)
    return digest.hexdigest()


async def _hash_all(stream: trio.SocketStream) -> tuple[str, int]:
    digest, got = hashlib.sha256(), 0
    async for data in stream:
        digest.update(data)
        got += len(data)
    return digest.hexdigest(), got


async def upload_target(stream: trio.SocketStream, results: dict[str, object]) -> None:
    """Hash what comes until EOF (the upload), then send the download and close; a
    connection that brings nothing (the readiness probe) gets nothing."""
    with contextlib.suppress(trio.BrokenResourceError):
        upload = await _hash_all(stream)
        if upload[1] == 0:
            return
        results["upload"] = upload
        results["download_sent"] = await _send(stream, int(str(results["size"])))
        await stream.send_eof()


async def run(args: argparse.Namespace, tmp: Path) -> int:
    results: dict[str, object] = {"size": args.size}
    gaps: list[float] = []
    outages: list[float] = []
    resets: list[str] = []
    with contextlib.ExitStack() as stack:
        async with trio.open_nursery() as nursery:
            bulk = (await nursery.start(trio.serve_tcp, lambda s: upload_target(s, results), 0))[0]
            echo = (await nursery.start(trio.serve_tcp, _echo_target, 0))[0]
            hose = (await nursery.start(trio.serve_tcp, _firehose, 0))[0]
            relay_port = free_port()
            relay = spawn(stack, [*PYTHON_M_WSTUNNEL, *relay_argv(
                relay_port, "--resume-grace", str(args.max_down + 20))], tmp / "relay.log")
            wait_listening(relay_port, relay, "wstunnel relay")
            cutter = PathCutter(relay_port)
            await nursery.start(cutter.serve)
            local_bulk, local_echo, local_hose = free_port(), free_port(), free_port()
            targets = [(local_bulk, bulk.socket.getsockname()[1]),
                       (local_echo, echo.socket.getsockname()[1]),
                       (local_hose, hose.socket.getsockname()[1])]
            agent = spawn(stack, [*PYTHON_M_WSTUNNEL, *agent_argv(cutter.port, targets)],
                          tmp / "agent.log")
            for port, _ in targets:
                wait_listening(port, agent, "wstunnel agent")
            done = trio.Event()
            for _ in range(args.busy):  # busy both ways through every outage
                nursery.start_soon(_busy, local_hose)
            memory = Memory(agent.pid, relay.pid)
            nursery.start_soon(memory.sample, done)
            results["memory"] = memory
            nursery.start_soon(_echo_loop, local_echo, gaps, resets, done)
            nursery.start_soon(_cuts, cutter, args, outages, done)
            start = time.monotonic()
            try:
                async with (await trio.open_tcp_stream("127.0.0.1", local_bulk) as stream,
                            trio.open_nursery() as both):
                    both.start_soon(_upload, stream, args.size, results)
                    results["download"] = await _hash_all(stream)
            except (trio.BrokenResourceError, OSError) as exc:
                resets.append(f"bulk: {exc!r}")
            results["seconds"] = time.monotonic() - start
            done.set()
            nursery.cancel_scope.cancel()
    return _report(args, results, gaps, outages, resets)


class Memory:
    """VmRSS of the agent and the relay, sampled every 0.2 s: (agent, relay) MiB."""

    def __init__(self, agent: int, relay: int) -> None:
        self.pids = (agent, relay)
        self.samples: list[tuple[float, float]] = []

    async def sample(self, done: trio.Event) -> None:
        while not done.is_set():
            agent, relay = (vm_rss_kib(pid) / 1024 for pid in self.pids)
            self.samples.append((agent, relay))
            await trio.sleep(0.2)


async def _both_ways(stream: trio.SocketStream) -> None:
    """Send without end and drain what comes, until the connection breaks."""
    async def drain() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for _ in stream:
                pass

    async def fill(scope: trio.CancelScope) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await stream.send_all(BLOCK[:65536])
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        nursery.start_soon(fill, nursery.cancel_scope)


async def _firehose(stream: trio.SocketStream) -> None:
    """The target of the busy channels: busy both ways."""
    await _both_ways(stream)


async def _busy(port: int) -> None:
    with contextlib.suppress(OSError):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await _both_ways(stream)


async def _upload(stream: trio.SocketStream, size: int, results: dict[str, object]) -> None:
    results["upload_sent"] = await _send(stream, size)
    await stream.send_eof()


async def _echo_target(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError):
        async for data in stream:
            await stream.send_all(data)


class Answers:
    """The echo's answers, for the cutter to wait on (each outage is measured alone)."""

    def __init__(self) -> None:
        self.count = 0
        self.event = trio.Event()

    def add(self) -> None:
        self.count += 1
        self.event.set()
        self.event = trio.Event()


ANSWERS: Final = Answers()


async def _echo_loop(port: int, gaps: list[float], resets: list[str], done: trio.Event) -> None:
    try:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            last = trio.current_time()
            while not done.is_set():
                await stream.send_all(b"x" * 64)
                got = 0
                while got < 64:
                    data = await stream.receive_some(64 - got)
                    if not data:
                        raise BenchError("the echo ended")
                    got += len(data)
                now = trio.current_time()
                ANSWERS.add()
                gaps.append(now - last)
                last = now
                await trio.sleep(ECHO_EVERY)
    except (trio.BrokenResourceError, OSError, BenchError) as exc:
        resets.append(f"echo: {exc!r}")


async def _cuts(cutter: PathCutter, args: argparse.Namespace, outages: list[float],
                done: trio.Event) -> None:
    expected = args.size * 2 / (150 << 20)  # seconds the transfers take, roughly
    for _ in range(args.cuts):
        await trio.sleep(random.uniform(0.2, max(0.5, expected / args.cuts)))
        if done.is_set():
            return
        down = random.uniform(0.1, args.max_down)
        outages.append(down)
        print(f"cut: path down for {down:.2f} s", file=sys.stderr, flush=True)
        cutter.cut(down)
        await trio.sleep(down)
        await ANSWERS.event.wait()  # (the echo is back before the next cut)


def _report(args: argparse.Namespace, results: dict[str, object], gaps: list[float],
            outages: list[float], resets: list[str]) -> int:
    upload_ok = results.get("upload") == (results.get("upload_sent"), args.size)
    download_ok = results.get("download") == (results.get("download_sent"), args.size)
    print(f"{args.size / 2**20:.0f} MiB up and down in {results['seconds']:.1f} s, "
          f"{len(outages)} cuts (down {', '.join(f'{d:.2f}' for d in outages)} s)")
    print(f"  upload   sha256 {'equal' if upload_ok else 'DIFFERENT'}, "
          f"download sha256 {'equal' if download_ok else 'DIFFERENT'}; resets {len(resets)}"
          + (f": {resets}" if resets else ""))
    if gaps:
        worst = max(gaps)
        longest = max(outages, default=0.0)
        print(f"  echo every {ECHO_EVERY * 1000:.0f} ms: {len(gaps)} answers, longest gap "
              f"{worst:.2f} s against the longest outage {longest:.2f} s "
              f"(+{worst - longest:.2f} s to reconnect and resume)")
    memory = results.get("memory")
    if isinstance(memory, Memory) and memory.samples:
        agent = [a for a, _ in memory.samples]
        relay = [r for _, r in memory.samples]
        print(f"  RSS with {args.busy} channels busy both ways: agent {agent[0]:.0f} -> max "
              f"{max(agent):.0f} MiB, relay {relay[0]:.0f} -> max {max(relay):.0f} MiB "
              f"({len(agent)} samples)")
    return 0 if upload_ok and download_ok and not resets else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=256 << 20)
    parser.add_argument("--cuts", type=int, default=5)
    parser.add_argument("--max-down", type=float, default=10.0)
    parser.add_argument("--busy", type=int, default=100,
                        help="channels kept busy both ways meanwhile (100)")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    random.seed(seed)
    print(f"resume.py --seed {seed}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="wstunnel-resume-"))
    try:
        status = trio.run(run, args, tmp)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        print(f"resume.py: {exc}; logs in {tmp}", file=sys.stderr)
        return 1
    if status == 0:
        shutil.rmtree(tmp)
    else:
        print(f"logs in {tmp}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
