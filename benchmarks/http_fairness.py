"""Interactive latency beside bulk data over the HTTP transports, before and after, one run.

Theory of operation: the link of benchmarks/slowlink.py (two network
namespaces, ``tbf`` on both veth ends, and with ``--delay-ms`` a middle
namespace whose frame mover holds every frame that long each way), with the
rate a flag. The relay's namespace holds three targets: an echo, a source
that sends without end (downloads) and a metering sink (uploads). For each
build (``--build NAME=COMMAND``, e.g. the working tree and a ``git archive
HEAD`` copy run with PYTHONPATH) and each transport, a fresh relay and agent
carry two workloads:

    downloads   64-byte echo round trips while --downloads bulk downloads run
    upload      the same while one bulk upload runs

and print the echo's p50/p99 and the bulk throughput (bytes that crossed:
counted by the downloads' readers, by the sink for the upload).

Run as root from the repository root (namespaces ``wshttp-a``/``-r``/``-m``;
a few minutes at most):

    git archive HEAD | (mkdir -p /tmp/wst-before && tar -x -C /tmp/wst-before)
    .venv/bin/python benchmarks/http_fairness.py --rate-mbit 32 --delay-ms 5 \\
        --build "before=env PYTHONPATH=/tmp/wst-before .venv/bin/python -m wstunnel" \\
        --build "after=.venv/bin/python -m wstunnel"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slowlink  # noqa: E402  (the link and the namespaces: one implementation)

# (namespaces of our own: slowlink.py may run beside this)
slowlink.NS_AGENT, slowlink.NS_RELAY, slowlink.NS_MID = (  # type: ignore[misc]
    "wshttp-a", "wshttp-r", "wshttp-m")
ECHO_PORT, SOURCE_PORT, SINK_PORT, RELAY_PORT = 17101, 17102, 17103, 17180
ECHO_FWD, SOURCE_FWD, SINK_FWD = 18101, 18102, 18103
BLOCK: Final = os.urandom(64 * 1024)
IO_TIMEOUT: Final = 30.0
WARMUP: Final = 2.0


def serve_targets() -> int:
    """Echo, endless source and metering sink; ``query`` on stdin prints the sink's total."""
    total = [0]
    lock = threading.Lock()

    def echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def source(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while True:
                conn.sendall(BLOCK)

    def sink(conn: socket.socket) -> None:
        buf = bytearray(65536)
        with conn, contextlib.suppress(OSError):
            while n := conn.recv_into(buf):
                with lock:
                    total[0] += n

    return slowlink.serve_and_answer({ECHO_PORT: echo, SOURCE_PORT: source, SINK_PORT: sink},
                                     lock, lambda: str(total[0]))


@contextlib.contextmanager
def tunnel(tmp: Path, command: list[str], transport: str) -> Iterator[None]:
    """A relay and an agent of ``command`` on ``transport``, stopped after."""
    relay_ns, agent_ns = slowlink.NS_RELAY, slowlink.NS_AGENT
    with contextlib.ExitStack() as stack:
        slowlink.spawn(stack, slowlink.in_ns(relay_ns, [
            *command, "relay", "--listen", f"{slowlink.ADDR_RELAY}:{RELAY_PORT}",
            "--allow", "127.0.0.1", "--no-auth", "--log-level=warning"]), tmp / "relay.log")
        slowlink.wait_listening(relay_ns, slowlink.ADDR_RELAY, RELAY_PORT)
        slowlink.spawn(stack, slowlink.in_ns(agent_ns, [
            *command, "agent", "--relay", f"ws://{slowlink.ADDR_RELAY}:{RELAY_PORT}/tunnel",
            "--transport", transport, "--log-level=warning",
            *(f"-L127.0.0.1:{fwd}:127.0.0.1:{port}" for fwd, port in
              ((ECHO_FWD, ECHO_PORT), (SOURCE_FWD, SOURCE_PORT), (SINK_FWD, SINK_PORT)))]),
            tmp / "agent.log")
        slowlink.wait_listening(agent_ns, "127.0.0.1", SINK_FWD)
        yield


@contextlib.contextmanager
def bulk(count: int, download: bool, moved: list[int]) -> Iterator[None]:
    """``count`` downloads (bytes read counted in ``moved``) or uploads, until the block ends."""
    stop = threading.Event()
    lock = threading.Lock()

    def one() -> None:
        with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", SOURCE_FWD if download else SINK_FWD), timeout=IO_TIMEOUT) as sock:
            buf = bytearray(256 * 1024)
            while not stop.is_set():
                if download:
                    n = sock.recv_into(buf)
                    if not n:
                        return
                    with lock:
                        moved[0] += n
                else:
                    sock.sendall(BLOCK)

    with slowlink.running([threading.Thread(target=one) for _ in range(count)], stop):
        yield


def workload(sink: slowlink.Sink, downloads: int, seconds: float) -> dict[str, float]:
    """Echo beside bulk: p50, p99, samples and MB/s, for downloads and for one upload."""
    out: dict[str, float] = {}
    for name, count, download in (("down", downloads, True), ("up", 1, False)):
        moved = [0]
        with bulk(count, download, moved):
            time.sleep(WARMUP)  # (every buffer on the path fills first)
            before = moved[0] if download else _sunk(sink)
            started = time.perf_counter()
            samples = slowlink.round_trips("127.0.0.1", ECHO_FWD, seconds)
            after = moved[0] if download else _sunk(sink)
            rate = (after - before) / (time.perf_counter() - started)
        out[f"{name} echo p50 ms"] = slowlink.pct(samples, .5)
        out[f"{name} echo p99 ms"] = slowlink.pct(samples, .99)
        out[f"{name} echoes"] = len(samples)
        out[f"{name} MB/s"] = rate / 1e6
        time.sleep(1.0)  # (what is still queued drains)
    return out


def _sunk(sink: slowlink.Sink) -> int:
    sink._in.write(b"query\n")  # noqa: SLF001  (the sink's protocol: one number a line)
    sink._in.flush()  # noqa: SLF001
    return int(sink._out.readline())  # noqa: SLF001


def run_all(args: argparse.Namespace, builds: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    burst = max(32, args.rate_mbit * 4)  # kbit (tbf needs rate / HZ at least)
    slowlink.TBF = f"tbf rate {args.rate_mbit}mbit burst {burst}kbit latency 10ms"  # type: ignore[misc]
    with slowlink.slow_link(args.delay_ms), contextlib.ExitStack() as stack, \
            tempfile.TemporaryDirectory(prefix="http-fairness-") as tmpname:
        tmp = Path(tmpname)
        slowlink.start_delay(stack, tmp, args.delay_ms)
        sink = slowlink.Sink(slowlink.start_targets(stack, tmp, __file__))
        for _ in range(args.repeat):
            for transport in args.transport:
                for name, command in builds.items():
                    label = f"{name} {transport}"
                    print(f"  {label} ...", file=sys.stderr, flush=True)
                    with tunnel(tmp, command, transport), slowlink.in_netns(slowlink.NS_AGENT):
                        figures = workload(sink, args.downloads, args.seconds)
                    results.setdefault(label, {}).setdefault("runs", []).append(figures)
    return {label: {key: statistics.median(run[key] for run in entry["runs"])
                    for key in entry["runs"][0]} for label, entry in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="bench", choices=["bench", "targets"])
    parser.add_argument("--rate-mbit", type=int, default=32, help="the link's rate (tbf)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added one-way delay")
    parser.add_argument("--downloads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0, help="timed part of each workload")
    parser.add_argument("--repeat", type=int, default=1, help="runs of it all (medians)")
    parser.add_argument("--transport", action="append", default=None,
                        help="polling, streaming, websocket (default: polling, streaming)")
    parser.add_argument("--build", action="append", default=None, metavar="NAME=COMMAND")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.command == "targets":
        return serve_targets()
    if os.geteuid() != 0:
        print("http_fairness.py needs root (network namespaces and tc)", file=sys.stderr)
        return 2
    args.transport = args.transport or ["polling", "streaming"]
    builds = dict(spec.split("=", 1) for spec in args.build or
                  [f"this={shlex.quote(sys.executable)} -m wstunnel"])
    results = run_all(args, {name: shlex.split(cmd) for name, cmd in builds.items()})
    print(f"link: {slowlink.TBF} both ways, {args.delay_ms:g} ms added each way; "
          f"{args.downloads} downloads or 1 upload beside 64 B echoes, {args.seconds:g} s "
          f"timed, median of {args.repeat}")
    keys = list(next(iter(results.values())))
    print("| build transport | " + " | ".join(keys) + " |")
    print("| --- " * (len(keys) + 1) + "|")
    for label, figures in results.items():
        print(f"| {label} | " + " | ".join(f"{figures[k]:.2f}" if "MB" in k else
                                           f"{figures[k]:.0f}" for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
