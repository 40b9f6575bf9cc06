"""One session, default settings: 10,000 idle channels through -L, 2,000 at once through -D.

Issue 22 ("Scale"): 10,000 channels per session must work with default
settings, memory still bounded. Relay and agent run with no configuration
beyond the command line (no raised max_channels, no config file), so the
figures are what a user gets out of the box.

Processes (127.0.0.1, all stopped on the way out):
    echo     idle_channels.py's ``serve-echo`` (one thread, epoll, any number of connections)
    relay    ``wstunnel relay`` (ws://), defaults
    agent    ``wstunnel agent``: ``-L`` to the echo server and ``-D`` (SOCKS5)
    load     this process: non-blocking sockets and one selector

Phase 1, -L: one "active" channel first; its 64-byte round trip (p50, p99 of
``--round-trips``) alone; then ``--channels`` more, opened in batches of
``--batch`` (each batch echoes one byte before the next); ``--idle-seconds``
idle; agent and relay VmRSS before and after (KiB per channel); the active
channel's round trip again among them; one byte on all of them at once, every
echo awaited; all closed, RSS once more.

Phase 2, -D: ``--socks`` SOCKS5 clients started at once (connect, no-auth
greeting, CONNECT to the echo server by IPv4, ``--socks-payload`` bytes
echoed); time until the last echo, per-client latency p50/p99, failures by
stage, RSS.

Run from the repository root (about a minute, one run):

    .venv/bin/python benchmarks/many_channels.py
    .venv/bin/python benchmarks/many_channels.py --channels 2000 --socks 500
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import _procs
from _procs import BenchError, exit_on_sigterm
from idle_channels import FD_MARGIN, _echo_all, raise_fd_limit

KIB: Final = 1024
PING: Final = b"p" * 64


def _start(stack: contextlib.ExitStack, tmp: Path, command: list[str],
           socks_port: int, channels: int) -> tuple[_procs.Route, int]:
    """Echo server, then relay and agent with defaults; (route, echo port)."""
    echo = subprocess.Popen([sys.executable, str(Path(__file__).with_name("idle_channels.py")),
                             "--channels", str(channels), "serve-echo"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    stack.callback(_procs._close_then_stop, echo)  # noqa: SLF001
    assert echo.stdout is not None
    line = echo.stdout.readline()
    if not line:
        raise BenchError("the echo server exited before announcing its port")
    echo_port = int(json.loads(line)["echo"])
    targets = _procs.Route("direct", dict.fromkeys(_procs.TARGET_KINDS, echo_port), [echo.pid])
    route = _procs.start_wstunnel(stack, tmp, targets, command, ["--log-level=warning"],
                                  ["--log-level=warning", "-D", f"127.0.0.1:{socks_port}"])
    return route, echo_port


def _round_trips(sock: socket.socket, count: int) -> tuple[float, float]:
    """p50 and p99 of ``count`` 64-byte round trips on a blocking socket, in ms."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        sock.sendall(PING)
        got = 0
        while got < len(PING):
            data = sock.recv(len(PING) - got)
            if not data:
                raise BenchError("the active channel ended")
            got += len(data)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3, times[min(len(times) - 1, len(times) * 99 // 100)] * 1e3


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _rss(route: _procs.Route) -> tuple[int, int]:
    agent, relay = route.pids
    return _procs.vm_rss_kib(agent), _procs.vm_rss_kib(relay)


def _open_idle(port: int, channels: int, batch: int, timeout: float,
               route: _procs.Route) -> tuple[list[socket.socket], float]:
    socks: list[socket.socket] = []
    start = time.perf_counter()
    while len(socks) < channels:
        fresh = []
        for _ in range(min(batch, channels - len(socks))):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
            sock.setblocking(False)
            fresh.append(sock)
        socks.extend(fresh)
        missing, _ = _echo_all(fresh, timeout)
        if missing:
            raise BenchError(f"{missing} of a batch of {len(fresh)} new channels did not echo "
                             f"({len(socks)} opened so far)\n{_procs.log_tail(route)}")
    return socks, time.perf_counter() - start


def phase_forward(args: argparse.Namespace, route: _procs.Route) -> dict[str, float]:
    """10,000 idle channels through -L and one active among them."""
    port = route.ports["echo"]
    figures: dict[str, float] = {}
    active = _connect(port)
    try:
        _round_trips(active, 200)  # warm up
        figures["rtt_alone_p50_ms"], figures["rtt_alone_p99_ms"] = _round_trips(
            active, args.round_trips)
        time.sleep(0.5)
        figures["agent_before_kib"], figures["relay_before_kib"] = _rss(route)
        socks, figures["open_s"] = _open_idle(port, args.channels, args.batch,
                                              args.echo_timeout, route)
        try:
            time.sleep(args.idle_seconds)
            figures["agent_after_kib"], figures["relay_after_kib"] = _rss(route)
            figures["rtt_among_p50_ms"], figures["rtt_among_p99_ms"] = _round_trips(
                active, args.round_trips)
            missing, figures["echo_all_s"] = _echo_all(socks, args.echo_timeout)
            figures["missing"] = missing
        finally:
            for sock in socks:
                sock.close()
    finally:
        active.close()
    time.sleep(args.idle_seconds)
    figures["agent_closed_kib"], figures["relay_closed_kib"] = _rss(route)
    return figures


class _Client:
    """One SOCKS5 client: greeting -> method -> CONNECT -> reply -> payload echoed."""

    __slots__ = ("sock", "stage", "buffer", "start", "done")

    def __init__(self, sock: socket.socket, start: float) -> None:
        self.sock = sock
        self.stage = "connect"
        self.buffer = b""
        self.start = start
        self.done = 0.0


def _socks_step(client: _Client, request: bytes, payload: bytes) -> str | None:
    """Advance on what arrived; return a failure stage, or None."""
    buf = client.buffer
    if client.stage == "method" and len(buf) >= 2:
        if buf[:2] != b"\x05\x00":
            return "method"
        client.sock.send(request)
        client.buffer, client.stage = buf[2:], "reply"
        buf = client.buffer
    if client.stage == "reply" and len(buf) >= 10:
        if buf[1] != 0:
            return f"reply {buf[1]}"
        client.sock.send(payload)
        client.buffer, client.stage = buf[10:], "echo"
        buf = client.buffer
    if client.stage == "echo" and len(buf) >= len(payload):
        client.stage, client.done = "done", time.perf_counter()
    return None


def phase_socks(args: argparse.Namespace, socks_port: int, echo_port: int,
                route: _procs.Route) -> dict[str, float]:
    """``--socks`` SOCKS5 clients at once through -D, each echoing a little."""
    request = b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo_port)
    payload = bytes(range(256)) * (args.socks_payload // 256 + 1)
    payload = payload[:args.socks_payload]
    selector = selectors.DefaultSelector()
    clients: list[_Client] = []
    failures: Counter[str] = Counter()
    before = _rss(route)
    start = time.perf_counter()
    for _ in range(args.socks):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", socks_port))
        client = _Client(sock, time.perf_counter())
        clients.append(client)
        selector.register(sock, selectors.EVENT_WRITE, client)
    waiting, deadline = len(clients), start + args.echo_timeout
    peak = before
    try:
        while waiting and time.perf_counter() < deadline:
            for key, _ in selector.select(1.0):
                client = key.data
                failure = _socks_event(client, selector, request, payload)
                if failure or client.stage == "done":
                    waiting -= 1
                    selector.unregister(client.sock)
                    if failure:
                        failures[failure] += 1
            if waiting and len(clients) - waiting > len(clients) // 2:
                peak = max(peak, _rss(route))
        elapsed = time.perf_counter() - start
        peak = max(peak, _rss(route))
    finally:
        selector.close()
        for client in clients:
            client.sock.close()
    latencies = sorted(c.done - c.start for c in clients if c.stage == "done")
    failures["timeout"] += waiting
    figures: dict[str, float] = {
        "socks_ok": len(latencies), "socks_seconds": elapsed,
        "socks_agent_before_kib": before[0], "socks_relay_before_kib": before[1],
        "socks_agent_peak_kib": peak[0], "socks_relay_peak_kib": peak[1]}
    if latencies:
        figures["socks_p50_ms"] = latencies[len(latencies) // 2] * 1e3
        figures["socks_p99_ms"] = latencies[min(len(latencies) - 1,
                                                len(latencies) * 99 // 100)] * 1e3
    for stage, count in failures.items():
        if count:
            figures[f"socks_failed_{stage}"] = count
    return figures


def _socks_event(client: _Client, selector: selectors.BaseSelector, request: bytes,
                 payload: bytes) -> str | None:
    sock = client.sock
    if client.stage == "connect":
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return "connect"
        sock.send(b"\x05\x01\x00")
        client.stage = "method"
        selector.modify(sock, selectors.EVENT_READ, client)
        return None
    try:
        data = sock.recv(65536)
    except OSError:
        data = b""
    if not data:
        return f"closed at {client.stage}"
    client.buffer += data
    return _socks_step(client, request, payload)


def report(forward: dict[str, float], socks: dict[str, float], args: argparse.Namespace) -> str:
    grown_agent = forward["agent_after_kib"] - forward["agent_before_kib"]
    grown_relay = forward["relay_after_kib"] - forward["relay_before_kib"]
    lines = [
        f"-L: {args.channels} idle channels (+1 active), defaults, ws://",
        f"  all opened in {forward['open_s']:.1f} s; one byte on all at once: "
        f"{forward['echo_all_s']:.2f} s, {forward['missing']:.0f} missing",
        f"  agent RSS {forward['agent_before_kib'] / KIB:.1f} -> "
        f"{forward['agent_after_kib'] / KIB:.1f} MiB ({grown_agent / args.channels:.2f} KiB "
        f"per channel), after closing {forward['agent_closed_kib'] / KIB:.1f} MiB",
        f"  relay RSS {forward['relay_before_kib'] / KIB:.1f} -> "
        f"{forward['relay_after_kib'] / KIB:.1f} MiB ({grown_relay / args.channels:.2f} KiB "
        f"per channel), after closing {forward['relay_closed_kib'] / KIB:.1f} MiB",
        f"  64 B round trip of the active channel, alone: p50 "
        f"{forward['rtt_alone_p50_ms']:.3f} ms, p99 {forward['rtt_alone_p99_ms']:.3f} ms; "
        f"among {args.channels} idle: p50 {forward['rtt_among_p50_ms']:.3f} ms, "
        f"p99 {forward['rtt_among_p99_ms']:.3f} ms ({args.round_trips} round trips each)",
        f"-D: {args.socks} SOCKS5 clients at once, {args.socks_payload} B echoed each",
        f"  {socks['socks_ok']:.0f} ok in {socks['socks_seconds']:.2f} s; per client "
        f"p50 {socks.get('socks_p50_ms', float('nan')):.0f} ms, "
        f"p99 {socks.get('socks_p99_ms', float('nan')):.0f} ms",
        f"  agent RSS {socks['socks_agent_before_kib'] / KIB:.1f} -> peak "
        f"{socks['socks_agent_peak_kib'] / KIB:.1f} MiB; relay "
        f"{socks['socks_relay_before_kib'] / KIB:.1f} -> peak "
        f"{socks['socks_relay_peak_kib'] / KIB:.1f} MiB",
    ]
    failed = {k: v for k, v in socks.items() if k.startswith("socks_failed_")}
    if failed:
        lines.append("  failed: " + ", ".join(f"{k[13:]} {v:.0f}" for k, v in failed.items()))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=10_000, help="idle -L channels")
    parser.add_argument("--batch", type=int, default=50,
                        help="-L connections opened before waiting for their echoes")
    parser.add_argument("--socks", type=int, default=2_000, help="SOCKS5 clients at once")
    parser.add_argument("--socks-payload", type=int, default=1024,
                        help="bytes each SOCKS5 client echoes")
    parser.add_argument("--round-trips", type=int, default=2_000,
                        help="64 B round trips per latency figure")
    parser.add_argument("--idle-seconds", type=float, default=2.0)
    parser.add_argument("--echo-timeout", type=float, default=60.0)
    _procs.add_run_options(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    # This process holds every client socket; agent and relay raise their own
    # soft limit to the hard one at start (wstunnel/service/open_files.py).
    limit = raise_fd_limit(max(args.channels, args.socks) + FD_MARGIN)
    print(f"RLIMIT_NOFILE {limit} for the load; load average "
          f"{Path('/proc/loadavg').read_text().strip()}", file=sys.stderr)
    socks_port = _procs.free_port()
    try:
        with tempfile.TemporaryDirectory(prefix="wstunnel-many-") as tmp, \
                contextlib.ExitStack() as stack:
            work = args.keep or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            route, echo_port = _start(stack, work, shlex.split(args.wstunnel), socks_port,
                                      max(args.channels, args.socks) + FD_MARGIN)
            forward = phase_forward(args, route)
            socks = phase_socks(args, socks_port, echo_port, route)
            logs = _procs.log_tail(route, 8)
    except BenchError as exc:
        print(f"many_channels: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; all benchmark processes stopped", file=sys.stderr)
        return 130
    print(report(forward, socks, args))
    if logs:
        print(f"log tails:\n{logs}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"forward": forward, "socks": socks}, indent=1))
    return 1 if forward["missing"] or socks["socks_ok"] < args.socks else 0


if __name__ == "__main__":
    sys.exit(main())
