"""The load generator: each workload against one local port, blocking sockets.

Why blocking sockets and threads: this process must not be the bottleneck,
and a thread blocked in ``sendall``/``recv_into`` holds no GIL, so 16 or 50
of them cost almost nothing. Bulk data comes from one shared random block
(``_targets.send_block``), received into one reused buffer, so no workload
allocates per byte. Every socket has a timeout and every loop a deadline.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from _procs import TARGETS_SCRIPT, BenchError
from _targets import drain, read_line, send_block, tune

RTT_SIZE: Final = 64
CHURN_SIZE: Final = 100
_RTT_PAYLOAD: Final = bytes(range(RTT_SIZE))
_CHURN_PAYLOAD: Final = bytes(CHURN_SIZE)


@dataclass
class Churn:
    """Connections completed and the wall time they took."""

    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def connect(port: int) -> socket.socket:
    """A tuned TCP connection to 127.0.0.1:``port``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30.0)
    tune(sock)
    return sock


def _receive_exactly(sock: socket.socket, size: int) -> None:
    got = 0
    while got < size:
        data = sock.recv(size - got)
        if not data:
            raise BenchError(f"EOF after {got} of {size} echoed bytes")
        got += len(data)


def _upload_one(port: int, size: int) -> None:
    with connect(port) as sock:
        send_block(sock, size)
        sock.shutdown(socket.SHUT_WR)
        answer = read_line(sock)
    if answer.strip() != str(size).encode():
        raise BenchError(f"sink counted {answer.strip()!r}, expected {size}")


def bulk_upload(port: int, size: int) -> float:
    """Seconds to send ``size`` bytes to the sink and hear it counted them all."""
    start = time.perf_counter()
    _upload_one(port, size)
    return time.perf_counter() - start


def bulk_download(port: int, size: int) -> float:
    """Seconds to ask the source for ``size`` bytes and read them to EOF."""
    start = time.perf_counter()
    with connect(port) as sock:
        sock.sendall(b"%d\n" % size)
        got = drain(sock)
    if got != size:
        raise BenchError(f"source sent {got} bytes, expected {size}")
    return time.perf_counter() - start


def parallel_upload(port: int, size: int, channels: int) -> float:
    """Seconds for ``channels`` connections to upload ``size`` bytes between them."""
    share = size // channels
    start = time.perf_counter()
    with ThreadPoolExecutor(channels) as pool:
        for future in [pool.submit(_upload_one, port, share) for _ in range(channels)]:
            future.result()
    return time.perf_counter() - start


def round_trips(port: int, count: int, budget: float) -> list[float]:
    """Seconds per 64-byte echo, one outstanding, up to ``count`` or ``budget`` s."""
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    with connect(port) as sock:
        while len(samples) < count and time.perf_counter() < deadline:
            start = time.perf_counter()
            sock.sendall(_RTT_PAYLOAD)
            _receive_exactly(sock, RTT_SIZE)
            samples.append(time.perf_counter() - start)
    if len(samples) < 10:
        raise BenchError(f"only {len(samples)} round trips in {budget:.0f} s")
    return samples


def _churn_worker(port: int, count: int, deadline: float) -> int:
    done = 0
    while done < count and time.perf_counter() < deadline:
        with connect(port) as sock:
            sock.sendall(_CHURN_PAYLOAD)
            _receive_exactly(sock, CHURN_SIZE)
        done += 1
    return done


def churn(port: int, workers: int, per_worker: int, budget: float) -> Churn:
    """Connect, echo 100 B, close; ``workers`` at a time, until done or ``budget`` s."""
    deadline = time.perf_counter() + budget
    start = time.perf_counter()
    if workers == 1:
        done = _churn_worker(port, per_worker, deadline)
    else:
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(_churn_worker, port, per_worker, deadline)
                       for _ in range(workers)]
            done = sum(future.result() for future in futures)
    return Churn(done, time.perf_counter() - start)


@contextlib.contextmanager
def background_upload(port: int, report: Callable[[float], None]) -> Iterator[None]:
    """A bulk upload to the sink on another connection, in its own process.

    Its own process so that its sending never competes with the round-trip
    timer for this process's GIL. ``report`` receives its rate in bytes/s.
    """
    proc = subprocess.Popen([sys.executable, str(TARGETS_SCRIPT), "upload", "--port", str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        if proc.stdout.readline().strip() != b"ready":
            raise BenchError("background uploader failed to start")
        yield
        proc.stdin.close()
        answer = proc.stdout.readline().split()
        if len(answer) != 3:
            raise BenchError(f"background uploader failed: {answer!r}")
        sent, seconds, counted = answer
        if sent != counted:
            raise BenchError(f"background upload: sent {sent!r}, sink counted {counted!r}")
        report(int(sent) / float(seconds))
    finally:
        _reap(proc)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None and not proc.stdin.closed:
        proc.stdin.close()
    try:
        proc.wait(10.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5.0)
