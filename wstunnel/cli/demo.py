"""``wstunnel demo``: a relay, an agent and two targets in one process.

It shows what the tunnel is for: a bulk upload through one channel while an
interactive echo runs through another, and what that does (or does not do) to
the echo's round trip. The sink target answers each upload with its byte count
and SHA-256 after the uploader's half-close, so the report also proves the
bytes arrived intact and that half-close travels through the tunnel.
"""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
import sys
from functools import partial
from typing import Any, Final, TextIO

import trio

from ..agent import run_agent
from ..config import demo_configs
from ..relay import run_relay

__all__ = ["run_demo"]

log = logging.getLogger("wstunnel.demo")

ECHO_SIZE = 64
BLOCK = 256 * 1024


async def _echo_target(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def _sink_target(stream: trio.SocketStream) -> None:
    """Count and hash until EOF, then answer "<count> <sha256>"."""
    digest = hashlib.sha256()
    count = 0
    async with stream:
        async for data in stream:
            digest.update(data)
            count += len(data)
        await stream.send_all(f"{count} {digest.hexdigest()}\n".encode())


async def _serve(handler: Any, nursery: trio.Nursery) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def _round_trips(port: int, count: int, stop: trio.Event | None = None) -> list[float]:
    """64-byte echoes through the tunnel, one at a time; seconds each."""
    samples: list[float] = []
    payload = os.urandom(ECHO_SIZE)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        while len(samples) < count and not (stop is not None and stop.is_set()):
            start = trio.current_time()
            await stream.send_all(payload)
            got = 0
            while got < ECHO_SIZE:
                got += len(await stream.receive_some(ECHO_SIZE - got))
            samples.append(trio.current_time() - start)
            if stop is not None:
                await trio.sleep(0.005)
    return samples


class _Progress:
    """One line, redrawn in place on a terminal, every quarter otherwise."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self._last_quarter = -1

    def show(self, done: int, elapsed: float) -> None:
        fraction = done / self.total if self.total else 1.0
        rate = done / elapsed / 1e6 if elapsed > 0 else 0.0
        if self.tty:
            bar = "#" * int(fraction * 30)
            self.out.write(f"\r  upload [{bar:<30}] {fraction:6.1%}  {rate:7.1f} MB/s")
            self.out.flush()
        elif int(fraction * 4) > self._last_quarter:
            self._last_quarter = int(fraction * 4)
            self.out.write(f"  upload {fraction:6.1%}  {rate:7.1f} MB/s\n")
            self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")


async def _upload(port: int, size: int, progress: _Progress) -> tuple[float, bool]:
    """Send ``size`` random bytes, half-close, check the sink's answer."""
    block = os.urandom(BLOCK)
    digest = hashlib.sha256()
    start = trio.current_time()
    sent = 0
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        while sent < size:
            piece = block[: min(BLOCK, size - sent)]
            await stream.send_all(piece)
            digest.update(piece)
            sent += len(piece)
            progress.show(sent, trio.current_time() - start)
        await stream.send_eof()
        answer = b""
        while not answer.endswith(b"\n"):
            data = await stream.receive_some(256)
            if not data:
                break
            answer += data
    elapsed = trio.current_time() - start
    progress.finish()
    return elapsed, answer.decode().split() == [str(size), digest.hexdigest()]


def _ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _demo(size: int, out: TextIO) -> bool:
    async with trio.open_nursery() as targets:
        echo_port = await _serve(_echo_target, targets)
        sink_port = await _serve(_sink_target, targets)
        async with trio.open_nursery() as roles:  # returns once relay and agent have drained
            stop = trio.Event()
            intact = await _run_roles(roles, stop, echo_port, sink_port, size, out)
            stop.set()
        targets.cancel_scope.cancel()
    return intact


async def _run_roles(nursery: trio.Nursery, stop: trio.Event, echo_port: int, sink_port: int,
                     size: int, out: TextIO) -> bool:
    """Start relay and agent, push the traffic, print the report."""
    relay_config, _ = demo_configs(echo_port, sink_port)
    bound = await nursery.start(
        lambda task_status: run_relay(relay_config, shutdown=stop, task_status=task_status)
    )
    relay_port = bound[0][1]
    _, agent_config = demo_configs(echo_port, sink_port, relay_port=relay_port)
    forwards = await nursery.start(
        lambda task_status: run_agent(agent_config, shutdown=stop, task_status=task_status)
    )
    echo_local, sink_local = forwards[0][0][1], forwards[1][0][1]
    out.write(
        f"relay on 127.0.0.1:{relay_port}, agent forwards 127.0.0.1:{echo_local} -> echo, "
        f"127.0.0.1:{sink_local} -> sink\n"
    )
    out.write("measuring idle round trips (200 x 64 B)...\n")
    idle = await _round_trips(echo_local, 200)
    out.write(f"uploading {size / 2**20:.0f} MiB through one channel while another echoes:\n")
    loaded: list[float] = []
    done = trio.Event()

    async def echo_under_load() -> None:
        loaded.extend(await _round_trips(echo_local, 100000, stop=done))

    async with trio.open_nursery() as load:
        load.start_soon(echo_under_load)
        elapsed, intact = await _upload(sink_local, size, _Progress(size, out))
        done.set()
    _report(out, size, elapsed, intact, idle, loaded)
    return intact


def _report(
    out: TextIO, size: int, elapsed: float, intact: bool, idle: list[float], loaded: list[float]
) -> None:
    out.write("\n")
    out.write(
        f"  throughput      {size / elapsed / 1e6:8.1f} MB/s ({size / 2**20:.0f} MiB in "
        f"{elapsed:.2f} s), sha256 {'matches' if intact else 'DOES NOT MATCH'}\n"
    )
    out.write(f"  echo idle       p50 {_ms(idle, 0.5):7.2f} ms   p99 {_ms(idle, 0.99):7.2f} ms\n")
    if loaded:
        out.write(
            f"  echo under load p50 {_ms(loaded, 0.5):7.2f} ms   p99 {_ms(loaded, 0.99):7.2f} ms"
            f"   ({len(loaded)} samples, mean {statistics.fmean(loaded) * 1000:.2f} ms)\n"
        )
    out.write("  channels used   3 over one WebSocket (idle echo, echo under load, upload)\n")
    out.write(_AFTERWORD)


#: How the report ends: what the figures mean, then the same tunnel by hand.
_AFTERWORD: Final = """
What the figures mean:
  throughput       one connection's bytes through agent and relay, all on this machine;
                   across a network the link and its round trip set the limit instead
  echo idle        what the tunnel adds to a round trip: two more hops (agent, relay)
  echo under load  the same while the upload fills the WebSocket; close to idle means a
                   bulk transfer does not hold up interactive channels (fair scheduling)
  channels used    TCP connections carried over the one WebSocket session

Try it by hand, each command in its own terminal:
  wstunnel relay --listen 8080 --no-auth --allow 127.0.0.1
  wstunnel agent --relay ws://127.0.0.1:8080/tunnel -L 2222:127.0.0.1:22 -L 8081:127.0.0.1:8000
  ssh -p 2222 localhost                  # this machine's sshd, through the tunnel
  python3 -m http.server 8000            # then: curl http://127.0.0.1:8081/
Other kinds of forward, added to the same agent command:
  -D 1080                          # a SOCKS5/HTTP proxy: curl --socks5-hostname 127.0.0.1:1080 URL
  -R 9022:127.0.0.1:22             # the relay listens on 9022 (relay: --listen-allow ...:9022)
  -L /tmp/db.sock:unix:/run/db.sock  # unix sockets at either end (relay: --allow unix:/run/db.sock)
  --stdio HOST:PORT                # for ssh: -o ProxyCommand='wstunnel agent ... --stdio %h:%p'
Next: README "Quick start by hand" for tokens and wss://; `wstunnel COMMAND --help`.
"""


async def run_demo(size: int = 64 * 2**20, out: TextIO | None = None) -> int:
    """Run the demo; return the process exit code (0 when the bytes arrived intact)."""
    logging.getLogger("wstunnel").setLevel(max(logging.WARNING, logging.getLogger().level))
    stream = out if out is not None else sys.stdout
    stream.write("demo: everything on 127.0.0.1; the relay runs without authentication "
                 "(no_auth), which only a loopback demo should do\n")
    relay_log = logging.getLogger("wstunnel.relay")
    relay_log.addFilter(_said_above)
    try:
        intact = await _demo(size, stream)
    finally:
        relay_log.removeFilter(_said_above)
    return 0 if intact else 1


def _said_above(record: logging.LogRecord) -> bool:
    """Drop the relay's no_auth warning: the demo's first line says it."""
    return not str(record.msg).startswith("no_auth:")
