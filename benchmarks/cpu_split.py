"""Where the CPU of a bulk transfer goes, per process and per shared object, in s per GiB.

Runs one route at a time (wstunnel wss://, ssh -L, wstunnel ws://), moves
``--seconds`` of bulk data through it (download from the source target, or
upload to the sink) while ``perf record``
samples every process of the route, and splits each process's CPU per GiB
(from /proc, as tunnel.py counts it) by the share of samples in each shared
object: the kernel, libcrypto (AES-GCM), libssl, libc (copies), libpython (the
interpreter) and the program itself (ssh, sshd).

    .venv/bin/python benchmarks/cpu_split.py                    # download, about 40 s
    .venv/bin/python benchmarks/cpu_split.py --direction upload --seconds 6

socat is not among the routes: it forks a process per connection, which exits
with its CPU time before it can be counted per process.

Needs ``perf`` (linux-perf) and permission to profile other processes (root,
or kernel.perf_event_paranoid <= 1). Only 127.0.0.1 is used; every process is
stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import _load
import _procs
from _procs import BenchError, Route, exit_on_sigterm

GIB: Final = 1 << 30
#: The columns, in order; anything else is "other".
OBJECTS: Final = ("kernel", "libcrypto", "libssl", "libc", "python", "program", "other")
_SAMPLE_LINE = re.compile(r"^\s*([\d.]+)%\s+(\d+):\S+\s+(\S+)")


def classify(dso: str) -> str:
    """A perf shared-object name as one of OBJECTS."""
    name = Path(dso.strip("[]")).name
    if dso.startswith("[kernel") or name in ("vdso", "kernel.kallsyms"):
        return "kernel"
    for prefix, column in (("libcrypto", "libcrypto"), ("libssl", "libssl"), ("libc.so", "libc"),
                           ("libc-", "libc"), ("libpython", "python"), ("python", "python")):
        if name.startswith(prefix):
            return column
    if name in ("ssh", "sshd", "sshd-session"):
        return "program"
    if name.endswith(".so") and "cpython" in name:  # _ssl, _socket, select, _speedups
        return "python"
    return "other"


def descendants(roots: list[int]) -> list[int]:
    """``roots`` and every live process below them (sshd's per-connection children)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = set(roots) & parents.keys()
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sorted(tree)


def _work(route: Route, direction: str) -> Callable[[int], float]:
    if direction == "download":
        return lambda size: _load.bulk_download(route.ports["source"], size)
    return lambda size: _load.bulk_upload(route.ports["sink"], size)


def measure(route: Route, direction: str, seconds: float, tmp: Path) -> dict[int, dict[str, float]]:
    """s per GiB by process and column; the process's own total under "total"."""
    work = _work(route, direction)
    work(256 << 20)  # warm: windows grown, caches filled
    pids = descendants(route.pids)
    data = tmp / f"{route.name.replace(' ', '_').replace('/', '')}.perf"
    perf = subprocess.Popen(["perf", "record", "-q", "-F", "1999", "-o", str(data), "-p",
                             ",".join(map(str, pids))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        before = {pid: _procs.cpu_seconds([pid]) for pid in pids}
        moved, deadline = 0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            work(GIB // 2)
            moved += GIB // 2
        spent = {pid: _procs.cpu_seconds([pid]) - before[pid] for pid in pids}
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(30)
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio",
                             "--sort", "pid,dso", "-g", "none"], capture_output=True, text=True,
                            check=False, timeout=120).stdout
    shares: dict[int, dict[str, float]] = {}
    for line in report.splitlines():
        match = _SAMPLE_LINE.match(line)
        if match:
            share, pid, dso = float(match[1]), int(match[2]), match[3]
            column = shares.setdefault(pid, {}).setdefault(classify(dso), 0.0)
            shares[pid][classify(dso)] = column + share
    gib = moved / GIB
    split: dict[int, dict[str, float]] = {}
    for pid, cpu in spent.items():
        if cpu <= 0 or pid not in shares:
            continue
        total_share = sum(shares[pid].values())
        per_gib = cpu / gib
        split[pid] = {column: per_gib * share / total_share
                      for column, share in shares[pid].items()}
        split[pid]["total"] = per_gib
    return split


def _name(pid: int) -> str:
    """``python relay``, ``ssh``, ``sshd: root@notty``...: what the process is."""
    with contextlib.suppress(OSError):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        role = next((word for word in ("relay", "agent") if word in argv), "")
        return f"{argv[0].rsplit('/', 1)[-1]} {role}".strip()
    return str(pid)


def table(results: list[tuple[str, dict[int, dict[str, float]], dict[int, str]]]) -> str:
    header = ["route", "process", *OBJECTS, "total"]
    lines = [header, ["---"] * len(header)]
    for route, split, names in results:
        sums = dict.fromkeys([*OBJECTS, "total"], 0.0)
        for pid, columns in sorted(split.items(), key=lambda item: -item[1]["total"]):
            lines.append([route, names.get(pid, str(pid)),
                          *(f"{columns.get(c, 0.0):.2f}" for c in OBJECTS),
                          f"{columns['total']:.2f}"])
            for column in sums:
                sums[column] += columns.get(column, 0.0)
        lines.append([route, "**all**", *(f"**{sums[c]:.2f}**" for c in OBJECTS),
                      f"**{sums['total']:.2f}**"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     + " |" for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--direction", choices=("download", "upload"), default="download")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed part per route")
    parser.add_argument("--routes", default="wss,ssh,ws",
                        help="comma-separated from: wss, ws, ssh (default wss,ssh,ws)")
    parser.add_argument("--wstunnel", default=_procs.WSTUNNEL_COMMAND,
                        help="command running the wstunnel CLI")
    args = parser.parse_args(argv)
    if shutil.which("perf") is None:
        print("cpu_split.py needs perf: apt-get install linux-perf", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    results = []
    command = shlex.split(args.wstunnel)
    wanted = args.routes.split(",")
    with tempfile.TemporaryDirectory(prefix="wstunnel-cpu-split-") as folder:
        tmp = Path(folder)
        for kind in wanted:
            with contextlib.ExitStack() as stack:
                targets = _procs.start_targets(stack, tmp)
                if kind == "ssh":
                    route = _procs.start_ssh(stack, tmp, targets)
                else:
                    route = _procs.start_wstunnel(stack, tmp, targets, command, [],
                                                  ["--log-level=warning"], tls=kind == "wss")
                print(f"  {route.name}: {args.direction} for {args.seconds:g} s under perf",
                      file=sys.stderr, flush=True)
                names = {pid: _name(pid) for pid in descendants(route.pids)}
                try:
                    results.append((route.name, measure(route, args.direction, args.seconds, tmp),
                                    names))
                except (BenchError, OSError) as exc:
                    print(f"    FAILED: {exc!r}", file=sys.stderr)
    print(table(results))
    print(f"s of CPU per GiB {args.direction}ed, split by perf samples (1999 Hz) per shared "
          "object; total from /proc. python = libpython and CPython's extension modules.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
