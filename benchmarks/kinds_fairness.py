"""Fairness across forward kinds: a -D (SOCKS5) interactive echo beside a -R bulk transfer.

One agent and one relay (processes, ws:// on loopback). The agent has a -D
proxy port and two -R forwards: the relay listens on one port whose
connections reach the sink beside the agent (a bulk upload from the relay's
side: relay -> agent, the direction the echo's replies travel) and on one
that reaches the source (a bulk download from beside the agent: agent ->
relay, the direction its requests travel). A client opens a SOCKS5 CONNECT
to the echo target through -D and times 64-byte round trips: with the tunnel
idle, during the -R upload, during the -R download; each round interleaves
the three, so drift hits them alike. The same echo straight to the target is
the floor, and a -L echo beside a -L upload on the same session is the
reference from before the new kinds.

    python benchmarks/kinds_fairness.py [--rounds 5] [--count 2000]

Prints the p50 and p99 of each, the bulk rates, and the p99 ratios under load
against idle. Bounded: every round trip set stops after ``--count`` or 10 s,
each bulk transfer after the round trips are done.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from _children import PYTHON_M_WSTUNNEL, relay_argv
from _load import background_upload, connect
from _procs import BenchError, free_port, spawn, start_targets, wait_listening
from _targets import drain

RTT: Final = bytes(range(64))
BUDGET: Final = 10.0


def socks5_connect(proxy_port: int, port: int) -> socket.socket:
    """A SOCKS5 CONNECT to 127.0.0.1:``port`` through the -D port, ready to use."""
    sock = connect(proxy_port)
    sock.sendall(b"\x05\x01\x00")
    if sock.recv(2) != b"\x05\x00":
        raise BenchError("the SOCKS5 proxy refused the no-login method")
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        data = sock.recv(10 - len(reply))
        if not data:
            raise BenchError("the SOCKS5 proxy closed during CONNECT")
        reply += data
    if reply[1] != 0:
        raise BenchError(f"SOCKS5 CONNECT failed with reply code {reply[1]}")
    return sock


def round_trips(sock: socket.socket, count: int) -> list[float]:
    samples: list[float] = []
    deadline = time.perf_counter() + BUDGET
    while len(samples) < count and time.perf_counter() < deadline:
        start = time.perf_counter()
        sock.sendall(RTT)
        got = 0
        while got < len(RTT):
            data = sock.recv(len(RTT) - got)
            if not data:
                raise BenchError("the echo closed")
            got += len(data)
        samples.append(time.perf_counter() - start)
    return samples


@contextlib.contextmanager
def background_download(port: int, rates: list[float]) -> Iterator[None]:
    """Download from the source through ``port`` again and again until the block ends."""
    stop = threading.Event()
    moved = [0, 0.0]

    def run() -> None:
        start = time.perf_counter()
        while not stop.is_set():
            with connect(port) as sock:
                sock.sendall(b"%d\n" % (64 << 20))
                moved[0] += drain(sock)
        moved[1] = time.perf_counter() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.2)  # (under way before the first round trip)
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
        rates.append(moved[0] / moved[1] if moved[1] else 0.0)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        targets = start_targets(stack, Path(tmp))
        relay_port, socks, up, down = free_port(), free_port(), free_port(), free_port()
        local_echo, local_sink = free_port(), free_port()
        relay = spawn(stack, [*PYTHON_M_WSTUNNEL, *relay_argv(
            relay_port, "--listen-allow", f"127.0.0.1:{up}", "--listen-allow",
            f"127.0.0.1:{down}")], Path(tmp) / "relay.log")
        wait_listening(relay_port, relay, "wstunnel relay")
        agent = spawn(stack, [*PYTHON_M_WSTUNNEL, "agent", "--relay",
                              f"ws://127.0.0.1:{relay_port}/tunnel", "--no-proxy",
                              "-D", str(socks),
                              "-R", f"{up}:127.0.0.1:{targets.ports['sink']}",
                              "-R", f"{down}:127.0.0.1:{targets.ports['source']}",
                              "-L", f"{local_echo}:127.0.0.1:{targets.ports['echo']}",
                              "-L", f"{local_sink}:127.0.0.1:{targets.ports['sink']}"],
                      Path(tmp) / "agent.log")
        for port in (socks, up, down, local_echo, local_sink):
            wait_listening(port, agent, "the agent's -D port and the relay's -R ports")
        results: dict[str, list[list[float]]] = {"direct": [], "idle": [], "-R upload": [],
                                                 "-R download": [], "-L beside -L": []}
        up_rates: list[float] = []
        down_rates: list[float] = []
        for number in range(1, args.rounds + 1):
            with connect(targets.ports["echo"]) as sock:
                results["direct"].append(round_trips(sock, args.count))
            with socks5_connect(socks, targets.ports["echo"]) as sock:
                results["idle"].append(round_trips(sock, args.count))
                with background_upload(up, up_rates.append):
                    results["-R upload"].append(round_trips(sock, args.count))
                with background_download(down, down_rates):
                    results["-R download"].append(round_trips(sock, args.count))
            with connect(local_echo) as sock, background_upload(local_sink, lambda rate: None):
                results["-L beside -L"].append(round_trips(sock, args.count))
            print(f"round {number}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"64 B round trips through -D (SOCKS5), {args.rounds} rounds x up to "
          f"{args.count}; medians of the rounds' percentiles, ms (range)")
    idle99 = statistics.median(pct(s, 0.99) for s in results["idle"])
    for name, rounds in results.items():
        p50s = [pct(s, 0.50) for s in rounds]
        p99s = [pct(s, 0.99) for s in rounds]
        ratio = statistics.median(p99s) / idle99
        print(f"  {name:12} p50 {statistics.median(p50s):6.3f} ({min(p50s):.3f}-{max(p50s):.3f})"
              f"  p99 {statistics.median(p99s):6.3f} ({min(p99s):.3f}-{max(p99s):.3f})"
              f"  p99/idle {ratio:4.2f}x  n={sum(map(len, rounds))}")
    print(f"  -R upload   {statistics.median(up_rates) / 2**20:7.1f} MiB/s (median of rounds)")
    print(f"  -R download {statistics.median(down_rates) / 2**20:7.1f} MiB/s (median of rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
