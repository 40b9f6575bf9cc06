"""10,000 idle channels over one session: do they all still echo, and what do they cost?

The issue's target: 10,000 concurrent idle channels over one session all
still echo, and agent and relay together grow by at most 16 KiB of resident
memory (VmRSS) per channel.

Processes (all on 127.0.0.1, all stopped on the way out, Ctrl-C included):
    echo     this script's ``serve-echo`` in its own process: one thread,
             ``selectors`` (epoll), holds any number of connections
    relay    ``wstunnel relay`` from the CLI, plain ws:// or wss://
    agent    ``wstunnel agent`` from the CLI, one forward to the echo server
    load     this process: non-blocking sockets and one selector

What is done, per repetition (fresh processes each time):
    1. start everything; one echo through the tunnel brings the session up;
       read VmRSS of agent and relay ("before")
    2. open ``--channels`` connections to the agent's forward in batches of
       ``--batch``; each batch sends one byte per connection and waits for
       every echo before the next batch, so the relay never has more than
       one batch of dials in flight (its ``max_pending_opens`` default is 64)
    3. leave them all idle for ``--idle-seconds``; read VmRSS ("after")
    4. send one byte on every connection at once and wait, within
       ``--echo-timeout``, for every echo: the "all still echo" check

Limits: a default relay allows 1024 channels per session (``max_channels``)
and ``max_buffered_size`` 256 MiB = 1024 x the 256 KiB window, so the relay
gets a config file raising both (``--relay-config-extra`` adds more keys).
The file-descriptor limit (RLIMIT_NOFILE) is raised for this process, and
through inheritance for every process it starts, to channels + 512.

Run from the repository root:

    .venv/bin/python benchmarks/idle_channels.py    # 10,000 channels, ws:// and wss://, 3 runs
    .venv/bin/python benchmarks/idle_channels.py --channels 2000 --repeat 1 --schemes ws
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import selectors
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import _procs
from _procs import BenchError, exit_on_sigterm

KIB: Final = 1024
TARGET_KIB_PER_CHANNEL: Final = 16
FD_MARGIN: Final = 512


# -- the echo server (its own process) ---------------------------------------


def serve_echo() -> int:
    """Echo on a free loopback port; print it; serve until stdin closes."""
    selector = selectors.DefaultSelector()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ, None)
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    print(json.dumps({"echo": listener.getsockname()[1]}), flush=True)
    while True:
        for key, _ in selector.select():
            if key.data == "stdin":
                return 0
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        conn, _addr = listener.accept()
                        conn.setblocking(False)
                        selector.register(conn, selectors.EVENT_READ, "conn")
                continue
            try:
                data = sock.recv(65536)
                if data:
                    sock.send(data)  # a few bytes at a time: never blocks in practice
                    continue
            except OSError:
                pass
            selector.unregister(sock)
            sock.close()


# -- measuring ---------------------------------------------------------------


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE to ``needed`` (the hard limit too, as root); return the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        if os.geteuid() != 0:
            raise BenchError(f"need {needed} file descriptors but the hard limit is {hard}; "
                             "run as root, raise it (ulimit -Hn), or lower --channels")
        hard = needed
    if soft == resource.RLIM_INFINITY or soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _echo_all(socks: Sequence[socket.socket], timeout: float) -> tuple[int, float]:
    """Send one byte on every socket, wait for every echo; (missing, seconds)."""
    selector = selectors.DefaultSelector()
    start = time.perf_counter()
    for sock in socks:
        sock.send(b"x")
        selector.register(sock, selectors.EVENT_READ)
    waiting = len(socks)
    deadline = start + timeout
    try:
        while waiting and (left := deadline - time.perf_counter()) > 0:
            for key, _ in selector.select(min(left, 1.0)):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    data = ready.recv(16)
                except OSError:
                    data = b""
                selector.unregister(ready)
                if data == b"x":
                    waiting -= 1
                else:  # EOF or reset: that channel is gone; it stays "missing"
                    continue
    finally:
        selector.close()
    return waiting, time.perf_counter() - start


@dataclass
class Run:
    """One repetition's figures."""

    scheme: str
    channels: int
    open_seconds: float
    agent_before_kib: int
    relay_before_kib: int
    agent_after_kib: int
    relay_after_kib: int
    missing: int
    echo_all_seconds: float

    @property
    def kib_per_channel(self) -> float:
        grown = (self.agent_after_kib - self.agent_before_kib
                 + self.relay_after_kib - self.relay_before_kib)
        return grown / self.channels


def _relay_config(tmp: Path, channels: int, extra: Sequence[str]) -> Path:
    config = tmp / "relay-limits.yaml"
    lines = ["listen: 127.0.0.1:0  # required in a file; --listen replaces it",
             f"max_channels: {channels + 64}",
             f"max_buffered_size: {(channels + 64) * 256}KiB", *extra]
    config.write_text("\n".join(lines) + "\n")
    return config


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def one_run(args: argparse.Namespace, scheme: str, tmp: Path) -> Run:
    """Fresh echo server, relay and agent; open, idle, measure, check."""
    command = shlex.split(args.wstunnel)
    socks: list[socket.socket] = []
    with contextlib.ExitStack() as stack:
        echo = subprocess.Popen([sys.executable, __file__, "serve-echo"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        stack.callback(_procs._close_then_stop, echo)  # noqa: SLF001
        assert echo.stdout is not None
        line = echo.stdout.readline()
        if not line:
            raise BenchError("the echo server exited before announcing its port")
        targets = _procs.Route("direct", {kind: json.loads(line)["echo"]
                                          for kind in _procs.TARGET_KINDS}, [echo.pid])
        limits = ["-c", str(_relay_config(tmp, args.channels, args.relay_config_extra))]
        route = _procs.start_wstunnel(stack, tmp, targets, command,
                                      ["--log-level=warning", *limits],
                                      ["--log-level=warning"], tls=scheme == "wss")
        stack.callback(_close_all, socks)
        agent_pid, relay_pid = route.pids
        port = route.ports["echo"]
        time.sleep(0.5)  # let both settle after start-up before the "before" figure
        agent_before, relay_before = _procs.vm_rss_kib(agent_pid), _procs.vm_rss_kib(relay_pid)
        start = time.perf_counter()
        while len(socks) < args.channels:
            batch = []
            for _ in range(min(args.batch, args.channels - len(socks))):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
                sock.setblocking(False)
                batch.append(sock)
            socks.extend(batch)
            missing, _ = _echo_all(batch, args.echo_timeout)
            if missing:
                raise BenchError(f"{missing} of a batch of {len(batch)} new channels did not "
                                 f"echo ({len(socks)} opened so far)\n{_procs.log_tail(route)}")
        open_seconds = time.perf_counter() - start
        time.sleep(args.idle_seconds)
        agent_after, relay_after = _procs.vm_rss_kib(agent_pid), _procs.vm_rss_kib(relay_pid)
        missing, echo_seconds = _echo_all(socks, args.echo_timeout)
        for proc_pid, what in ((agent_pid, "agent"), (relay_pid, "relay")):
            if not Path(f"/proc/{proc_pid}").exists():
                raise BenchError(f"the {what} exited\n{_procs.log_tail(route)}")
        if missing:
            print(f"    {missing} channels did not echo\n{_procs.log_tail(route)}",
                  file=sys.stderr)
        return Run(scheme, args.channels, open_seconds, agent_before, relay_before,
                   agent_after, relay_after, missing, echo_seconds)


def report(runs: list[Run]) -> str:
    """One table row per scheme, medians over the repetitions."""
    header = ["route", "channels", "all echo", "open [s]", "echo all [s]",
              "agent +KiB", "relay +KiB", "KiB per channel (agent+relay)", "target"]
    lines = [header, ["---"] * len(header)]
    for scheme in dict.fromkeys(run.scheme for run in runs):
        mine = [run for run in runs if run.scheme == scheme]

        def med(values: list[float]) -> float:
            return statistics.median(values)

        per_channel = med([run.kib_per_channel for run in mine])
        ok = all(run.missing == 0 for run in mine)
        lines.append([
            f"wstunnel {scheme}://", str(mine[0].channels),
            "yes" if ok else f"NO ({max(run.missing for run in mine)} missing)",
            f"{med([run.open_seconds for run in mine]):.1f}",
            f"{med([run.echo_all_seconds for run in mine]):.2f}",
            f"{med([run.agent_after_kib - run.agent_before_kib for run in mine]):.0f}",
            f"{med([run.relay_after_kib - run.relay_before_kib for run in mine]):.0f}",
            f"{per_channel:.1f}",
            "met" if ok and per_channel <= TARGET_KIB_PER_CHANNEL else "NOT met",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
                     + " |" for line in lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve-echo", help="(internal) the echo server process")
    parser.add_argument("--channels", type=int, default=10_000, help="default 10000")
    parser.add_argument("--batch", type=int, default=50,
                        help="connections opened before waiting for their echoes (default 50)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--schemes", default="ws,wss", help="ws, wss or ws,wss (default)")
    parser.add_argument("--idle-seconds", type=float, default=3.0,
                        help="how long all channels sit idle before the figures (default 3)")
    parser.add_argument("--echo-timeout", type=float, default=60.0,
                        help="every channel must echo within this (default 60 s)")
    _procs.add_run_options(parser)
    parser.add_argument("--relay-config-extra", action="append", default=[], metavar="YAML",
                        help="extra line for the relay's config file, e.g. 'initial_window: 64KiB'")
    args = parser.parse_args(argv)
    if not set(args.schemes.split(",")) <= {"ws", "wss"}:
        parser.error(f"--schemes takes ws, wss or ws,wss, not {args.schemes!r}")
    return args



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "serve-echo":
        raise_fd_limit(args.channels + FD_MARGIN)
        return serve_echo()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        limit = raise_fd_limit(args.channels + FD_MARGIN)
    except BenchError as exc:
        print(f"idle_channels: {exc}", file=sys.stderr)
        return 2
    print(f"RLIMIT_NOFILE {limit} for this process and its children; "
          f"load average {Path('/proc/loadavg').read_text().strip()}", file=sys.stderr)
    runs: list[Run] = []
    failures: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="wstunnel-idle-") as tmp:
            work = args.keep or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            for rep in range(args.repeat):
                for scheme in args.schemes.split(","):
                    print(f"  {scheme}:// rep {rep + 1}/{args.repeat}: {args.channels} channels",
                          file=sys.stderr, flush=True)
                    try:
                        run = one_run(args, scheme, work)
                    except (BenchError, OSError) as exc:
                        failures.append(f"{scheme}:// rep {rep + 1}: {exc}")
                        print(f"    FAILED: {exc}", file=sys.stderr)
                        continue
                    runs.append(run)
                    print(f"    {run.kib_per_channel:.1f} KiB per channel, "
                          f"{run.missing} missing, {asdict(run)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; all benchmark processes stopped", file=sys.stderr)
        return 130
    if runs:
        print(report(runs))
        print(f"RSS growth from /proc/PID/status VmRSS, before opening and after "
              f"{args.idle_seconds:g} s idle; medians of {args.repeat} run(s). "
              f"Target: all echo, <= {TARGET_KIB_PER_CHANNEL} KiB per channel.")
    for failure in failures:
        print(f"FAILED: {failure}")
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(run) for run in runs],
                                         "failures": failures}, indent=1))
    return 1 if failures or any(run.missing for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
