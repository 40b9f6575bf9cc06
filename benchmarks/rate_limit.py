"""Per-agent rate limits: a limited agent held to its limit while an unlimited one
uses the rest, through one relay, both ways at once.

Processes: one relay and two agents (``wstunnel`` via the CLI), and one load
process per flow (four: each agent downloads and uploads at the same time, one
channel each way), so no flow waits for another's interpreter. A load process
is both ends of its flow: the client of the agent's forward and the target the
relay dials (its own listener); whichever end receives counts the bytes that
arrived. This process samples the counters once a second after a warm-up;
each row is the median of those per-second rates (and their mean).

    .venv/bin/python benchmarks/rate_limit.py                  # 20 MiB/s, 8 s, about 15 s
    .venv/bin/python benchmarks/rate_limit.py --limit 10M --seconds 5 --burst 1M

Only 127.0.0.1 is used; every process is stopped on the way out (Ctrl-C too).
Exit status 1 if a limited rate's median is more than 5 % off its limit.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

import _procs
from _procs import BenchError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from wstunnel.config.textforms import parse_size  # noqa: E402
from wstunnel.security.auth import hash_token, new_token  # noqa: E402

MIB: Final = 1 << 20
BLOCK: Final = bytes(256 * 1024)
AGENTS: Final = ("limited", "unlimited")
FLOWS: Final = ("down", "up")
TOLERANCE: Final = 0.05
PROBE_SETTLE: Final = 0.5  # seconds for the start-up probes' channels to reach the targets


class Counter(Protocol):
    """A multiprocessing Value without a lock (one writer per value)."""

    value: int


def _pour(sock: socket.socket, stop: Callable[[], bool]) -> None:
    """Send until told to stop (the kernel's buffers hold what the tunnel has not taken)."""
    while not stop():
        sock.sendall(BLOCK)


def _count(sock: socket.socket, counter: Counter, stop: Callable[[], bool]) -> None:
    view = memoryview(bytearray(1 << 20))
    while not stop():
        got = sock.recv_into(view)
        if not got:
            raise BenchError("the transfer ended early")
        counter.value += got


def _flow(kind: str, target: socket.socket, port: int, counter: Counter,
          done: Counter) -> None:
    """A load process: one channel through the agent's forward at ``port`` to our own
    ``target`` listener; the receiving end counts (what arrived, not what was sent)."""
    stop = lambda: bool(done.value)  # noqa: E731
    with contextlib.suppress(OSError, KeyboardInterrupt, BenchError):
        client = socket.create_connection(("127.0.0.1", port))
        far, _ = target.accept()
        sender, receiver = (far, client) if kind == "down" else (client, far)
        pouring = threading.Thread(target=_pour, args=(sender, stop), daemon=True)
        pouring.start()
        _count(receiver, counter, stop)


def _relay_config(tmp: Path, port: int, tokens: dict[str, str], limit: int,
                  burst: int | None) -> Path:
    lines = [f"listen: 127.0.0.1:{port}", "log_level: warning", "agents:"]
    for name, token in tokens.items():
        lines += [f"  - name: {name}", f"    token_hash: {hash_token(token)}",
                  "    allow: ['127.0.0.1']"]
        if name == "limited":
            extra = f", burst: {burst}" if burst else ""
            lines.append(f"    rate_limit: {{down: {limit}, up: {limit}{extra}}}")
    path = tmp / "relay.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _agent_config(tmp: Path, name: str, relay_port: int, forwards: list[str]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(f"relay: ws://127.0.0.1:{relay_port}/tunnel\n"
                    f"token_env: WSTUNNEL_TOKEN\nlog_level: warning\nproxy: none\n"
                    f"forwards: [{', '.join(repr(f) for f in forwards)}]\n")
    return path


def _start(stack: contextlib.ExitStack, tmp: Path, limit: int, burst: int | None,
           wstunnel: list[str], targets: dict[tuple[str, str], socket.socket]
           ) -> dict[tuple[str, str], int]:
    """Relay and agents; returns each (agent, flow)'s local forward port."""
    tokens = {name: new_token(name) for name in AGENTS}
    relay_port = _procs.free_port()
    relay = _procs.spawn(stack, [*wstunnel, "relay", "-c",
                                 str(_relay_config(tmp, relay_port, tokens, limit, burst))],
                         tmp / "relay.log")
    _procs.wait_listening(relay_port, relay, "the relay")
    ports: dict[tuple[str, str], int] = {}
    for name in AGENTS:
        local = {flow: _procs.free_port() for flow in FLOWS}
        forwards = [f"{local[flow]}:127.0.0.1:{targets[name, flow].getsockname()[1]}"
                    for flow in FLOWS]
        env = {**_procs.CHILD_ENV, "WSTUNNEL_TOKEN": tokens[name]}
        agent = _procs.spawn(stack, [*wstunnel, "agent", "-c",
                                     str(_agent_config(tmp, name, relay_port, forwards))],
                             tmp / f"{name}.log", env=env)
        for flow in FLOWS:
            _procs.wait_listening(local[flow], agent, f"agent {name}")
            ports[name, flow] = local[flow]
    return ports


def _drain(targets: dict[tuple[str, str], socket.socket]) -> None:
    """Close what the start-up probes of the agents' ports made the relay dial, so that
    each load process accepts its own connection."""
    time.sleep(PROBE_SETTLE)
    for sock in targets.values():
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.accept()[0].close()
        sock.setblocking(True)


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def _sample(counters: dict[tuple[str, str], Counter], warmup: float,
            seconds: int) -> dict[tuple[str, str], list[float]]:
    """Per-second rates of every flow, after ``warmup`` seconds."""
    time.sleep(warmup)
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in counters}
    last = {key: c.value for key, c in counters.items()}
    then = time.monotonic()
    for _ in range(seconds):
        time.sleep(1.0)
        now = time.monotonic()
        for key, counter in counters.items():
            value = counter.value
            rates[key].append((value - last[key]) / (now - then))
            last[key] = value
        then = now
    return rates


def _report(rates: dict[tuple[str, str], list[float]], limit: int) -> bool:
    """Print the table; True when each limited median is within TOLERANCE."""
    print(f"limit {limit / MIB:g} MiB/s each way on agent 'limited'; median of "
          f"{len(next(iter(rates.values())))} one-second samples (min-max)")
    print("| agent | direction | median MiB/s | min-max MiB/s | mean MiB/s | median / limit |")
    print("|---|---|---|---|---|---|")
    good = True
    for (name, flow), samples in rates.items():
        median = statistics.median(samples)
        ratio = ""
        if name == "limited":
            ratio = f"{median / limit:.3f}"
            good = good and abs(median / limit - 1) <= TOLERANCE
        print(f"| {name} | {flow} | {median / MIB:.2f} | {min(samples) / MIB:.2f}-"
              f"{max(samples) / MIB:.2f} | {statistics.mean(samples) / MIB:.2f} | {ratio} |")
    return good


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", default="20MiB", help="the limited agent's rate each way "
                        "(bytes per second, a size: 20MiB, 5M)")
    parser.add_argument("--burst", default=None, help="its burst (default: the relay's)")
    parser.add_argument("--seconds", type=int, default=8, help="samples to take")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before sampling")
    parser.add_argument("--wstunnel", default=f"{sys.executable} -m wstunnel",
                        help="how to run wstunnel")
    args = parser.parse_args()
    limit = parse_size(args.limit)
    burst = parse_size(args.burst) if args.burst else None
    context = multiprocessing.get_context("fork")
    done = context.Value("b", 0, lock=False)
    counters = {(name, flow): context.Value("q", 0, lock=False)
                for name in AGENTS for flow in FLOWS}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        targets = {key: stack.enter_context(_listener()) for key in counters}
        ports = _start(stack, Path(tmp), limit, burst, args.wstunnel.split(), targets)
        _drain(targets)
        workers = [context.Process(target=_flow, args=(flow, targets[name, flow],
                                                       ports[name, flow],
                                                       counters[name, flow], done))
                   for name, flow in counters]
        for worker in workers:
            worker.start()
        try:
            rates = _sample(counters, args.warmup, args.seconds)
        finally:
            done.value = 1
            for worker in workers:
                worker.join(5)
                if worker.is_alive():
                    worker.kill()
    print(f"machine: {os.cpu_count()} cores, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if _report(rates, limit) else 1


if __name__ == "__main__":
    sys.exit(main())
