"""Startup of ``wstunnel agent --stdio``: process start to the first byte back.

What ``ssh -o ProxyCommand='wstunnel agent ... --stdio %h:%p'`` waits for
before its handshake can even begin: the interpreter, our imports, the
WebSocket connection to the relay and the channel's OPEN. Each run starts the
agent against a running relay (a child process) and an echo target (a thread
here), writes one byte at once and times until it comes back; the figure is
the median of ``--runs`` (default 10). ``python -X importtime -m wstunnel
agent --relay ws://127.0.0.1:1/tunnel --no-proxy --stdio 127.0.0.1:1 </dev/null``
shows where the import part goes.

The children cache their bytecode, as an installed wstunnel does (pip compiles
it): where ``PYTHONDONTWRITEBYTECODE`` is set (a shared checkout), they write
it under a temporary ``PYTHONPYCACHEPREFIX`` instead, filled by the first,
untimed run; compiling every module at each start would add ~80 ms that no
user pays. To compare with another commit, unpack it (``git archive``) and run
``--wstunnel "env PYTHONPATH=/tmp/old python -P -m wstunnel"``, the current
tree the same way, interleaved (-P: not the working directory's copy).

    python benchmarks/stdio_startup.py [--runs 10] [--wstunnel "python -m wstunnel"]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _children import LOOPBACK, PYTHON_M_WSTUNNEL, relay_argv  # noqa: E402

STARTUP_TIMEOUT = 20.0


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """An echo server on LOOPBACK in a thread; yields its port."""
    server = socketserver.ThreadingTCPServer((LOOPBACK, 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def bytecode_cached() -> Iterator[dict[str, str]]:
    """The children's environment: bytecode cached, in a temporary prefix if this
    environment forbids writing it next to the sources."""
    env = dict(os.environ)
    if not env.pop("PYTHONDONTWRITEBYTECODE", None):
        yield env
        return
    with tempfile.TemporaryDirectory(prefix="stdio-startup-pyc-") as prefix:
        env["PYTHONPYCACHEPREFIX"] = prefix
        yield env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def relay(command: Sequence[str], env: dict[str, str]) -> Iterator[int]:
    """A relay child on a free loopback port; yields the port once it accepts."""
    port = _free_port()
    proc = subprocess.Popen([*command, *relay_argv(port)], stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the relay did not start on {LOOPBACK}:{port}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1):
                break
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def first_byte_seconds(command: Sequence[str], relay_port: int, echo_port: int,
                       env: dict[str, str]) -> float:
    """One run: agent start to the echoed byte, in seconds; checks a clean exit."""
    argv = [*command, "agent", "--relay", f"ws://{LOOPBACK}:{relay_port}/tunnel",
            "--no-proxy", "--stdio", f"{LOOPBACK}:{echo_port}"]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"x")
    proc.stdin.flush()
    got = proc.stdout.read(1)
    elapsed = time.perf_counter() - started
    proc.stdin.close()
    rest = proc.stdout.read()
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.wait(10)
    if got != b"x" or rest or proc.returncode != 0:
        raise SystemExit(f"bad run: got {got!r}{rest!r}, exit {proc.returncode}: "
                         f"{err.decode(errors='replace')}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--wstunnel", default=shlex.join(PYTHON_M_WSTUNNEL),
                        help="command that runs wstunnel (default: this python -m wstunnel)")
    args = parser.parse_args(argv)
    command = shlex.split(args.wstunnel)
    with bytecode_cached() as env, echo_server() as echo_port, relay(command, env) as relay_port:
        first_byte_seconds(command, relay_port, echo_port, env)  # page cache, bytecode
        times = [first_byte_seconds(command, relay_port, echo_port, env)
                 for _ in range(args.runs)]
    ms = sorted(t * 1000 for t in times)
    print(f"stdio startup to first byte, {args.runs} runs: median {statistics.median(ms):.0f} "
          f"ms, min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
