"""Benchmark targets and the background uploader, run as their own processes.

Why a separate process: Python runs one thread at a time, so a target that
shared a process with the load generator or the tunnel would steal its CPU
and blur the figures. Everything here is blocking sockets and one thread per
connection: the threads spend their time inside ``recv_into``/``sendall``
with the GIL released, which is the cheapest way Python has to move bytes.

    python benchmarks/_targets.py serve
        prints one JSON line {"echo": port, "sink": port, "source": port}
        and serves until stdin closes (or SIGTERM).
    python benchmarks/_targets.py upload --port PORT
        streams bytes to a sink until stdin closes, then prints
        "<bytes> <seconds>" and exits; "ready" is printed once the first
        block is on its way.

Target protocols (all on 127.0.0.1):
    echo    sends back whatever arrives, until EOF.
    sink    counts bytes until EOF, then answers "<count>\\n" and closes.
    source  reads one line "<size>\\n", sends that many bytes and closes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import sys
import threading
import time
from typing import Final

BLOCK_SIZE: Final = 1 << 20
#: Every socket gives up after this long without progress, so nothing hangs.
IO_TIMEOUT: Final = 60.0
#: socketserver's default backlog of 5 would refuse bursts of new connections.
BACKLOG: Final = 256

_BLOCK: Final = os.urandom(BLOCK_SIZE)


def tune(sock: socket.socket) -> None:
    """Apply the socket options every benchmark socket gets."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(IO_TIMEOUT)


def send_block(sock: socket.socket, size: int) -> None:
    """Send ``size`` bytes taken from one shared random block (no copies)."""
    view = memoryview(_BLOCK)
    while size > 0:
        n = min(size, BLOCK_SIZE)
        sock.sendall(view[:n])
        size -= n


def drain(sock: socket.socket) -> int:
    """Read until EOF into one reused buffer; return the byte count."""
    buf = bytearray(BLOCK_SIZE)
    total = 0
    while n := sock.recv_into(buf):
        total += n
    return total


def read_line(sock: socket.socket, limit: int = 64) -> bytes:
    """Read one short ``\\n``-terminated line (protocol headers and answers)."""
    line = b""
    while not line.endswith(b"\n"):
        data = sock.recv(limit - len(line))
        if not data:
            break
        line += data
    return line


class _Handler(socketserver.BaseRequestHandler):
    kind = ""

    def handle(self) -> None:
        sock: socket.socket = self.request
        tune(sock)
        try:
            if self.kind == "echo":
                while data := sock.recv(65536):
                    sock.sendall(data)
            elif self.kind == "sink":
                sock.sendall(b"%d\n" % drain(sock))
            else:
                send_block(sock, int(read_line(sock)))
        except OSError as exc:
            # The client went away; the load generator reports its own side.
            print(f"{self.kind} target: {exc!r}", file=sys.stderr, flush=True)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = BACKLOG


def _start_server(kind: str) -> _Server:
    handler = type(f"_{kind.title()}Handler", (_Handler,), {"kind": kind})
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve() -> int:
    """Start the three targets, announce their ports, serve until stdin closes."""
    servers = {kind: _start_server(kind) for kind in ("echo", "sink", "source")}
    ports = {kind: server.server_address[1] for kind, server in servers.items()}
    print(json.dumps(ports), flush=True)
    sys.stdin.read()
    for server in servers.values():
        server.shutdown()
    return 0


def upload(port: int) -> int:
    """Stream to a sink until stdin closes; print bytes sent and seconds."""
    stop = threading.Event()

    def wait_for_stdin_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_stdin_eof, daemon=True).start()
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        tune(sock)
        start = time.perf_counter()
        sent = 0
        while not stop.is_set():
            send_block(sock, BLOCK_SIZE)
            sent += BLOCK_SIZE
            if sent == BLOCK_SIZE:
                print("ready", flush=True)
        elapsed = time.perf_counter() - start
        sock.shutdown(socket.SHUT_WR)
        counted = int(read_line(sock) or b"0")
    print(f"{sent} {elapsed:.6f} {counted}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")
    up = sub.add_parser("upload")
    up.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    return serve() if args.command == "serve" else upload(args.port)


if __name__ == "__main__":
    sys.exit(main())
