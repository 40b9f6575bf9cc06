"""End-to-end tunnel benchmark: wstunnel against direct TCP and ssh -L, same run.

Why same run: absolute figures depend on the machine; the ratio to OpenSSH
measured minutes apart on the same cores does not (much). Each workload runs
over every route in turn, repetition by repetition, so slow drift in the
machine hits all routes alike; the table shows medians.

Processes (Python is single-threaded, so each gets its own interpreter and
the kernel spreads them over the cores):
    targets      benchmarks/_targets.py serve: echo, sink, source
    load         this process (blocking sockets, threads), plus one extra
                 uploader process for the round trips under load
    wstunnel     ``wstunnel relay`` and ``wstunnel agent``, via the CLI, twice:
                 over plain ws:// (as behind a TLS-terminating proxy) and over
                 wss:// (TLS with a pinned self-signed certificate, as ssh
                 encrypts); the issue's targets are for wss://
    ssh          our own sshd on a high loopback port, ``ssh -N -L``
                 (cipher aes128-gcm@openssh.com); skipped without OpenSSH
    floor        with ``--floor`` only: two bare Python forwarders chained per
                 target (trio, or the standard library's selectors), what any
                 Python tunnel of this shape pays (_forwarder.py)
    socat        with ``--socat`` only, bulk workloads only: socat over TLS
                 (OpenSSL, TLS_AES_128_GCM_SHA256), a C program on the TLS
                 path wss:// uses, so its cost is that path's without Python

Run from the repository root:

    .venv/bin/python benchmarks/tunnel.py            # 256 MiB, 3 repetitions
    .venv/bin/python benchmarks/tunnel.py --quick    # smoke run, 32 MiB once, about 5-10 s
    .venv/bin/python benchmarks/tunnel.py --size 64M --repeat 5 --json out.json
    .venv/bin/python benchmarks/tunnel.py --quick --schemes ws --transport streaming,polling

Only 127.0.0.1 is used; every process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import _load
import _procs
from _procs import BenchError, Route, exit_on_sigterm

MIB: Final = 1 << 20
GIB: Final = 1 << 30
PARALLEL_CHANNELS: Final = 16
CHURN_WORKERS: Final = 50


@dataclass(frozen=True)
class Settings:
    """How much work each workload does."""

    size: int
    repeat: int
    rtt_count: int
    rtt_budget: float
    churn_count: int
    churn_per_worker: int
    churn_budget: float


#: One measurement: metric label -> value, plus (unit, amount) of work done
#: for the CPU-cost row (None: no CPU row for this workload).
Outcome = tuple[dict[str, float], "tuple[str, float] | None"]
Workload = Callable[[Route, Settings], Outcome]


def _upload(route: Route, s: Settings) -> Outcome:
    seconds = _load.bulk_upload(route.ports["sink"], s.size)
    return {"bulk upload, 1 channel [MiB/s]": s.size / seconds / MIB}, ("GiB", s.size / GIB)


def _download(route: Route, s: Settings) -> Outcome:
    seconds = _load.bulk_download(route.ports["source"], s.size)
    return {"bulk download, 1 channel [MiB/s]": s.size / seconds / MIB}, ("GiB", s.size / GIB)


def _parallel(route: Route, s: Settings) -> Outcome:
    seconds = _load.parallel_upload(route.ports["sink"], s.size, PARALLEL_CHANNELS)
    label = f"upload, {PARALLEL_CHANNELS} channels, aggregate [MiB/s]"
    return {label: s.size / seconds / MIB}, ("GiB", s.size / GIB)


def _percentiles(samples: list[float], what: str) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {f"64 B round trip {what}, p50 [ms]": pick(0.50),
            f"64 B round trip {what}, p99 [ms]": pick(0.99)}


def _rtt(route: Route, s: Settings) -> Outcome:
    return _percentiles(_load.round_trips(route.ports["echo"], s.rtt_count, s.rtt_budget),
                        "idle"), None


def _rtt_loaded(route: Route, s: Settings) -> Outcome:
    rates: list[float] = []
    with _load.background_upload(route.ports["sink"], rates.append):
        time.sleep(0.2)  # let the bulk flow fill the buffers before timing
        samples = _load.round_trips(route.ports["echo"], s.rtt_count, s.rtt_budget)
    metrics = _percentiles(samples, "under bulk upload")
    metrics["  (that bulk upload meanwhile) [MiB/s]"] = rates[0] / MIB
    return metrics, None


def _churn(route: Route, s: Settings) -> Outcome:
    done = _load.churn(route.ports["echo"], 1, s.churn_count, s.churn_budget)
    return {"churn, sequential [conn/s]": done.rate}, ("1k conn", done.count / 1000)


def _churn_parallel(route: Route, s: Settings) -> Outcome:
    done = _load.churn(route.ports["echo"], CHURN_WORKERS, s.churn_per_worker, s.churn_budget)
    label = f"churn, {CHURN_WORKERS} concurrent [conn/s]"
    return {label: done.rate}, ("1k conn", done.count / 1000)


WORKLOADS: Final[dict[str, Workload]] = {
    "upload": _upload, "download": _download, "parallel": _parallel, "rtt": _rtt,
    "rtt-loaded": _rtt_loaded, "churn": _churn, "churn-parallel": _churn_parallel,
}


class Results:
    """Samples per (row label, route name); failures per (workload, route name)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, list[float]]] = {}
        self.failures: dict[tuple[str, str], str] = {}

    def add(self, label: str, route: str, value: float) -> None:
        self.rows.setdefault(label, {}).setdefault(route, []).append(value)

    def median(self, label: str, route: str) -> float | None:
        values = self.rows.get(label, {}).get(route)
        return statistics.median(values) if values else None


def _measure(name: str, workload: Workload, route: Route, s: Settings,
             results: Results) -> None:
    """One run; CPU is sampled for the client side and the whole route."""
    clients = route.pids[:route.clients]
    client_before, all_before = _procs.cpu_seconds(clients), _procs.cpu_seconds(route.pids)
    metrics, work = workload(route, s)
    client = _procs.cpu_seconds(clients) - client_before
    cpu = _procs.cpu_seconds(route.pids) - all_before
    for label, value in metrics.items():
        results.add(label, route.name, value)
    if work is not None and route.name != "direct":
        unit, amount = work
        results.add(f"CPU of tunnel processes, {name} [s per {unit}]", route.name, cpu / amount)
        label = f"  of which agent / ssh client, {name} [s per {unit}]"
        results.add(label, route.name, client / amount)


def run_all(routes: list[Route], names: list[str], s: Settings) -> Results:
    """Every workload over every route, ``s.repeat`` times, interleaved."""
    results = Results()
    for name in names:
        for rep in range(s.repeat):
            for route in routes:
                if (name, route.name) in results.failures or (
                        route.workloads is not None and name not in route.workloads):
                    continue
                print(f"  {name:<15} rep {rep + 1}/{s.repeat}  {route.name}", file=sys.stderr,
                      flush=True)
                try:
                    _measure(name, WORKLOADS[name], route, s, results)
                except (BenchError, OSError) as exc:
                    results.failures[(name, route.name)] = repr(exc)
                    print(f"    FAILED: {exc!r}\n{_procs.log_tail(route)}", file=sys.stderr)
    return results


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def table(results: Results, routes: list[Route]) -> str:
    """The pipe table: workload | each route | each wstunnel (and socat) route / ssh."""
    names = [route.name for route in routes]
    ours = [name for name in names if name.startswith(("wstunnel", "socat", "floor"))]
    header = ["workload", *names, *(f"{_short(name)}/ssh" for name in ours)]
    lines = [header, ["---"] * len(header)]
    for label in results.rows:
        cells = [_fmt(results.median(label, name)) for name in names]
        ssh = results.median(label, "ssh -L")
        ratios = []
        for name in ours:
            value = results.median(label, name)
            ratios.append(f"{value / ssh:.2f}x" if value is not None and ssh else "-")
        lines.append([label, *cells, *ratios])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |"
           for line in lines]
    for (name, route), error in results.failures.items():
        out.append(f"FAILED: {name} over {route}: {error}")
    return "\n".join(out)


def _short(route_name: str) -> str:
    """ "wstunnel wss://" -> "wss", "wstunnel ws:// polling" -> "ws polling", "socat TLS"
    -> "socat", "floor trio" -> "floor trio" (ratio column names)."""
    first, _, rest = route_name.partition(" ")
    if first == "floor":
        return route_name
    return rest.replace("://", "").strip() if first == "wstunnel" else first


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False)
    return {"nproc": str(os.cpu_count()), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "openssh": ssh.stderr.strip() or "not installed",
            "loadavg": Path("/proc/loadavg").read_text().strip()}


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": MIB, "G": GIB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_size, default=None,
                        help="bulk transfer size, e.g. 256M (default 256 MiB; 32 MiB with --quick)")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 32 MiB, 1 repetition, fewer samples (5-10 s)")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help=f"comma-separated workloads from: {', '.join(WORKLOADS)}")
    parser.add_argument("--churn-count", type=int, default=None, metavar="N",
                        help="connections per sequential churn sample (default 500; 100 with "
                        "--quick); thousands steady the noisiest row, e.g. --only churn "
                        "--churn-count 4000 --repeat 6")
    parser.add_argument("--no-ssh", action="store_true", help="skip the ssh -L baseline")
    parser.add_argument("--no-wstunnel", action="store_true", help="baselines only")
    parser.add_argument("--floor", default="", metavar="MODES",
                        help="also measure two bare Python forwarders chained (plain TCP, no "
                        "framing): trio, selectors or trio,selectors; the floor under "
                        "wstunnel's per-wake-up and per-connection rows (_forwarder.py)")
    parser.add_argument("--socat", action="store_true",
                        help="also measure socat over TLS on upload, download and parallel: "
                        "what OpenSSL's TLS path costs in a C program (installs socat if missing)")
    parser.add_argument("--schemes", default="ws,wss",
                        help="wstunnel routes to measure: ws (plain), wss (TLS) or both "
                        "(default ws,wss)")
    parser.add_argument("--transport", default="",
                        help="also measure the HTTP transports over ws:// (plain): streaming, "
                        "polling or streaming,polling (each its own relay and agent, beside "
                        "the WebSocket routes)")
    parser.add_argument("--wstunnel", default=f"{shlex.quote(sys.executable)} -m wstunnel",
                        help="command running the wstunnel CLI (default: this python -m wstunnel)")
    parser.add_argument("--tunnel-arg", action="append", default=None,
                        help="argument for both `wstunnel relay` and `wstunnel agent`, "
                        "repeatable (default: --log-level=warning, like ssh's LogLevel ERROR)")
    parser.add_argument("--agent-arg", action="append", default=[],
                        help="extra argument for `wstunnel agent` only, e.g. --agent-arg=-c=a.yaml")
    parser.add_argument("--relay-arg", action="append", default=[],
                        help="extra argument for `wstunnel relay` only")
    parser.add_argument("--json", type=Path, help="also write all samples here")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep process logs (and the throwaway ssh keys) in DIR")
    args = parser.parse_args(argv)
    if not set(filter(None, args.transport.split(","))) <= {"streaming", "polling"}:
        parser.error(f"--transport takes streaming, polling or both, not {args.transport!r}")
    if not set(args.schemes.split(",")) <= {"ws", "wss"}:
        parser.error(f"--schemes takes ws, wss or ws,wss, not {args.schemes!r}")
    if args.churn_count is not None and args.churn_count < 1:
        parser.error("--churn-count must be at least 1")
    unknown = set(args.only.split(",")) - WORKLOADS.keys()
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    return args


def settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        chosen = Settings(args.size or 32 * MIB, args.repeat or 1, 300, 3.0, 100, 4, 3.0)
    else:
        chosen = Settings(args.size or 256 * MIB, args.repeat or 3, 2000, 5.0, 500, 20, 5.0)
    if args.churn_count is not None:
        # Time enough at 250 connections a second, a fifth of wstunnel's rate here.
        chosen = replace(chosen, churn_count=args.churn_count,
                         churn_budget=max(chosen.churn_budget, args.churn_count / 250))
    return chosen


def start_routes(stack: contextlib.ExitStack, tmp: Path, args: argparse.Namespace) -> list[Route]:
    """Targets first, then ssh and wstunnel; a route that cannot start is left out."""
    direct = _procs.start_targets(stack, tmp)
    routes = [direct]
    skip = "--no-ssh given" if args.no_ssh else _procs.ensure_sshd()
    if skip is None:
        routes.append(_procs.start_ssh(stack, tmp, direct))
    else:
        print(f"ssh -L baseline skipped: {skip}", file=sys.stderr)
    command = shlex.split(args.wstunnel)
    if not args.no_wstunnel:
        extra = args.tunnel_arg if args.tunnel_arg is not None else ["--log-level=warning"]
        for scheme in args.schemes.split(","):
            routes.append(_procs.start_wstunnel(
                stack, tmp, direct, command, [*extra, *args.relay_arg],
                [*extra, *args.agent_arg], tls=scheme == "wss"))
        for transport in filter(None, args.transport.split(",")):
            routes.append(_procs.start_wstunnel(
                stack, tmp, direct, command, [*extra, *args.relay_arg],
                [*extra, *args.agent_arg], transport=transport))
    for mode in filter(None, args.floor.split(",")):
        routes.append(_procs.start_forwarders(stack, tmp, direct, mode))
    if args.socat:
        skip = _procs.ensure_socat()
        if skip is None:
            routes.append(_procs.start_socat(stack, tmp, direct, command))
        else:
            print(f"socat reference skipped: {skip}", file=sys.stderr)
    return routes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted; all benchmark processes stopped", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    s = settings(args)
    info = machine()
    print(f"machine: {info}\nsettings: {s}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="wstunnel-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        work = Path(tmp)
        if args.keep:
            work = args.keep
            work.mkdir(parents=True, exist_ok=True)
        routes = start_routes(stack, work, args)
        results = run_all(routes, args.only.split(","), s)
    info["loadavg_after"] = Path("/proc/loadavg").read_text().strip()
    print(f"load average before: {info['loadavg']}, after: {info['loadavg_after']}",
          file=sys.stderr)
    print(table(results, routes))
    print("ratio = wstunnel (ws:// or wss://), socat or a floor forwarder pair, / ssh -L. "
          "MiB/s and conn/s: higher is better; ms and CPU: lower. "
          f"Medians of {s.repeat} run(s); bulk size {s.size / MIB:g} MiB.")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "settings": vars(s),
                                         "rows": results.rows,
                                         "failures": [list(k) + [v] for k, v in
                                                      results.failures.items()]}, indent=1))
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
