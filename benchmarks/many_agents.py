"""One relay, many agents: what idle sessions cost the relay, and the active agent.

Issue 22 ("Scale"): 1, 100 and 1,000 agent sessions on one relay; relay RSS
per idle session, relay CPU per idle session per minute (pings), and the
64 B round trip of one active agent among them. Target: 1,000 idle sessions
cost < 50 MiB and < 1 % of a core, and do not move the active agent's p99.

Processes (127.0.0.1, all stopped on the way out, Ctrl-C included):
    targets  benchmarks/_targets.py serve (the echo)
    relay    ``wstunnel relay`` (ws://, or wss:// with ``--scheme wss``: a fresh
             self-signed certificate), defaults; ``ping_interval`` from a
             config file when ``--ping-intervals`` names a short one
    active   ``wstunnel agent -L`` to the echo: the agent whose round trip is timed
    idle     benchmarks/_idle_agents.py: the idle sessions, one process, one TCP
             connection and one WebSocket upgrade each, pinging the relay and
             answering its pings at the same interval (its docstring says why);
             the table counts the relay's pongs to them and its own pings
    load     this process: the round trips, blocking socket

Per ping interval and repetition (fresh processes): for each ``--levels``
count of idle sessions (ascending; the idle process grows to it): settle
``--settle`` s; relay VmRSS and open descriptors; relay CPU (user + system,
/proc) over ``--cpu-window`` s (default: one ping interval, at least 5 s);
then ``--round-trips`` 64 B round trips through the active agent.

Per idle session: RSS and CPU above the level with no idle sessions, divided
by the count. CPU per session per minute is CPU-seconds; "% core" is for all
of them together. ``--idle-elsewhere`` is the control for the round trip: the
idle sessions go to a second relay process, so the machine does the same work
but the measured relay does none of it.

Run from the repository root (about 3 minutes with the defaults):

    .venv/bin/python benchmarks/many_agents.py
    .venv/bin/python benchmarks/many_agents.py --ping-intervals 1 --repeat 3
    .venv/bin/python benchmarks/many_agents.py --levels 0,100 --ping-intervals 2 --cpu-window 5
    .venv/bin/python benchmarks/many_agents.py --levels 0,1000 --ping-intervals 20 --scheme wss
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import _load
import _procs
from _children import relay_argv
from _procs import BenchError, exit_on_sigterm
from idle_channels import FD_MARGIN, raise_fd_limit

KIB: Final = 1024
DEFAULT_PING_INTERVAL: Final = 20.0
HOLDER_SCRIPT: Final = Path(__file__).with_name("_idle_agents.py")

#: One level's figures: name -> value.
Figures = dict[str, float]


class Holder:
    """The idle-sessions process, driven by lines on its stdin."""

    def __init__(self, stack: contextlib.ExitStack, port: int, ping_interval: float,
                 log: Path, keepalive: str, tls: bool) -> None:
        sink = stack.enter_context(log.open("ab"))
        self.proc = subprocess.Popen(
            [sys.executable, str(HOLDER_SCRIPT), "--port", str(port),
             "--ping-interval", str(ping_interval), "--keepalive", keepalive,
             *(["--tls"] if tls else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sink, env=_procs.CHILD_ENV)
        stack.callback(_procs._close_then_stop, self.proc)  # noqa: SLF001

    def ask(self, command: str) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()  # (the holder bounds every command's time)
        if not line:
            raise BenchError(f"the idle-sessions process exited ({self.proc.poll()})")
        answer: dict[str, float] = json.loads(line)
        return answer


def _config(tmp: Path, name: str, ping_interval: float) -> list[str]:
    """``-c FILE`` setting ``ping_interval``; nothing for the default."""
    if ping_interval == DEFAULT_PING_INTERVAL:
        return []
    path = tmp / f"{name}.yaml"
    path.write_text(f"ping_interval: {ping_interval:g}\n")
    return ["-c", str(path)]


def _start(stack: contextlib.ExitStack, tmp: Path, args: argparse.Namespace,
           ping_interval: float) -> tuple[_procs.Route, Holder]:
    command = shlex.split(args.wstunnel)
    relay_args = ["--log-level=warning", *_config(tmp, "relay", ping_interval)]
    targets = _procs.start_targets(stack, tmp)
    tls = args.scheme == "wss"
    route = _procs.start_wstunnel(stack, tmp, targets, command, relay_args,
                                  ["--log-level=warning", *_config(tmp, "agent", ping_interval)],
                                  tls=tls)
    relay_port = _relay_port(route)
    if args.idle_elsewhere:  # the control: same load on the machine, not on this relay
        relay_port = _procs.free_port()
        tls_args = _procs.relay_tls(command, tmp, "tls-other")[0] if tls else []
        other = _procs.spawn(stack, [*command, *relay_argv(relay_port, *tls_args, *relay_args)],
                             tmp / "other-relay.log")
        _procs.wait_listening(relay_port, other, "the idle sessions' relay")
    return route, Holder(stack, relay_port, ping_interval, tmp / "idle-agents.log",
                         args.idle_keepalive, tls)


def _relay_port(route: _procs.Route) -> int:
    """The relay's port, from its command line (start_wstunnel picked it)."""
    argv = Path(f"/proc/{route.pids[1]}/cmdline").read_bytes().split(b"\0")
    listen = argv[argv.index(b"--listen") + 1].decode()
    return int(listen.rsplit(":", 1)[1])


def measure_level(route: _procs.Route, holder: Holder, idle: int,
                  args: argparse.Namespace, window: float) -> Figures:
    relay = route.pids[1]
    grown = holder.ask(f"grow {idle}")
    if grown["up"] < idle:
        raise BenchError(f"only {grown['up']:.0f} of {idle} idle sessions came up "
                         f"({grown['failed']:.0f} failed)\n{_procs.log_tail(route)}")
    time.sleep(args.settle)
    figures: Figures = {"idle": idle, "open_s": grown["seconds"],
                        "rss_kib": _procs.vm_rss_kib(relay), "fds": _procs.open_fds(relay)}
    before = holder.ask("stats")
    cpu, start = _procs.cpu_seconds([relay]), time.perf_counter()
    time.sleep(window)
    elapsed = time.perf_counter() - start
    figures["cpu_core"] = (_procs.cpu_seconds([relay]) - cpu) / elapsed
    after = holder.ask("stats")
    figures["pongs_per_s"] = (after["pongs"] - before["pongs"]) / elapsed
    figures["pings_per_s"] = (after["reads"] - before["reads"]) / elapsed - figures["pongs_per_s"]
    if after["ended"]:
        raise BenchError(f"{after['ended']:.0f} idle sessions ended\n{_procs.log_tail(route)}")
    samples = sorted(_load.round_trips(route.ports["echo"], args.round_trips, 30.0))
    figures["p50_ms"] = samples[len(samples) // 2] * 1e3
    figures["p99_ms"] = samples[min(len(samples) - 1, len(samples) * 99 // 100)] * 1e3
    return figures


def run_once(args: argparse.Namespace, ping_interval: float) -> list[Figures]:
    window = args.cpu_window or max(5.0, ping_interval)
    with tempfile.TemporaryDirectory(prefix="wstunnel-agents-") as tmp, \
            contextlib.ExitStack() as stack:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        route, holder = _start(stack, work, args, ping_interval)
        _load.round_trips(route.ports["echo"], 200, 10.0)  # warm up
        levels = [measure_level(route, holder, idle, args, window) for idle in args.levels]
    base = levels[0]
    for level in levels:
        idle = level["idle"] - base["idle"]
        if idle:
            level["kib_per_session"] = (level["rss_kib"] - base["rss_kib"]) / idle
            level["fds_per_session"] = (level["fds"] - base["fds"]) / idle
            level["cpu_s_per_session_min"] = (level["cpu_core"] - base["cpu_core"]) * 60 / idle
        level["p99_ratio"] = level["p99_ms"] / base["p99_ms"]
    return levels


def _cell(values: list[float], digits: int) -> str:
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.{digits}f}"
    return f"{middle:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


COLUMNS: Final = (
    ("rss_kib", "relay RSS MiB", 1, 1 / KIB),
    ("kib_per_session", "KiB/session", 1, 1.0),
    ("fds_per_session", "fds/session", 2, 1.0),
    ("cpu_core", "relay CPU % core", 2, 100.0),
    ("cpu_s_per_session_min", "CPU ms/session/min", 3, 1000.0),
    ("pongs_per_s", "relay pongs/s", 0, 1.0),
    ("pings_per_s", "relay pings/s", 0, 1.0),
    ("p50_ms", "RTT p50 ms", 3, 1.0),
    ("p99_ms", "RTT p99 ms", 3, 1.0),
    ("p99_ratio", "p99 / 0 idle", 2, 1.0),
)


def report(ping_interval: float, runs: list[list[Figures]]) -> str:
    lines = [f"ping_interval {ping_interval:g} s, {len(runs)} run(s): median (min-max)",
             "| idle sessions | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for index, level in enumerate(runs[0]):
        cells = []
        for key, _, digits, scale in COLUMNS:
            values = [run[index][key] * scale for run in runs if key in run[index]]
            cells.append(_cell(values, digits) if values else "-")
        lines.append(f"| {level['idle']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _numbers(text: str, kind: type[int] | type[float]) -> list[float]:
    return [kind(item) for item in text.split(",") if item]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=lambda text: sorted(_numbers(text, int)),
                        default=[0, 100, 1000], help="idle session counts (first: the base)")
    parser.add_argument("--ping-intervals", type=lambda text: _numbers(text, float),
                        default=[DEFAULT_PING_INTERVAL, 1.0],
                        help="relay, agent and idle sessions' ping_interval, one run each")
    parser.add_argument("--idle-keepalive", choices=("idle", "always"), default="idle",
                        help="the idle sessions ping when nothing arrived for an interval "
                             "(as agents do), or every interval (as agents did before issue 22)")
    parser.add_argument("--idle-elsewhere", action="store_true",
                        help="the control: the idle sessions go to a second relay process, "
                             "so the machine carries them but the measured relay does not")
    parser.add_argument("--scheme", choices=("ws", "wss"), default="ws",
                        help="the relay serves ws://, or wss:// (the agents then use TLS)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds after a level's sessions are up, before measuring")
    parser.add_argument("--cpu-window", type=float, default=0.0,
                        help="seconds of relay CPU per level (0: one ping interval, >= 5 s)")
    parser.add_argument("--round-trips", type=int, default=2000)
    _procs.add_run_options(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    # The idle process inherits this; the relay raises its own soft limit to the
    # hard one at start (wstunnel/service/open_files.py).
    limit = raise_fd_limit(max(args.levels) + FD_MARGIN)
    print(f"RLIMIT_NOFILE {limit}; load average {Path('/proc/loadavg').read_text().strip()}",
          file=sys.stderr)
    results: dict[str, list[list[Figures]]] = {}
    try:
        for ping_interval in args.ping_intervals:
            runs = [run_once(args, ping_interval) for _ in range(args.repeat)]
            results[f"{ping_interval:g}"] = runs
            print(report(ping_interval, runs), flush=True)
    except BenchError as exc:
        print(f"many_agents: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; all benchmark processes stopped", file=sys.stderr)
        return 130
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
