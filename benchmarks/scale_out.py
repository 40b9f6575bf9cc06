"""Several relay processes behind haproxy: aggregate throughput and churn, 1 against 2.

Issue 22 ("Scale"): the relay is one process on one core; the way past that
is N relays behind an existing balancer (README, "Running several relays").
This measures, in one run, the same agents and load through:

    direct     one relay, agents straight to it (the reference: no balancer)
    haproxy/1  one relay behind haproxy (configs/haproxy-relay.cfg, plain ws://)
    haproxy/2  two relays behind the same haproxy (leastconn: half the agents each)

Processes (127.0.0.1, fresh for every route and repetition, all stopped on
the way out): targets (_targets.py: echo, sink), the relays, haproxy,
``--agents`` agent processes (each one session: ``-L`` to the echo and the
sink), and this process as the load (blocking sockets, threads).

Workloads, per route:
    upload   ``--size`` bytes to the sink over ``--agents`` x ``--streams``
             connections at once, spread over the agents; aggregate MiB/s
    churn    ``--workers`` threads, each connect, echo 100 B, close, spread over
             the agents, for ``--churn-seconds``; connections per second
CPU (user + system from /proc) of the relays, the agents and haproxy during
each workload, per GiB or per 1000 connections; "relay busy" is the relays'
CPU over the wall time (1.00 = one core).

haproxy sees only the agents' long-lived connections: channels are
multiplexed inside them, so churn never reaches it; it costs per byte only.

On a 2-core machine the relays are not the bottleneck (agents, haproxy, the
load and the targets share the cores): the "relays' CPU / wall" rows say how
busy they were, and the per-GiB and per-1000 rows are what extrapolates.
``--relay-wstunnel`` runs the relays from another checkout, e.g. a copy
without the C masking module, whose relays unmask uploads in pure Python and
cost about three times as much per GiB (docs/PERFORMANCE.md has both runs).

Run from the repository root (about 1-2 minutes):

    .venv/bin/python benchmarks/scale_out.py
    .venv/bin/python benchmarks/scale_out.py --repeat 3 --size 256M --agents 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import _load
import _procs
from _children import agent_argv, relay_argv
from _procs import BenchError, exit_on_sigterm

MIB: Final = 1 << 20
GIB: Final = 1 << 30
HAPROXY_CONFIG: Final = Path(__file__).resolve().parents[1] / "configs" / "haproxy-relay.cfg"
ROUTES: Final = ("direct", "haproxy/1", "haproxy/2")


@dataclass
class Setup:
    """One route's processes: the agents' forwards and who costs what."""

    echo_ports: list[int]
    sink_ports: list[int]
    groups: dict[str, list[int]] = field(default_factory=dict)  # relays, agents, haproxy
    logs: list[Path] = field(default_factory=list)


def haproxy_config(front: int, relays: Sequence[int]) -> str:
    """configs/haproxy-relay.cfg as shipped, but plain HTTP on ``front`` (TLS is not
    what is measured) and one server line per relay."""
    text = HAPROXY_CONFIG.read_text()
    replacements = {
        "bind :443 ssl crt /etc/haproxy/relay.example.com.pem": f"bind 127.0.0.1:{front}",
        "    server relay1 127.0.0.1:8081 check\n": "".join(
            f"    server relay{n} 127.0.0.1:{port} check\n" for n, port in enumerate(relays, 1)),
        "    server relay2 127.0.0.1:8082 check\n": "",
        "peer haproxy1 127.0.0.1:10000": f"peer haproxy1 127.0.0.1:{_procs.free_port()}",
    }
    for old, new in replacements.items():
        if text.count(old) != 1:
            raise BenchError(f"{HAPROXY_CONFIG} no longer has {old.strip()!r} exactly once")
        text = text.replace(old, new)
    return text


def _start_relays(stack: contextlib.ExitStack, tmp: Path, command: list[str], count: int,
                  setup: Setup) -> list[int]:
    ports = []
    for index in range(count):
        port, log = _procs.free_port(), tmp / f"relay{index + 1}.log"
        relay = _procs.spawn(stack, [*command, *relay_argv(port, "--log-level=warning")], log)
        _procs.wait_listening(port, relay, f"relay {index + 1}")
        ports.append(port)
        setup.groups.setdefault("relays", []).append(relay.pid)
        setup.logs.append(log)
    return ports


def _start_haproxy(stack: contextlib.ExitStack, tmp: Path, relays: list[int],
                   setup: Setup) -> int:
    binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if binary is None:
        raise BenchError("haproxy is not installed (apt-get install haproxy)")
    front, conf, log = _procs.free_port(), tmp / "haproxy.cfg", tmp / "haproxy.log"
    conf.write_text(haproxy_config(front, relays))
    proc = _procs.spawn(stack, [binary, "-f", str(conf), "-db"], log, group=True)
    _procs.wait_listening(front, proc, "haproxy")
    setup.groups["haproxy"] = [proc.pid]
    setup.logs.append(log)
    return front


def start_route(stack: contextlib.ExitStack, tmp: Path, route: str,
                args: argparse.Namespace, targets: _procs.Route) -> Setup:
    command = shlex.split(args.wstunnel)
    relay_command = shlex.split(args.relay_wstunnel) if args.relay_wstunnel else command
    setup = Setup([], [])
    relays = _start_relays(stack, tmp, relay_command, 2 if route == "haproxy/2" else 1, setup)
    front = relays[0] if route == "direct" else _start_haproxy(stack, tmp, relays, setup)
    for index in range(args.agents):
        echo, sink, log = _procs.free_port(), _procs.free_port(), tmp / f"agent{index + 1}.log"
        forwards = [(echo, targets.ports["echo"]), (sink, targets.ports["sink"])]
        agent = _procs.spawn(stack, [*command, *agent_argv(front, forwards,
                                                           "--log-level=warning")], log)
        setup.groups.setdefault("agents", []).append(agent.pid)
        setup.echo_ports.append(echo)
        setup.sink_ports.append(sink)
        setup.logs.append(log)
    for port in setup.echo_ports:
        _procs.echo_check(port)
    return setup


def _cpu(setup: Setup) -> dict[str, float]:
    return {group: _procs.cpu_seconds(pids) for group, pids in setup.groups.items()}


def measured(setup: Setup, work: Callable[[], tuple[float, float]]
             ) -> tuple[float, float, dict[str, float]]:
    """(amount, seconds, CPU-seconds per process group) of one workload."""
    before = _cpu(setup)
    amount, seconds = work()
    after = _cpu(setup)
    return amount, seconds, {group: after[group] - before[group] for group in after}


def upload(setup: Setup, args: argparse.Namespace) -> tuple[float, float]:
    ports = [port for port in setup.sink_ports for _ in range(args.streams)]
    share = args.size // len(ports)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(ports)) as pool:
        for future in [pool.submit(_load._upload_one, port, share)  # noqa: SLF001
                       for port in ports]:
            future.result()
    return share * len(ports), time.perf_counter() - start


def churn(setup: Setup, args: argparse.Namespace) -> tuple[float, float]:
    deadline = time.perf_counter() + args.churn_seconds
    ports = setup.echo_ports
    start = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(_load._churn_worker, ports[n % len(ports)],  # noqa: SLF001
                               1_000_000, deadline) for n in range(args.workers)]
        done = sum(future.result() for future in futures)
    return done, time.perf_counter() - start


def run_route(route: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="wstunnel-scale-") as tmp, \
            contextlib.ExitStack() as stack:
        work = (args.keep / route.replace("/", "-")) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        targets = _procs.start_targets(stack, work)
        setup = start_route(stack, work, route, args, targets)
        figures: dict[str, float] = {}
        size, seconds, cpu = measured(setup, lambda: upload(setup, args))
        figures["upload_mib_s"] = size / MIB / seconds
        for group, used in cpu.items():
            figures[f"upload_{group}_s_per_gib"] = used * GIB / size
        figures["upload_relay_busy"] = cpu["relays"] / seconds
        count, seconds, cpu = measured(setup, lambda: churn(setup, args))
        figures["churn_per_s"] = count / seconds
        for group, used in cpu.items():
            figures[f"churn_{group}_s_per_1000"] = used * 1000 / count
        figures["churn_relay_busy"] = cpu["relays"] / seconds
    return figures


ROWS: Final = (
    ("upload_mib_s", "upload, aggregate MiB/s", 0),
    ("upload_relay_busy", "  relays' CPU / wall (cores)", 2),
    ("upload_relays_s_per_gib", "  relays CPU-s per GiB", 2),
    ("upload_agents_s_per_gib", "  agents CPU-s per GiB", 2),
    ("upload_haproxy_s_per_gib", "  haproxy CPU-s per GiB", 2),
    ("churn_per_s", "churn, connections/s", 0),
    ("churn_relay_busy", "  relays' CPU / wall (cores)", 2),
    ("churn_relays_s_per_1000", "  relays CPU-s per 1000", 2),
    ("churn_agents_s_per_1000", "  agents CPU-s per 1000", 2),
)


def report(results: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for key, title, digits in ROWS:
        cells = []
        for runs in results.values():
            values = [run[key] for run in runs if key in run]
            if not values:
                cells.append("-")
                continue
            cell = f"{statistics.median(values):.{digits}f}"
            if len(values) > 1:
                cell += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
            cells.append(cell)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    base = results.get("haproxy/1")
    two = results.get("haproxy/2")
    if base and two:
        for key in ("upload_mib_s", "churn_per_s"):
            ratios = [b[key] / a[key] for a, b in zip(base, two, strict=True)]
            lines.append(f"haproxy/2 over haproxy/1, {key}: {_ratio_text(ratios)}")
    return "\n".join(lines)


def _ratio_text(ratios: list[float]) -> str:
    text = f"{statistics.median(ratios):.2f}x"
    return text + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": MIB, "G": GIB}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", default=",".join(ROUTES),
                        type=lambda text: [r for r in text.split(",") if r in ROUTES])
    parser.add_argument("--agents", type=int, default=4, help="agent processes (sessions)")
    parser.add_argument("--streams", type=int, default=2, help="upload connections per agent")
    parser.add_argument("--size", type=_size, default=256 * MIB, help="bytes uploaded in all")
    parser.add_argument("--workers", type=int, default=50, help="churn threads")
    parser.add_argument("--churn-seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="repetitions; routes run in turn within each")
    _procs.add_run_options(parser)
    parser.add_argument("--relay-wstunnel", metavar="CMD",
                        help="command running the relays only (e.g. a checkout without the "
                             "C masking module: a relay that is the bottleneck)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    print(f"load average {Path('/proc/loadavg').read_text().strip()}", file=sys.stderr)
    results: dict[str, list[dict[str, float]]] = {route: [] for route in args.routes}
    try:
        for _ in range(args.repeat):
            for route in args.routes:
                results[route].append(run_route(route, args))
    except BenchError as exc:
        print(f"scale_out: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; all benchmark processes stopped", file=sys.stderr)
        return 130
    print(report(results))
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
