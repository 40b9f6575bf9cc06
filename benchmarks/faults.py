"""Faults injected into a real agent and relay: does every connection end intact,
or visibly broken -- never cleanly cut short, never corrupt?

Issue 15: when a session dies, the applications at both ends must see a
failure (ECONNRESET), not a clean end of stream short of the data, which a
program that reads to EOF takes for a complete result. This runs rounds of
``--connections`` checked connections (benchmarks/_checked.py: random sizes,
log-uniform from 1 B to 8 MiB, half uploads, half downloads, every byte
checked, sha256 end to end) through ``wstunnel agent`` and ``wstunnel relay``,
``--concurrency`` at a time. ``--faults`` faults strike at random moments of a
round (each once a random number of its connections have ended, so they are
spread over the round however fast it runs); a fault is one of:

    relay-kill    SIGKILLs the relay and restarts it on the same port 0-2 s later
    link-cut      SIGKILLs the TCP forwarder between agent and relay (socat) and
                  starts it again 0-2 s later: the path is gone, both ends stay up
                  (sessions resume: with --resume-grace 0 their connections reset)
    link-freeze   SIGSTOPs the forwarder for longer than ping interval + timeout,
                  so both ends declare the session dead by ping, then SIGCONT
    dest-reset    resets 1-3 destination connections mid-stream (SO_LINGER 0)
    client-reset  resets 1-3 client connections mid-stream
    stall         stops 1-3 readers (the client of a download, the destination
                  of an upload) for 0.5-3 s

Processes (127.0.0.1 only; every one stopped on the way out, Ctrl-C included):
    relay    ``wstunnel relay`` (a config file: pings every second)
    link     ``socat TCP-LISTEN,fork`` in its own process group: the agent's path
    agent    ``wstunnel agent``, one forward to the targets, through the link
    this     the targets and the clients (trio), and the fault injector

Each round prints how each end of each connection ended, the faults, and the
agent's and the relay's resident memory (VmRSS) and open file descriptors
(after the round, with the session up again). clean-EOF-short and corrupt
must be 0, and so must timeout (a connection that never ended): otherwise
the exit status is 1.

    .venv/bin/python benchmarks/faults.py                 # one round, 200 connections
    .venv/bin/python benchmarks/faults.py --minutes 10    # rounds for 10 minutes
    .venv/bin/python benchmarks/faults.py --connections 50 --kinds relay-kill,stall
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

import _checked
import _procs
import trio
from _checked import Connection, End, Targets
from _procs import BenchError

MIB: Final = 1 << 20
MAX_SIZE: Final = 8 * MIB
PING_INTERVAL: Final = 1.0
PING_TIMEOUT: Final = 2.0
#: A frozen link outlasts the pings of both ends by this margin.
FREEZE_SECONDS: Final = PING_INTERVAL + PING_TIMEOUT + 1.5
#: After its clients, a round waits this long for the destination ends to finish.
TARGET_GRACE: Final = 15.0
READY_TIMEOUT: Final = 30.0
PINGS: Final = (f"ping_interval: {PING_INTERVAL}", f"ping_timeout: {PING_TIMEOUT}")
#: The agent's config beside its relay and forwards (chaos_paths.py uses it too).
AGENT_SETTINGS: Final = ("reconnect_min_interval: 0.1", "reconnect_max_interval: 1.0",
                         "connect_wait_timeout: 10.0", "drain_timeout: 1.0", *PINGS)
#: The tunnel a fault strikes: faults.py's, or chaos_paths.py's.
TunnelT = TypeVar("TunnelT")


def relay_settings(resume_grace: float) -> list[str]:
    """The relay's config beside its listen and allow lines."""
    return ["drain_timeout: 1.0", f"resume_grace: {resume_grace:g}", *PINGS]


def write_config(tmp: Path, name: str, lines: list[str]) -> Path:
    path = tmp / name
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Tunnel:
    """The relay, the link and the agent: started, broken and mended."""

    stack: contextlib.ExitStack
    tmp: Path
    command: list[str]
    targets: Targets
    target_port: int
    relay_port: int = field(default_factory=_procs.free_port)
    link_port: int = field(default_factory=_procs.free_port)
    agent_port: int = field(default_factory=_procs.free_port)
    relay: subprocess.Popen[bytes] | None = None
    link: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    relay_starts: int = 0
    frozen: bool = False
    resume_grace: float = 60.0  # (0: sessions do not survive a broken link)

    async def start(self) -> None:
        await self.start_relay()
        await self.start_link()
        config = write_config(self.tmp, "agent.yaml", [
            f"relay: ws://127.0.0.1:{self.link_port}/tunnel", "forwards:",
            f"  - listen: 127.0.0.1:{self.agent_port}",
            f"    target: 127.0.0.1:{self.target_port}", *AGENT_SETTINGS])
        self.agent = _procs.spawn(self.stack, [*self.command, "agent", "-c", str(config),
                                               "--no-proxy"], self.tmp / "agent.log")
        await _wait_listening(self.agent_port, self.agent, "wstunnel agent")

    async def start_relay(self) -> None:
        config = write_config(self.tmp, "relay.yaml", [
            f"listen: 127.0.0.1:{self.relay_port}", "allow: [127.0.0.1]", "no_auth: true",
            *relay_settings(self.resume_grace)])
        self.relay = _procs.spawn(self.stack, [*self.command, "relay", "-c", str(config)],
                                  self.tmp / "relay.log")
        await _wait_listening(self.relay_port, self.relay, "wstunnel relay")
        self.relay_starts += 1

    async def start_link(self) -> None:
        self.link = _procs.spawn(self.stack, [
            "socat", "-b", "262144", f"TCP-LISTEN:{self.link_port},bind=127.0.0.1,reuseaddr,fork",
            f"TCP:127.0.0.1:{self.relay_port}"], self.tmp / "link.log", group=True)
        await _wait_listening(self.link_port, self.link, "socat (the link)")

    def freeze_link(self, frozen: bool) -> None:
        assert self.link is not None
        os.killpg(self.link.pid, signal.SIGSTOP if frozen else signal.SIGCONT)
        self.frozen = frozen

    async def kill(self, which: str) -> None:
        """SIGKILL the relay, or the link's whole process group."""
        proc = self.relay if which == "relay" else self.link
        assert proc is not None
        if which == "relay":
            proc.kill()
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        await trio.to_thread.run_sync(proc.wait)

    async def mend(self) -> None:
        """Whatever a cancelled fault left broken is started or thawed again."""
        if self.frozen:
            self.freeze_link(False)
        if self.relay is None or self.relay.poll() is not None:
            await self.start_relay()
        if self.link is None or self.link.poll() is not None:
            await self.start_link()

    def figures(self) -> dict[str, tuple[int, int, int]]:
        """Per program: (pid, VmRSS KiB, open file descriptors)."""
        procs = {"agent": self.agent, "relay": self.relay}
        return {name: (proc.pid, _procs.vm_rss_kib(proc.pid), _procs.open_fds(proc.pid))
                for name, proc in procs.items() if proc is not None}


async def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    await trio.to_thread.run_sync(_procs.wait_listening, port, proc, what)


# -- faults --------------------------------------------------------------------------


Fault = Callable[[Tunnel, list[Connection]], Awaitable[None]]


async def _relay_kill(tunnel: Tunnel, conns: list[Connection]) -> None:
    tunnel.targets.relay_kills += 1
    for conn in conns:
        if conn.target.live:
            conn.target.end(_checked.RELAY_KILLED)
    await _kill_then_restart(tunnel, "relay", tunnel.start_relay)


async def _link_cut(tunnel: Tunnel, conns: list[Connection]) -> None:
    await _kill_then_restart(tunnel, "link", tunnel.start_link)


async def _kill_then_restart(tunnel: Tunnel, which: str,
                             start: Callable[[], Awaitable[None]]) -> None:
    await tunnel.kill(which)
    await restart_after(start)


async def restart_after(start: Callable[[], Awaitable[None]], most: float = 2.0) -> None:
    """``start`` after 0 to ``most`` s; at once when cancelled (the round is over, and
    settle needs it running)."""
    try:
        await trio.sleep(random.uniform(0.0, most))
    finally:
        with trio.CancelScope(shield=True):
            await start()


async def _link_freeze(tunnel: Tunnel, conns: list[Connection]) -> None:
    tunnel.freeze_link(True)
    try:
        await trio.sleep(FREEZE_SECONDS)
    finally:
        tunnel.freeze_link(False)


def _live(ends: Iterator[End], most: int) -> list[End]:
    candidates = [end for end in ends if end.live and end.ending is None]
    return random.sample(candidates, min(len(candidates), random.randint(1, most)))


async def _dest_reset(tunnel: Tunnel, conns: list[Connection]) -> None:
    for end in _live((conn.target for conn in conns), 3):
        end.inject_reset()


async def _client_reset(tunnel: Tunnel, conns: list[Connection]) -> None:
    for end in _live((conn.client for conn in conns), 3):
        end.inject_reset()


async def _stall(tunnel: Tunnel, conns: list[Connection]) -> None:
    readers = (conn.target if conn.upload else conn.client for conn in conns)
    for end in _live(readers, 3):
        end.stall_until = trio.current_time() + random.uniform(0.5, 3.0)


FAULTS: Final[dict[str, Fault]] = {
    "relay-kill": _relay_kill, "link-cut": _link_cut, "link-freeze": _link_freeze,
    "dest-reset": _dest_reset, "client-reset": _client_reset, "stall": _stall,
}


async def inject(tunnel: TunnelT, conns: list[Connection], kinds: list[str],
                 marks: list[int], done: Counter[str],
                 table: Mapping[str, Callable[[TunnelT, list[Connection]], Awaitable[None]]],
                 ) -> None:
    """A fault of ``table`` of one of ``kinds`` once each of ``marks`` connections have
    ended (plus up to 0.3 s): random moments spread over the round whatever its speed.
    Stops when cancelled."""
    for mark in sorted(marks):
        while sum(conn.client.ending is not None for conn in conns) < mark:
            await trio.sleep(0.05)
        await trio.sleep(random.uniform(0.0, 0.3))
        kind = random.choice(kinds)
        done[kind] += 1
        await table[kind](tunnel, conns)


# -- rounds --------------------------------------------------------------------------


@dataclass
class Round:
    """What one round did and saw."""

    conns: list[Connection]
    faults: Counter[str]
    seconds: float
    figures: dict[str, tuple[int, int, int]]
    relay_starts: int
    #: Destination connections that ended before their first line (Targets.headerless).
    headerless: Counter[str]

    def endings(self, side: str) -> Counter[str]:
        ends = [getattr(conn, side) for conn in self.conns]
        counts = Counter(end.ending or "not reached" for end in ends)
        return counts

    def errors(self) -> Counter[str]:
        return Counter(end.error for conn in self.conns for end in (conn.client, conn.target)
                       if end.ending == _checked.RESET and end.error)

    @property
    def failures(self) -> int:
        bad = (*_checked.FAILURES, _checked.TIMEOUT)
        ends = sum(self.endings(side)[ending] for side in ("client", "target") for ending in bad)
        return ends + sum(self.headerless[ending] for ending in _checked.FAILURES)


def _size(most: int = MAX_SIZE) -> int:
    """Log-uniform from 1 B to ``most``."""
    return max(1, int(math.exp(random.uniform(0.0, math.log(most)))))


def new_connections(seeds: Iterator[int], count: int, most: int = MAX_SIZE) -> list[Connection]:
    """Every other one an upload; sizes log-uniform up to ``most``."""
    return [Connection(next(seeds), upload=i % 2 == 1, size=_size(most)) for i in range(count)]


async def _client(conn: Connection, port: int | str, host: str, limiter: trio.CapacityLimiter,
                  timeout: float) -> None:
    async with limiter:
        with trio.move_on_after(timeout):
            await _checked.run_client(conn, port, host)
        conn.client.end(_checked.TIMEOUT)


async def _wait_for_targets(conns: list[Connection]) -> None:
    """Give the destination ends TARGET_GRACE to finish; a still open one times out."""
    with trio.move_on_after(TARGET_GRACE):
        while any(conn.target.live for conn in conns):
            await trio.sleep(0.1)
    for conn in conns:
        if conn.target.live:
            conn.target.end(_checked.TIMEOUT)
            conn.target.inject_reset()


async def run_round(tunnel: Tunnel, targets: Targets, args: argparse.Namespace,
                    seeds: Iterator[int]) -> Round:
    """``args.connections`` checked connections while faults are injected."""
    conns = new_connections(seeds, args.connections)
    headerless_before = targets.headerless.copy()
    faults, seconds = await run_connections(tunnel, targets, conns, args, FAULTS,
                                            tunnel.agent_port)
    await settle(tunnel, targets)
    headerless = targets.headerless - headerless_before
    return Round(conns, faults, seconds, tunnel.figures(), tunnel.relay_starts, headerless)


async def run_connections(
        tunnel: TunnelT, targets: Targets, conns: list[Connection], args: argparse.Namespace,
        table: Mapping[str, Callable[[TunnelT, list[Connection]], Awaitable[None]]],
        port: int | str, host: str = "127.0.0.1") -> tuple[Counter[str], float]:
    """``conns`` from clients of the forward on ``host``:``port`` (a ``str``: a unix
    socket), ``args.concurrency`` at a time, while up to ``args.faults`` faults of
    ``table`` (``args.kinds``) strike ``tunnel``: the faults done, and the seconds."""
    targets.connections.update((conn.seed, conn) for conn in conns)
    faults: Counter[str] = Counter()
    started = trio.current_time()
    marks = [random.randrange(max(1, len(conns) * 4 // 5)) for _ in range(args.faults)]
    limiter = trio.CapacityLimiter(args.concurrency)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inject, tunnel, conns, args.kinds, marks, faults, table)
        async with trio.open_nursery() as clients:
            for conn in conns:
                clients.start_soon(_client, conn, port, host, limiter, args.connection_timeout)
        await _wait_for_targets(conns)
        nursery.cancel_scope.cancel()
    seconds = trio.current_time() - started
    for conn in conns:
        del targets.connections[conn.seed]
    return faults, seconds


async def settle(tunnel: Tunnel, targets: Targets) -> None:
    """Mend the tunnel and wait until a small download through it is intact again."""
    await tunnel.mend()
    await wait_intact(targets, tunnel.agent_port)


async def wait_intact(targets: Targets, port: int | str, host: str = "127.0.0.1",
                      timeout: float = READY_TIMEOUT) -> None:
    """Until a small download through the forward on ``host``:``port`` is intact."""
    seeds = itertools.count(-1, -1)
    with trio.fail_after(timeout):
        while True:
            probe = Connection(next(seeds), upload=False, size=1000)
            targets.connections[probe.seed] = probe
            with trio.move_on_after(5):
                await _checked.run_client(probe, port, host)
            del targets.connections[probe.seed]
            if probe.client.ending == _checked.INTACT:
                return
            await trio.sleep(0.2)


# -- report --------------------------------------------------------------------------


CLIENT_ENDINGS: Final = _checked.ENDINGS
TARGET_ENDINGS: Final = (*_checked.ENDINGS, _checked.RELAY_KILLED, "not reached")
HEADERLESS: Final = (_checked.RESET, _checked.EOF_SHORT, _checked.CORRUPT, _checked.RELAY_KILLED)


def _counts(counts: Counter[str], names: tuple[str, ...]) -> str:
    return "  ".join(f"{name} {counts[name]}" for name in names)


def _figures(figures: dict[str, tuple[int, int, int]]) -> str:
    return "  |  ".join(f"{name} pid {pid}: RSS {rss / 1024:.1f} MiB, {fds} fds"
                        for name, (pid, rss, fds) in figures.items())


def report_round(number: int, result: Round) -> str:
    conns = result.conns
    moved = sum(conn.size for conn in conns) / MIB
    uploads = sum(conn.upload for conn in conns)
    faults = ", ".join(f"{kind} {n}" for kind, n in sorted(result.faults.items())) or "none"
    errors = ", ".join(f"{name} {n}" for name, n in result.errors().most_common()) or "-"
    return "\n".join([
        f"round {number}: {result.seconds:.1f} s, {len(conns)} connections ({uploads} up, "
        f"{len(conns) - uploads} down, {moved:.1f} MiB), faults: {faults}; resets seen "
        f"as {errors}",
        f"  client       {_counts(result.endings('client'), CLIENT_ENDINGS)}",
        f"  destination  {_counts(result.endings('target'), TARGET_ENDINGS)}",
        f"    before its first line  {_counts(result.headerless, HEADERLESS)}",
        f"  after: {_figures(result.figures)}  (relay start {result.relay_starts})",
    ])


def report_total(rounds: list[Round], start: dict[str, tuple[int, int, int]]) -> str:
    client: Counter[str] = Counter()
    target: Counter[str] = Counter()
    headerless: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    for result in rounds:
        client += result.endings("client")
        target += result.endings("target")
        headerless += result.headerless
        faults += result.faults
    end = rounds[-1].figures if rounds else start
    return "\n".join([
        f"total: {len(rounds)} rounds, {sum(len(r.conns) for r in rounds)} connections, "
        f"faults: " + (", ".join(f"{k} {n}" for k, n in sorted(faults.items())) or "none"),
        f"  client       {_counts(client, CLIENT_ENDINGS)}",
        f"  destination  {_counts(target, TARGET_ENDINGS)}",
        f"    before its first line  {_counts(headerless, HEADERLESS)}",
        f"  start: {_figures(start)}",
        f"  end:   {_figures(end)}",
        "  (the relay's figures are its current process's: a relay-kill starts a new one)",
    ])


# -- main ----------------------------------------------------------------------------


async def run(args: argparse.Namespace, stack: contextlib.ExitStack, tmp: Path) -> int:
    targets = Targets(args.connection_timeout)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, targets.handle, 0,
                                                host="127.0.0.1"))
        tunnel = Tunnel(stack, tmp, shlex.split(args.wstunnel), targets,
                        listeners[0].socket.getsockname()[1], resume_grace=args.resume_grace)
        await tunnel.start()
        await settle(tunnel, targets)
        start = tunnel.figures()
        print(f"start: {_figures(start)}", flush=True)
        rounds: list[Round] = []
        seeds = itertools.count(1)
        deadline = time.monotonic() + 60 * args.minutes
        while not rounds or time.monotonic() < deadline:
            rounds.append(await run_round(tunnel, targets, args, seeds))
            print(report_round(len(rounds), rounds[-1]), flush=True)
        print(report_total(rounds, start), flush=True)
        nursery.cancel_scope.cancel()
    return verdict(rounds, tmp)


def verdict(rounds: list[Round], tmp: Path) -> int:
    """The exit status: 1 if any end saw the tunnel lie (or never ended)."""
    failed = sum(result.failures for result in rounds)
    if failed:
        print(f"FAILED: {failed} ends were clean-EOF-short, corrupt or timed out; "
              f"logs in {tmp}", flush=True)
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200, help="per round (200)")
    parser.add_argument("--concurrency", type=int, default=50,
                        help="connections open at once (50; the relay dials 64 at a time)")
    parser.add_argument("--faults", type=int, default=6, help="faults per round, at most (6)")
    parser.add_argument("--kinds", default=",".join(FAULTS),
                        help=f"fault kinds, comma-separated ({','.join(FAULTS)})")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="run rounds for this long (default: one round)")
    return parse_run_args(parser, argv, FAULTS)


def parse_run_args(parser: argparse.ArgumentParser, argv: list[str] | None,
                   table: Mapping[str, object]) -> argparse.Namespace:
    """The arguments every fault benchmark takes (faults.py, chaos_paths.py) added to
    ``parser``'s own; ``--kinds`` made a list of ``table``'s keys; then checked."""
    parser.add_argument("--connection-timeout", type=float, default=120.0,
                        help="a connection that has not ended by then is a timeout (120 s)")
    parser.add_argument("--resume-grace", type=float, default=60.0,
                        help="the relay's resume_grace (60; 0: a broken link resets the "
                             "session's connections, as before resumption)")
    parser.add_argument("--seed", type=int, help="random seed (sizes, faults, moments)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temporary directory with the logs")
    parser.add_argument("--wstunnel", default=f"{shlex.quote(sys.executable)} -m wstunnel",
                        help="how to run wstunnel")
    args = parser.parse_args(argv)
    args.kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = set(args.kinds) - set(table)
    if unknown or args.connections < 1 or args.concurrency < 1 or args.faults < 0:
        parser.error(f"unknown fault kinds {sorted(unknown)}" if unknown else
                     "--connections and --concurrency must be >= 1, --faults >= 0")
    return args


def seed_random(args: argparse.Namespace) -> int:
    """``--seed``, or a random one, printed by the caller so that a run can be repeated."""
    seed: int = args.seed if args.seed is not None else random.randrange(1 << 32)
    random.seed(seed)
    return seed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = seed_random(args)
    print(f"faults.py --seed {seed}: {args.connections} connections per round, "
          f"{args.concurrency} at once, up to {args.faults} faults per round "
          f"({', '.join(args.kinds)})", flush=True)
    if (reason := _procs.ensure_socat()) is not None:
        print(f"faults.py needs socat for the agent-relay link: {reason}", file=sys.stderr)
        return 2
    return run_logged("faults.py", run, args, Path(tempfile.mkdtemp(prefix="wstunnel-faults-")))


def run_logged(name: str, run: Callable[[argparse.Namespace, contextlib.ExitStack, Path],
                                         Awaitable[int]],
               args: argparse.Namespace, tmp: Path) -> int:
    """``trio.run(run, ...)`` with its processes' logs in ``tmp``, every process stopped
    on the way out; the logs removed after a clean run unless ``--keep-logs``."""
    try:
        with contextlib.ExitStack() as stack:
            status = trio.run(run, args, stack, tmp)
    except (BenchError, OSError) as exc:
        print(f"{name}: {exc}; logs in {tmp}", file=sys.stderr)
        return 1
    if not args.keep_logs and status == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"logs in {tmp}")
    return status


if __name__ == "__main__":
    sys.exit(main())
