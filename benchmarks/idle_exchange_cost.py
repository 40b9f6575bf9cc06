"""Machine instructions the relay spends per idle ping exchange (valgrind's callgrind).

Why instructions: what 1,000 idle agents cost a relay is a few per cent of a
core (``many_agents.py``), and its CPU figure moves by a tenth from one run to
the next on this VM; a change to the idle path shows better as instructions,
which a run counts the same way each time. They are not time: an idle relay
runs each exchange with cold caches, so a cut in instructions buys less CPU
(docs/PERFORMANCE.md, "One relay, many agents", fourth round).

The relay runs under ``valgrind --tool=callgrind --instr-atstart=no``;
``benchmarks/_idle_agents.py`` opens ``--sessions`` idle sessions at
``--ping-interval`` (the relay gets the same interval); after ``--settle`` s,
counting is switched on for ``--window`` s (``callgrind_control``). An
exchange is one message from the relay the idle process read: the relay's
pong to one of its pings, or the relay's own ping. Every process is stopped
on the way out. Needs valgrind (``apt-get install -y valgrind``).

    .venv/bin/python benchmarks/idle_exchange_cost.py
    .venv/bin/python benchmarks/idle_exchange_cost.py --repeat 2 \
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
from collections.abc import Sequence
from pathlib import Path

import _procs
from _children import relay_argv
from _procs import BenchError, exit_on_sigterm
from many_agents import Holder

_TOTAL = re.compile(r"^([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", re.M)


def _instructions(dumps: list[Path]) -> int:
    """Instructions counted in callgrind's dump files (one per dump request; the one
    written at exit holds nothing, and callgrind_annotate refuses it)."""
    total = 0
    for dump in dumps:
        out = subprocess.run(["callgrind_annotate", str(dump)], capture_output=True,
                             text=True, check=False).stdout
        match = _TOTAL.search(out)
        total += int(match.group(1).replace(",", "")) if match else 0
    return total


def _split_env(command: list[str]) -> tuple[list[str], list[str]]:
    """``env VAR=VALUE ... PROGRAM ARGS`` -> (``env VAR=VALUE ...``, ``PROGRAM ARGS``):
    valgrind goes in between, since it does not follow ``env``'s exec."""
    if not command or Path(command[0]).name != "env":
        return [], command
    split = 1
    while split < len(command) and ("=" in command[split] or command[split].startswith("-")):
        split += 1
    return command[:split], command[split:]


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, check=True)


def measure(args: argparse.Namespace, work: Path) -> dict[str, float]:
    port = _procs.free_port()
    config = work / "relay.yaml"
    config.write_text(f"ping_interval: {args.ping_interval:g}\n")
    env, command = _split_env(shlex.split(args.wstunnel))
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={work}/callgrind.out"]
    with contextlib.ExitStack() as stack:
        relay = _procs.spawn(stack, [*env, *valgrind, *command, *relay_argv(
            port, "--log-level=warning", "-c", str(config))], work / "relay.log")
        _procs.wait_listening(port, relay, "the relay under valgrind")
        holder = Holder(stack, port, args.ping_interval, work / "idle-agents.log", "idle",
                        tls=False)
        grown = holder.ask(f"grow {args.sessions}")
        if grown["up"] < args.sessions:
            raise BenchError(f"only {grown['up']:.0f} of {args.sessions} sessions came up")
        time.sleep(args.settle)
        before = holder.ask("stats")
        _control("-i", "on", str(relay.pid))
        time.sleep(args.window)
        _control("-i", "off", str(relay.pid))
        after = holder.ask("stats")
        _control("-d", str(relay.pid))
    exchanges = after["reads"] - before["reads"]
    pongs = after["pongs"] - before["pongs"]
    instructions = _instructions(sorted(work.glob("callgrind.out*")))
    return {"exchanges": exchanges, "relay_pongs": pongs, "relay_pings": exchanges - pongs,
            "instructions": instructions,
            "per_exchange": instructions / exchanges if exchanges else float("nan")}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--ping-interval", type=float, default=2.0,
                        help="seconds, relay and idle sessions (short: the relay is slow "
                             "under valgrind, and each exchange counts the same)")
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--window", type=float, default=30.0, help="seconds counted")
    parser.add_argument("--repeat", type=int, default=1)
    _procs.add_run_options(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    if shutil.which("callgrind_control") is None:
        print("valgrind is not installed: apt-get install -y valgrind", file=sys.stderr)
        return 2
    runs: list[dict[str, float]] = []
    try:
        for run in range(1, args.repeat + 1):
            with tempfile.TemporaryDirectory(prefix="wstunnel-idle-cost-") as tmp:
                work = args.keep / f"run{run}" if args.keep else Path(tmp)
                work.mkdir(parents=True, exist_ok=True)
                figures = measure(args, work)
            runs.append(figures)
            print(f"run {run}: {figures['exchanges']:.0f} exchanges in {args.window:g} s "
                  f"({figures['relay_pongs']:.0f} relay pongs, "
                  f"{figures['relay_pings']:.0f} relay pings), "
                  f"{figures['instructions'] / 1e6:.1f} M instructions, "
                  f"{figures['per_exchange'] / 1e3:.1f} k per exchange", flush=True)
    except BenchError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
