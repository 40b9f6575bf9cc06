"""UDP through the tunnel: DNS round trips, and iperf3 -u beside a TCP bulk transfer.

One agent and one relay (processes, ws:// on loopback), the agent with
``-L udp:`` forwards to a dnsmasq serving a zone written here and to an
iperf3 server (its TCP control connection through a ``-L`` on the same port
number), and a ``-L`` to the bulk sink.

* DNS: ``--queries`` (1,000) A queries, one at a time, from ``--flows`` client
  sockets in turn (each socket one flow); every one must be answered (a query
  unanswered within 1 s counts as lost and is reported). p50/p99 of the round
  trip, and the same straight to dnsmasq.
* iperf3 -u at each ``--rates`` (50, 200, 500 Mbit/s) for ``--seconds`` (3),
  while a bulk TCP upload runs through the tunnel: UDP loss and jitter as
  iperf3's server saw them, the TCP rate beside the TCP rate alone, and the
  agent's and relay's RSS before and after (the UDP queues are bounded: RSS
  should stay flat however much is dropped).

    python benchmarks/udp.py [--queries 1000] [--rates 50,200,500] [--seconds 3]

Bounded: each iperf3 run is ``--seconds`` long, each TCP measurement too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Final

from _children import PYTHON_M_WSTUNNEL, relay_argv
from _load import background_upload
from _procs import BenchError, free_port, spawn, start_targets, vm_rss_kib, wait_listening

ZONE: Final = "example.test"
ADDRESS: Final = "10.1.2.3"


def query(name: str, query_id: int) -> bytes:
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + labels + struct.pack("!HH", 1, 1)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def need(program: str, package: str) -> str:
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin")
    if path is None:
        raise BenchError(f"{program} is not installed: apt-get install {package}")
    return path


def start_dnsmasq(stack: contextlib.ExitStack, tmp: Path) -> int:
    port = free_udp_port()
    spawn(stack, [need("dnsmasq", "dnsmasq-base"), "--no-daemon", "--conf-file=/dev/null",
                  f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                  "--no-resolv", "--no-hosts", f"--address=/{ZONE}/{ADDRESS}", "--user=",
                  "--pid-file="], tmp / "dnsmasq.log")
    try:
        wait_answering(port, "dnsmasq")
    except BenchError as exc:
        raise BenchError(f"{exc}: {(tmp / 'dnsmasq.log').read_text()[-300:]}") from None
    return port


def wait_answering(port: int, what: str) -> None:
    deadline = time.monotonic() + 10
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            sock.sendto(query(f"ready.{ZONE}", 1), ("127.0.0.1", port))
            with contextlib.suppress(TimeoutError):
                sock.recv(512)
                return
    raise BenchError(f"{what} does not answer on 127.0.0.1:{port}")


def dns_round_trips(port: int, queries: int, flows: int) -> tuple[list[float], int]:
    """(round trips in seconds, queries lost) for ``queries`` one at a time."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(flows)]
    samples: list[float] = []
    lost = 0
    try:
        for sock in socks:
            sock.settimeout(1.0)
        for number in range(queries):
            sock = socks[number % flows]
            query_id = number & 0xFFFF
            start = time.perf_counter()
            sock.sendto(query(f"q{number}.{ZONE}", query_id), ("127.0.0.1", port))
            try:
                while struct.unpack_from("!H", sock.recv(512))[0] != query_id:
                    pass  # a late reply to an earlier, lost query
            except TimeoutError:
                lost += 1
                continue
            samples.append(time.perf_counter() - start)
    finally:
        for sock in socks:
            sock.close()
    return samples, lost


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def iperf3_udp(port: int, rate: int, seconds: float) -> dict[str, Any]:
    """One ``iperf3 -u`` run through ``port``; the summary of iperf3's JSON."""
    done = subprocess.run([need("iperf3", "iperf3"), "-c", "127.0.0.1", "-p", str(port), "-u",
                           "-b", f"{rate}M", "-t", str(seconds), "-l", "1400", "-J"],
                          capture_output=True, timeout=seconds + 30, check=False)
    report = json.loads(done.stdout or b"{}")
    if "error" in report or "end" not in report:
        raise BenchError(f"iperf3 failed: {report.get('error', done.stderr.decode())}")
    total: dict[str, Any] = report["end"]["sum"]
    return total


def udp_drops(metrics_port: int) -> dict[str, int]:
    """wstunnel_udp_dropped_total by reason, from a process's metrics listener."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    drops = {}
    for line in text.splitlines():
        if line.startswith("wstunnel_udp_dropped_total{"):
            reason = line.split('"')[1]
            drops[reason] = int(float(line.rsplit(" ", 1)[1]))
    return drops


def kernel_udp_drops() -> int:
    """Datagrams the kernel dropped for full receive buffers (all sockets), /proc/net/snmp."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])


def delta(after: dict[str, int], before: dict[str, int]) -> str:
    changed = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    return ", ".join(f"{k} {v}" for k, v in sorted(changed.items())) or "none"


def tcp_rate(port: int, seconds: float) -> float:
    rates: list[float] = []
    with background_upload(port, rates.append):
        time.sleep(seconds)
    return rates[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--flows", type=int, default=10)
    parser.add_argument("--rates", default="50,200,500")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        targets = start_targets(stack, tmp)
        dns = start_dnsmasq(stack, tmp)
        iperf_port = free_port()
        spawn(stack, [need("iperf3", "iperf3"), "-s", "-p", str(iperf_port), "-B", "127.0.0.1"],
              tmp / "iperf3.log")
        relay_port, dns_local, perf_local, sink_local = (free_port(), free_udp_port(),
                                                         free_port(), free_port())
        agent_metrics, relay_metrics = free_port(), free_port()
        relay = spawn(stack, [*PYTHON_M_WSTUNNEL, *relay_argv(
            relay_port, "--allow", "udp:127.0.0.1", "--metrics", f"127.0.0.1:{relay_metrics}")],
                      tmp / "relay.log")
        wait_listening(relay_port, relay, "wstunnel relay")
        agent = spawn(stack, [*PYTHON_M_WSTUNNEL, "agent", "--relay",
                              f"ws://127.0.0.1:{relay_port}/tunnel", "--no-proxy",
                              "--metrics", f"127.0.0.1:{agent_metrics}",
                              "-L", f"udp:{dns_local}:127.0.0.1:{dns}",
                              "-L", f"udp:{perf_local}:127.0.0.1:{iperf_port}",
                              "-L", f"{perf_local}:127.0.0.1:{iperf_port}",
                              "-L", f"{sink_local}:127.0.0.1:{targets.ports['sink']}"],
                      tmp / "agent.log")
        wait_listening(sink_local, agent, "the agent")
        wait_answering(dns_local, "dnsmasq through the tunnel")
        direct, direct_lost = dns_round_trips(dns, args.queries, args.flows)
        tunnel, tunnel_lost = dns_round_trips(dns_local, args.queries, args.flows)
        print(f"DNS: {args.queries} A queries one at a time from {args.flows} sockets (flows)")
        for name, samples, lost in (("direct", direct, direct_lost),
                                    ("-L udp:", tunnel, tunnel_lost)):
            print(f"  {name:8} answered {len(samples)}/{args.queries} (lost {lost})  "
                  f"p50 {pct(samples, 0.5):.3f} ms  p99 {pct(samples, 0.99):.3f} ms")
        alone = tcp_rate(sink_local, args.seconds)
        print(f"TCP bulk upload alone: {alone / 2**20:.1f} MiB/s")
        print("iperf3 -u (1400 B datagrams) beside the TCP bulk upload:")
        for rate in (int(r) for r in args.rates.split(",")):
            rss_before = vm_rss_kib(agent.pid), vm_rss_kib(relay.pid)
            drops_before = udp_drops(agent_metrics), udp_drops(relay_metrics)
            kernel_before = kernel_udp_drops()
            rates: list[float] = []
            with background_upload(sink_local, rates.append):
                udp = iperf3_udp(perf_local, rate, args.seconds)
            rss_after = vm_rss_kib(agent.pid), vm_rss_kib(relay.pid)
            loss = udp["lost_percent"]
            print(f"  {rate:4d} Mbit/s offered: delivered {rate * (1 - loss / 100):6.1f} Mbit/s"
                  f"  loss {loss:5.1f} %  jitter {udp['jitter_ms']:.3f} ms  TCP "
                  f"{rates[0] / 2**20:6.1f} MiB/s ({rates[0] / alone:4.2f}x alone)  RSS agent "
                  f"{rss_before[0] >> 10}->{rss_after[0] >> 10} MiB, relay "
                  f"{rss_before[1] >> 10}->{rss_after[1] >> 10} MiB")
            print(f"        drops: agent {delta(udp_drops(agent_metrics), drops_before[0])}; "
                  f"relay {delta(udp_drops(relay_metrics), drops_before[1])}; kernel "
                  f"receive buffers {kernel_udp_drops() - kernel_before}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
