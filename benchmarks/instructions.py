"""Machine instructions per operation in wstunnel's processes (valgrind's callgrind).

Why instructions: on this VM the CPU time of a few hundred microseconds of
work moves by a tenth from one run to the next, and the idle relay's figure
(``many_agents.py``) by as much; a change to a hot path shows better as
instructions, which a run counts the same way each time. They are not time:
a process that wakes with cold caches (an idle relay) or whose time is mostly
the kernel's gains less than the instructions say (docs/PERFORMANCE.md,
"One relay, many agents", fourth round).

Each wstunnel process runs under ``valgrind --tool=callgrind
--instr-atstart=no``; counting is switched on (``callgrind_control``) only
around the measured loop, and the sum over the processes is divided by the
operations done. Workloads (``--only``, default all):

    idle   the relay alone, per ping exchange with ``--sessions`` idle sessions
           (benchmarks/_idle_agents.py) at ``--ping-interval``, for ``--window`` s;
           an exchange is one message from the relay the idle process read (its
           pong to one of their pings, or its own ping)
    rtt    agent + relay, per 64 B round trip (``--count``) through ``-L`` to
           the echo target
    churn  agent + relay, per connection (connect, 100 B echoed, close;
           ``--count`` / 2.5 of them), one at a time

Every process is stopped on the way out. Needs valgrind (``apt-get install -y
valgrind``). About 1 min for all three:

    .venv/bin/python benchmarks/instructions.py
    .venv/bin/python benchmarks/instructions.py --only rtt,churn \\
        --wstunnel "env PYTHONPATH=/tmp/A .venv/bin/python -P -m wstunnel"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import _load
import _procs
from _children import relay_argv
from _procs import BenchError, exit_on_sigterm
from many_agents import Holder

_TOTAL: Final = re.compile(r"^([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", re.M)
WORKLOADS: Final = ("idle", "rtt", "churn")

#: One workload's figures: name -> value.
Figures = dict[str, float]


def _split_env(command: list[str]) -> tuple[list[str], list[str]]:
    """``env VAR=VALUE ... PROGRAM ARGS`` -> (``env VAR=VALUE ...``, ``PROGRAM ARGS``):
    valgrind goes in between, since it does not follow ``env``'s exec."""
    if not command or Path(command[0]).name != "env":
        return [], command
    split = 1
    while split < len(command) and ("=" in command[split] or command[split].startswith("-")):
        split += 1
    return command[:split], command[split:]


def _under_callgrind(wstunnel: str, work: Path) -> list[str]:
    """The wstunnel command with valgrind in front of the program (one dump file
    per process and dump: ``callgrind.PID[.N]``), counting off until switched on."""
    env, program = _split_env(shlex.split(wstunnel))
    return [*env, "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={work}/callgrind.%p", *program]


def _instructions(dumps: list[Path]) -> int:
    """Instructions counted in callgrind's dump files (the ones written at exit hold
    nothing, and callgrind_annotate refuses them)."""
    total = 0
    for dump in dumps:
        out = subprocess.run(["callgrind_annotate", str(dump)], capture_output=True,
                             text=True, check=False).stdout
        match = _TOTAL.search(out)
        total += int(match.group(1).replace(",", "")) if match else 0
    return total


def _counted(pids: Sequence[int], work: Path, run: Callable[[], float]) -> tuple[int, float]:
    """Instructions of ``pids`` while ``run`` runs, and what ``run`` returned."""
    for pid in pids:
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], capture_output=True,
                       check=True)
    try:
        done = run()
    finally:
        for pid in pids:
            subprocess.run(["callgrind_control", "-i", "off", str(pid)], capture_output=True,
                           check=False)
    for pid in pids:
        subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True)
    return _instructions(sorted(work.glob("callgrind.*"))), done


def measure_idle(args: argparse.Namespace, work: Path) -> Figures:
    port = _procs.free_port()
    config = work / "relay.yaml"
    config.write_text(f"ping_interval: {args.ping_interval:g}\n")
    with contextlib.ExitStack() as stack:
        relay = _procs.spawn(stack, [*_under_callgrind(args.wstunnel, work), *relay_argv(
            port, "--log-level=warning", "-c", str(config))], work / "relay.log")
        _procs.wait_listening(port, relay, "the relay under valgrind")
        holder = Holder(stack, port, args.ping_interval, work / "idle-agents.log", "idle",
                        tls=False)
        grown = holder.ask(f"grow {args.sessions}")
        if grown["up"] < args.sessions:
            raise BenchError(f"only {grown['up']:.0f} of {args.sessions} sessions came up")
        time.sleep(args.settle)
        before = holder.ask("stats")

        def wait() -> float:
            time.sleep(args.window)
            return holder.ask("stats")["reads"] - before["reads"]

        instructions, exchanges = _counted([relay.pid], work, wait)
    return {"operations": exchanges, "instructions": instructions}


def measure_path(args: argparse.Namespace, work: Path, workload: str) -> Figures:
    with contextlib.ExitStack() as stack:
        targets = _procs.start_targets(stack, work)
        route = _procs.start_wstunnel(stack, work, targets,
                                      _under_callgrind(args.wstunnel, work),
                                      ["--log-level=warning"], ["--log-level=warning"])
        port = route.ports["echo"]
        _load.round_trips(port, 100, 60.0)  # (warm: imports, first channels)
        _load.churn(port, 1, 20, 60.0)
        if workload == "rtt":
            def run() -> float:
                return len(_load.round_trips(port, args.count, 600.0))
        else:
            def run() -> float:
                return _load.churn(port, 1, max(1, int(args.count / 2.5)), 600.0).count
        instructions, done = _counted(route.pids, work, run)
    return {"operations": done, "instructions": instructions}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=lambda text: [w for w in text.split(",") if w],
                        default=list(WORKLOADS), help="workloads: " + ",".join(WORKLOADS))
    parser.add_argument("--sessions", type=int, default=50, help="idle: sessions")
    parser.add_argument("--ping-interval", type=float, default=2.0,
                        help="idle: seconds, relay and sessions (short: under valgrind the "
                             "relay is slow, and each exchange counts the same)")
    parser.add_argument("--settle", type=float, default=5.0, help="idle: seconds before")
    parser.add_argument("--window", type=float, default=30.0, help="idle: seconds counted")
    parser.add_argument("--count", type=int, default=500, help="rtt: round trips")
    parser.add_argument("--repeat", type=int, default=1)
    _procs.add_run_options(parser)
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(WORKLOADS)}")
    return args


def _one(args: argparse.Namespace, workload: str, run: int) -> Figures:
    with tempfile.TemporaryDirectory(prefix="wstunnel-instructions-") as tmp:
        work = args.keep / f"{workload}{run}" if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if workload == "idle":
            return measure_idle(args, work)
        return measure_path(args, work, workload)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    if shutil.which("callgrind_control") is None:
        print("valgrind is not installed: apt-get install -y valgrind", file=sys.stderr)
        return 2
    results: list[dict[str, float | str]] = []
    what = {"idle": "idle ping exchange (relay)", "rtt": "64 B round trip (agent + relay)",
            "churn": "connection (agent + relay)"}
    try:
        for run in range(1, args.repeat + 1):
            for workload in args.only:
                figures = _one(args, workload, run)
                done = figures["operations"]
                per = figures["instructions"] / done if done else 0.0
                results.append({"workload": workload, "run": run, **figures, "per_operation": per})
                print(f"{workload:5} run {run}: {figures['operations']:.0f} operations, "
                      f"{figures['instructions'] / 1e6:.1f} M instructions, "
                      f"{per / 1e3:.1f} k per {what[workload]}", flush=True)
    except BenchError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
