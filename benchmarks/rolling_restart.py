"""Rolling restarts of relays behind haproxy: what an application sees meanwhile.

README, "Running several relays": N relays behind haproxy; a relay that gets
SIGTERM sends its agents GOAWAY and lets their open connections finish while
the agent opens its next session (through haproxy, to another relay) after
its reconnect backoff. This runs that setup for real and restarts the relays one after the other
while an application keeps connecting through the agent, and counts what the
application saw.

Processes (127.0.0.1 only, every one stopped on the way out, Ctrl-C included):
    targets   benchmarks/_targets.py: the echo server
    relays    two ``wstunnel relay`` processes (``--drain-timeout``, the
              shipped default 10 s), each restarted on its own port
    haproxy   configs/haproxy-relay.cfg as shipped, plain HTTP on the front (as
              scale_out.py adapts it), with an admin socket to see the servers
    agent     one ``wstunnel agent`` with an ``-L`` forward to the echo (and a
              ``-D`` SOCKS port with ``--socks``), shipped defaults otherwise
    this      the load (trio): ``--clients`` clients, each in a loop: connect,
              send 4 KiB-256 KiB (random), read the echo, check it byte for
              byte, close; and the restarts

A round restarts relay 1 (SIGTERM, wait for it to exit, start it again, wait
for GET /health and for haproxy to see it UP), pauses, then does the same with
relay 2; ``--faults relays,haproxy`` adds a haproxy reload (a new process with
``-sf``) to each round. ``--rounds`` rounds, then a short tail, all within
``--deadline`` seconds.

Each connection ends as one of:
    ok         every byte echoed, in order, then closed by us
    refused    the agent's port refused the connection
    reset      ECONNRESET (or another socket error): the failure was visible
    eof-short  a clean end of stream before the whole echo: data loss that
               looks like success
    corrupt    a byte differs
    socks      (``--socks`` clients) the SOCKS reply was a failure
    timeout    no end within ``--connection-timeout``
The table has one row per run; failures are listed with the time since the
nearest restart step (SIGTERM of a relay, or a haproxy reload). The agent's log
gives the GOAWAYs it saw and the connections it opened again on the next
session ("opened again"; builds before 821cb64 do not), and the longest it said
new connections wait for that session: a session shorter than the agent's
``reconnect_max_interval`` (30 s) ends in a growing backoff, GOAWAY or not, so a
quick rolling restart makes each wait longer (``--reconnect-max`` sets it lower).

``--wstunnel`` may be given several times (``--names`` labels them): the
builds run alternately, ``--repeat`` times each, so a base and a head build
share the machine's load:

    .venv/bin/python benchmarks/rolling_restart.py                  # one run, ~30 s
    .venv/bin/python benchmarks/rolling_restart.py --rounds 2 --clients 8
    .venv/bin/python benchmarks/rolling_restart.py --repeat 3 --names base,head \\
        --wstunnel "env PYTHONPATH=/tmp/rr-base .venv/bin/python -P -m wstunnel" \\
        --wstunnel "env PYTHONPATH=/tmp/rr-head .venv/bin/python -P -m wstunnel"

Exit status 1 if any connection failed (or a process misbehaved).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import _procs
import trio
from _children import agent_argv, relay_argv
from _haproxy_admin import admin_command
from _procs import BenchError, exit_on_sigterm
from scale_out import haproxy_config

KIB: Final = 1 << 10
BLOCK: Final = random.Random(22).randbytes(1 << 20)
CHUNK: Final = 64 * KIB
KINDS: Final = ("ok", "refused", "reset", "eof-short", "corrupt", "socks", "timeout")
FAULTS: Final = ("relays", "haproxy")
#: Longest any one step of a restart (exit, /health, haproxy UP) may take.
STEP_TIMEOUT: Final = 30.0
WARMUP: Final = 2.0
TAIL: Final = 3.0
#: Agent log lines counted per run (what the agent did about each GOAWAY).
AGENT_LINES: Final = {"goaway": "the relay is going away", "reopened": "opened again on the",
                      "agent resets": "reset the connection"}
WAIT: Final = re.compile(r"new connections go to a new session in ([0-9.]+) s")


@dataclass
class Outcome:
    """One connection: how it ended, when (trio clock), how long it took."""

    kind: str
    started: float
    ended: float
    size: int
    path: str  # "-L" or "-D"
    detail: str = ""


@dataclass
class Run:
    """One run of one build: the connections and the restart steps."""

    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (time, "SIGTERM relay1 r1")
    drains: list[float] = field(default_factory=list)  # SIGTERM -> exit, seconds
    comebacks: list[float] = field(default_factory=list)  # start -> UP in haproxy, seconds
    agent_lines: Counter[str] = field(default_factory=Counter)
    #: After each GOAWAY: how long the agent said new connections wait for the next session.
    waits: list[float] = field(default_factory=list)
    load: str = ""
    unfinished: int = 0

    def counts(self) -> Counter[str]:
        return Counter(outcome.kind for outcome in self.outcomes)

    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.kind != "ok"]


# -- the processes ----------------------------------------------------------------------


@dataclass
class Cluster:
    """Two relays, haproxy (reloadable) and one agent, started and restarted."""

    stack: contextlib.ExitStack
    tmp: Path
    command: list[str]
    drain_timeout: float
    relay_ports: list[int] = field(default_factory=lambda: [_procs.free_port() for _ in "12"])
    relays: list[subprocess.Popen[bytes]] = field(default_factory=list)
    front: int = field(default_factory=_procs.free_port)
    haproxies: list[subprocess.Popen[bytes]] = field(default_factory=list)
    agent_port: int = field(default_factory=_procs.free_port)
    socks_port: int = field(default_factory=_procs.free_port)

    @property
    def admin(self) -> Path:
        return self.tmp / "haproxy.sock"

    def start(self, echo_port: int, socks: bool, reconnect_max: float | None) -> None:
        config = self.tmp / "relay.yaml"
        config.write_text(f"drain_timeout: {self.drain_timeout}\n")
        self.relays = [self._spawn_relay(index) for index in range(2)]
        for index, relay in enumerate(self.relays):
            _procs.wait_listening(self.relay_ports[index], relay, f"relay {index + 1}")
        self._write_haproxy_config()
        self.reload_haproxy()
        _procs.wait_listening(self.front, self.haproxies[-1], "haproxy")
        extra = ["-D", f"127.0.0.1:{self.socks_port}"] if socks else []
        if reconnect_max is not None:
            agent_config = self.tmp / "agent.yaml"
            agent_config.write_text(f"reconnect_max_interval: {reconnect_max}\n"
                                    f"reconnect_min_interval: {min(1.0, reconnect_max)}\n")
            extra += ["-c", str(agent_config)]
        agent = _procs.spawn(self.stack, [*self.command, *agent_argv(
            self.front, [(self.agent_port, echo_port)], *extra)], self.tmp / "agent.log")
        _procs.wait_listening(self.agent_port, agent, "wstunnel agent")
        _procs.echo_check(self.agent_port)

    def _spawn_relay(self, index: int) -> subprocess.Popen[bytes]:
        argv = relay_argv(self.relay_ports[index], "-c", str(self.tmp / "relay.yaml"),
                          "--trusted-proxy", "127.0.0.1")
        return _procs.spawn(self.stack, [*self.command, *argv],
                            self.tmp / f"relay{index + 1}.log")

    def _write_haproxy_config(self) -> None:
        text = haproxy_config(self.front, self.relay_ports)
        text = text.replace("\nglobal\n", f"\nglobal\n    stats socket {self.admin} level admin\n",
                            1)
        (self.tmp / "haproxy.cfg").write_text(text)

    def reload_haproxy(self) -> None:
        """Start haproxy, or a new one that takes over from the newest (``-sf``)."""
        binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
        if binary is None:
            raise BenchError("haproxy is not installed (apt-get install haproxy)")
        older = ["-sf", str(self.haproxies[-1].pid)] if self.haproxies else []
        self.haproxies.append(_procs.spawn(
            self.stack, [binary, "-f", str(self.tmp / "haproxy.cfg"), "-db", *older],
            self.tmp / "haproxy.log", group=True))

    async def restart_relay(self, index: int, run: Run, label: str) -> None:
        """SIGTERM, wait for the exit, start again, wait until haproxy sends to it."""
        old = self.relays[index]
        run.events.append((trio.current_time(), f"SIGTERM relay{index + 1} {label}"))
        old.send_signal(signal.SIGTERM)
        started = trio.current_time()
        with _step(f"relay {index + 1} to exit after SIGTERM"):
            while old.poll() is None:
                await trio.sleep(0.02)  # (a child's exit: polled, as _procs does)
        run.drains.append(trio.current_time() - started)
        self.relays[index] = self._spawn_relay(index)
        started = trio.current_time()
        with _step(f"relay {index + 1} to answer GET /health"):
            while not await _healthy(self.relay_ports[index]):
                await trio.sleep(0.05)
        with _step(f"haproxy to mark relay{index + 1} UP"):
            while await _server_status(self.admin, f"relay{index + 1}") != "UP":
                await trio.sleep(0.1)
        run.comebacks.append(trio.current_time() - started)

    async def reload(self, run: Run, label: str) -> None:
        run.events.append((trio.current_time(), f"haproxy reload {label}"))
        self.reload_haproxy()
        newest = f"Pid: {self.haproxies[-1].pid}\n"
        with _step("the new haproxy to answer its admin socket"):
            while newest not in await _admin(self.admin, "show info"):
                await trio.sleep(0.1)


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    with trio.move_on_after(STEP_TIMEOUT) as scope:
        yield
    if scope.cancelled_caught:
        raise BenchError(f"waited {STEP_TIMEOUT:g} s for {what}")


async def _healthy(port: int) -> bool:
    try:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: relay\r\n"
                                  b"Connection: close\r\n\r\n")
            return (await stream.receive_some(64)).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


async def _admin(path: Path, command: str) -> str:
    """One command on haproxy's admin socket; its answer ("" if none answers yet)."""
    try:
        return await admin_command(path, command)
    except OSError:
        return ""


async def _server_status(admin: Path, server: str) -> str:
    """haproxy's view of backend ``relays``'s ``server`` (UP, DOWN, ...)."""
    lines = (await _admin(admin, "show stat")).splitlines()
    if not lines:
        return ""
    header = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = line.split(",")
        if row[:2] == ["relays", server]:
            return row[header.index("status")].split()[0]
    return ""


# -- the load ---------------------------------------------------------------------------


async def _exchange(stream: trio.SocketStream, payload: memoryview) -> tuple[str, str]:
    """Send ``payload`` while reading the echo: (kind, detail).

    Only the reader decides, except when the writer met ECONNRESET first: the
    error is then consumed and the reader sees what looks like a clean EOF."""
    sent_reset: list[str] = []

    async def send() -> None:
        try:
            for offset in range(0, len(payload), CHUNK):
                await stream.send_all(payload[offset:offset + CHUNK])
        except trio.BrokenResourceError as exc:
            if isinstance(exc.__cause__, ConnectionResetError):
                sent_reset.append(f"send: {exc.__cause__!r}")

    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        try:
            while len(received) < len(payload):
                data = await stream.receive_some(min(CHUNK, len(payload) - len(received)))
                if not data:
                    break
                received += data
        except trio.BrokenResourceError as exc:
            nursery.cancel_scope.cancel()
            return "reset", f"receive: {exc.__cause__!r}"
        nursery.cancel_scope.cancel()
    if len(received) < len(payload):
        return ("reset", sent_reset[0]) if sent_reset else (
            "eof-short", f"{len(received)} of {len(payload)} bytes")
    return ("ok", "") if received == payload else ("corrupt", "bytes differ")


async def _socks_connect(stream: trio.SocketStream, port: int) -> bool:
    """SOCKS5 CONNECT to 127.0.0.1:``port``; True when the agent answers success."""
    await stream.send_all(b"\x05\x01\x00")
    if await _receive_exactly(stream, 2) != b"\x05\x00":
        return False
    await stream.send_all(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                          + port.to_bytes(2, "big"))
    reply = await _receive_exactly(stream, 10)
    return reply[:2] == b"\x05\x00"


async def _receive_exactly(stream: trio.SocketStream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        more = await stream.receive_some(count - len(data))
        if not more:
            break
        data += more
    return data


async def _connection(port: int, payload: memoryview, socks_to: int | None
                      ) -> tuple[str, str]:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except ConnectionRefusedError as exc:
        return "refused", repr(exc)
    except OSError as exc:
        return "reset", f"connect: {exc!r}"
    async with stream:
        try:
            if socks_to is not None and not await _socks_connect(stream, socks_to):
                return "socks", "the SOCKS reply was a failure (or none came)"
            return await _exchange(stream, payload)
        except trio.BrokenResourceError as exc:
            return "reset", f"socks: {exc.__cause__!r}"


@dataclass
class Load:
    """``clients`` clients connecting in a loop until ``stopping``."""

    port: int
    socks: tuple[int, int] | None  # (agent's -D port, echo port)
    sizes: tuple[int, int]
    timeout: float
    run: Run
    stopping: bool = False

    async def client(self, number: int) -> None:
        via_socks = self.socks is not None and number % 2 == 1
        while not self.stopping:
            size = random.randint(*self.sizes)
            offset = random.randrange(len(BLOCK) - size + 1)
            payload = memoryview(BLOCK)[offset:offset + size]
            started = trio.current_time()
            self.run.unfinished += 1
            kind, detail = "timeout", f"no end within {self.timeout:g} s"
            with trio.move_on_after(self.timeout):
                if via_socks and self.socks is not None:
                    kind, detail = await _connection(self.socks[0], payload, self.socks[1])
                else:
                    kind, detail = await _connection(self.port, payload, None)
            self.run.unfinished -= 1
            self.run.outcomes.append(Outcome(kind, started, trio.current_time(), size,
                                             "-D" if via_socks else "-L", detail))


# -- one run ----------------------------------------------------------------------------


async def _restarts(cluster: Cluster, args: argparse.Namespace, run: Run) -> None:
    await trio.sleep(WARMUP)
    for number in range(1, args.rounds + 1):
        if "relays" in args.faults:
            for index in range(2):
                await cluster.restart_relay(index, run, f"r{number}")
                await trio.sleep(args.pause)
        if "haproxy" in args.faults:
            await cluster.reload(run, f"r{number}")
            await trio.sleep(args.pause)
    await trio.sleep(TAIL)


async def _run(cluster: Cluster, echo_port: int, args: argparse.Namespace, run: Run) -> None:
    socks = (cluster.socks_port, echo_port) if args.socks else None
    load = Load(cluster.agent_port, socks, (args.min_size, args.max_size),
                args.connection_timeout, run)
    failure: BenchError | None = None
    with trio.move_on_after(args.deadline) as scope:
        async with trio.open_nursery() as nursery:
            for number in range(args.clients):
                nursery.start_soon(load.client, number)
            try:
                await _restarts(cluster, args, run)
            except BenchError as exc:  # (raised here, not wrapped in the nursery's group)
                failure = exc
            finally:
                load.stopping = True
    if failure is not None:
        raise failure
    if scope.cancelled_caught:
        raise BenchError(f"the run did not finish within --deadline {args.deadline:g} s "
                         f"({len(run.events)} restart steps done)")


def run_once(name: str, command: str, args: argparse.Namespace, work: Path) -> Run:
    run = Run(name, load=_loadavg())
    with contextlib.ExitStack() as stack:
        targets = _procs.start_targets(stack, work)
        cluster = Cluster(stack, work, shlex.split(command), args.drain_timeout)
        cluster.start(targets.ports["echo"], args.socks, args.reconnect_max)
        trio.run(_run, cluster, targets.ports["echo"], args, run)
        # (before the processes stop: a relay stopped on the way out sends GOAWAY too)
        text = (work / "agent.log").read_text(errors="replace")
    run.agent_lines = Counter({key: text.count(line) for key, line in AGENT_LINES.items()})
    run.waits = [float(wait) for wait in WAIT.findall(text)]
    run.load += f" -> {_loadavg()}"
    return run


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- the report -------------------------------------------------------------------------


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.0f}"


def row(run: Run) -> str:
    counts = run.counts()
    times = [o.ended - o.started for o in run.outcomes if o.kind == "ok"]
    cells = [run.name, str(len(run.outcomes)), *(str(counts[kind]) for kind in KINDS),
             _ms(times, 0.5), _ms(times, 0.99), _ms(times, 1.0),
             *(str(run.agent_lines[key]) for key in AGENT_LINES),
             f"{max(run.waits, default=0):.1f}", f"{max(run.drains, default=0):.1f}", run.load]
    return "| " + " | ".join(cells) + " |"


HEADER: Final = ("| build | connections | " + " | ".join(KINDS)
                 + " | p50 ms | p99 ms | max ms | " + " | ".join(f"agent: {key}" for key in
                                                                AGENT_LINES)
                 + " | agent: longest wait s | longest drain s | load average |")


def failure_lines(run: Run, most: int = 20) -> list[str]:
    lines = []
    for outcome in run.failures()[:most]:
        moment, what = min(((t, label) for t, label in run.events),
                           key=lambda pair: abs(outcome.ended - pair[0]),
                           default=(outcome.ended, "no restart"))
        lines.append(f"  {run.name} {outcome.path} {outcome.kind}: started "
                     f"{outcome.started - moment:+.3f} s, ended {outcome.ended - moment:+.3f} s "
                     f"from {what} ({outcome.size} B): {outcome.detail}")
    hidden = len(run.failures()) - most
    return lines + ([f"  ... and {hidden} more"] if hidden > 0 else [])


def summary(runs: list[Run]) -> str:
    lines = [HEADER, "|---" * (HEADER.count("|") - 1) + "|"]
    lines += [row(run) for run in runs]
    for name in dict.fromkeys(run.name for run in runs):
        mine = [run for run in runs if run.name == name]
        failed = sum(len(run.failures()) for run in mine)
        total = sum(len(run.outcomes) for run in mine)
        drains = [d for run in mine for d in run.drains]
        lines.append(f"{name}: {failed} failed of {total} in {len(mine)} runs; relay drain "
                     f"(SIGTERM -> exit) median {statistics.median(drains or [0]):.2f} s; "
                     f"back UP in haproxy median "
                     f"{statistics.median([c for r in mine for c in r.comebacks] or [0]):.2f} s")
    failures = [line for run in runs for line in failure_lines(run)]
    return "\n".join(lines + (["failures:", *failures] if failures else []))


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (20)")
    parser.add_argument("--min-size", type=int, default=4 * KIB, help="bytes (4 KiB)")
    parser.add_argument("--max-size", type=int, default=256 * KIB, help="bytes (256 KiB)")
    parser.add_argument("--rounds", type=int, default=6,
                        help="rolling restarts: each restarts relay 1, then relay 2 (6)")
    parser.add_argument("--faults", default="relays",
                        type=lambda text: [f for f in text.split(",") if f],
                        help="per round: relays, haproxy (a reload with -sf), or both")
    parser.add_argument("--pause", type=float, default=1.0,
                        help="seconds between one restart step and the next (1)")
    parser.add_argument("--drain-timeout", type=float, default=10.0,
                        help="the relays' drain_timeout (10, the default)")
    parser.add_argument("--reconnect-max", type=float, metavar="SECONDS",
                        help="the agent's reconnect_max_interval (default: the agent's, 30): "
                             "a session shorter than this ends in a backoff, so a quick "
                             "rolling restart makes the agent wait longer each time")
    parser.add_argument("--socks", action="store_true",
                        help="every other client goes through the agent's -D (SOCKS5)")
    parser.add_argument("--connection-timeout", type=float, default=30.0)
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="hard limit of one run, seconds (300)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each build, alternating")
    parser.add_argument("--wstunnel", action="append", metavar="CMD",
                        help="command running the wstunnel CLI; repeat it to compare builds "
                             f"(default {_procs.WSTUNNEL_COMMAND})")
    parser.add_argument("--names", type=lambda text: text.split(","),
                        help="a label per --wstunnel, comma-separated")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--json", type=Path, help="also write every connection's outcome here")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the process logs in DIR")
    args = parser.parse_args(argv)
    args.wstunnel = args.wstunnel or [_procs.WSTUNNEL_COMMAND]
    args.names = args.names or [f"build{n}" for n in range(1, len(args.wstunnel) + 1)]
    if len(args.names) != len(args.wstunnel) or set(args.faults) - set(FAULTS) \
            or not 0 < args.min_size <= args.max_size <= len(BLOCK) or args.clients < 1:
        parser.error("one name per --wstunnel; --faults from relays,haproxy; "
                     f"0 < --min-size <= --max-size <= {len(BLOCK)}; --clients >= 1")
    return args


def _write_json(path: Path, runs: list[Run]) -> None:
    path.write_text(json.dumps([{
        "name": run.name, "load": run.load, "events": run.events, "drains": run.drains,
        "agent_lines": dict(run.agent_lines), "waits": run.waits,
        "outcomes": [vars(outcome) for outcome in run.outcomes]} for run in runs], indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    random.seed(seed)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    print(f"rolling_restart.py --seed {seed}: {args.clients} clients, {args.rounds} rounds "
          f"({'+'.join(args.faults)}), {len(args.wstunnel)} builds x {args.repeat}",
          file=sys.stderr, flush=True)
    runs: list[Run] = []
    logs = args.keep or Path(tempfile.mkdtemp(prefix="wstunnel-rolling-"))
    try:
        for repetition in range(1, args.repeat + 1):
            for name, command in zip(args.names, args.wstunnel, strict=True):
                work = logs / f"{name}-{repetition}"
                work.mkdir(parents=True, exist_ok=True)
                runs.append(run_once(name, command, args, work))
                print(row(runs[-1]), file=sys.stderr, flush=True)
    except BenchError as exc:
        print(f"rolling_restart.py: {exc}; logs in {logs}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; all benchmark processes stopped", file=sys.stderr)
        return 130
    print(summary(runs))
    if args.json:
        _write_json(args.json, runs)
    failed = any(run.failures() for run in runs)
    if failed or args.keep:
        print(f"logs in {logs}", file=sys.stderr)
    else:
        shutil.rmtree(logs, ignore_errors=True)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
