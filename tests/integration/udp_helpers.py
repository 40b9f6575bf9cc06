"""UDP peers for the UDP tests and benchmarks: a real resolver (dnsmasq) serving a
zone the test writes, a trio UDP echo server, and DNS queries built by hand.

dnsmasq runs in the foreground with no config file, no upstream and no hosts
file: it answers ``*.example.test`` with ``ZONE_ADDRESS`` and nothing else. It
is stopped by its pid in ``finally``. Readiness is polled with a real query,
bounded by a deadline (an external program has no event to wait on).
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio

LOOPBACK = "127.0.0.1"
ZONE = "example.test"
ZONE_ADDRESS = "10.1.2.3"
START_TIMEOUT = 10.0


def require(program: str, package: str) -> str:
    """The program's path, or skip the test saying how to install it."""
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.skip(f"{program} is not installed (apt-get install {package}; .ci/run does "
                    "this)")
    return path


def free_udp_port(host: str = LOOPBACK) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_dns_port() -> int:
    """A loopback port free for UDP and for TCP: dnsmasq binds both, and a port
    free for UDP alone may be in use by one of the suite's TCP connections."""
    for _ in range(50):
        port = free_udp_port()
        with socket.socket() as tcp:
            try:
                tcp.bind((LOOPBACK, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no loopback port free for both UDP and TCP in 50 tries")


def dns_query(name: str, query_id: int) -> bytes:
    """A DNS query for ``name``'s A record (RFC 1035 4.1), recursion desired."""
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + labels + struct.pack("!HH", 1, 1)


def answer_address(reply: bytes) -> tuple[int, str | None]:
    """(query id, the first A record's address or None) of a DNS reply."""
    query_id, _flags, questions, answers = struct.unpack_from("!HHHH", reply)
    if not answers:
        return query_id, None
    # The A record's 4 bytes end the reply (one question, one answer, no extras).
    return query_id, socket.inet_ntoa(reply[-4:])


def ask(port: int, name: str, query_id: int = 1, timeout: float = 2.0) -> str | None:
    """One blocking query to 127.0.0.1:port; the address, or None on no answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(dns_query(name, query_id), (LOOPBACK, port))
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            return None
    return answer_address(reply)[1]


@contextmanager
def dnsmasq() -> Iterator[int]:
    """A running dnsmasq on 127.0.0.1; yields its UDP port."""
    program = require("dnsmasq", "dnsmasq-base")
    port = free_dns_port()
    argv = [program, "--no-daemon", "--conf-file=/dev/null", f"--port={port}",
            f"--listen-address={LOOPBACK}", "--bind-interfaces", "--no-resolv", "--no-hosts",
            f"--address=/{ZONE}/{ZONE_ADDRESS}", "--user=", "--pid-file="]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with process:  # (closes the pipe, waits)
        try:
            yield _started(process, port)
        finally:
            process.kill()


def _started(process: subprocess.Popen[bytes], port: int) -> int:
    """``port`` once dnsmasq answers there; skip when it cannot start."""
    deadline = time.monotonic() + START_TIMEOUT
    while ask(port, f"ready.{ZONE}", timeout=0.2) != ZONE_ADDRESS:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            _out, err = process.communicate()
            pytest.skip(f"dnsmasq could not start here: {err.decode().strip()}")
    return port


def forge_icmp_unreachable(flow_source: tuple[str, int], flow_destination: tuple[str, int],
                           code: int) -> None:
    """Send the ICMP (IPv4: type 3) or ICMPv6 (type 1) "destination unreachable" error,
    with ``code``, that a router or firewall sends about a UDP datagram from
    ``flow_source`` to ``flow_destination``: the kernel then reports it on the
    connected socket of ``flow_source``. Needs CAP_NET_RAW (else the test skips)."""
    v6 = ":" in flow_source[0]
    family, proto = ((socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6
                     else (socket.AF_INET, socket.IPPROTO_ICMP))
    try:
        raw = socket.socket(family, socket.SOCK_RAW, proto)
    except PermissionError:
        pytest.skip("sending a forged ICMP error needs CAP_NET_RAW (run as root)")
    udp = struct.pack("!HHHH", flow_source[1], flow_destination[1], 8, 0)
    with raw:
        if v6:  # (the kernel fills in an ICMPv6 checksum)
            inner = struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 64,
                                socket.inet_pton(family, flow_source[0]),
                                socket.inet_pton(family, flow_destination[0]))
            raw.sendto(struct.pack("!BBHI", 1, code, 0, 0) + inner + udp,
                       (flow_source[0], 0))
            return
        inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0,
                            socket.inet_aton(flow_source[0]),
                            socket.inet_aton(flow_destination[0]))
        inner = inner[:10] + struct.pack("!H", _checksum(inner)) + inner[12:]
        body = struct.pack("!BBHI", 3, code, 0, 0) + inner + udp
        icmp = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
        raw.sendto(icmp, (flow_source[0], 0))


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data`` (even length)."""
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


async def serve_udp_echo(*, host: str = LOOPBACK, prefix: bytes = b"",
                         task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Echo each datagram back to its sender (``prefix`` first); ``started(port)``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((host, 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, sender = await sock.recvfrom(70000)
            await sock.sendto(prefix + data, sender)


async def exchange(sock: trio.socket.SocketType, address: tuple[str, int], payload: bytes,
                   timeout: float = 5.0) -> bytes:
    """Send ``payload`` and wait for one datagram back (retrying: UDP may drop)."""
    with trio.fail_after(timeout):
        while True:
            await sock.sendto(payload, address)
            with trio.move_on_after(0.5):
                data: bytes = await sock.recv(70000)
                return data
