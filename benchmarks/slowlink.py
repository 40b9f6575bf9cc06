"""Fairness on a slow link: wstunnel against direct TCP and ssh -L, same link, same run.

Theory of operation: two network namespaces joined by a veth pair, with
``tc qdisc ... tbf rate 20mbit burst 32kbit latency 10ms`` on both ends, are
the bottleneck between agent and relay. The relay side holds the targets
(an echo and a metering sink), the relay and our own sshd; the agent side
holds the agent, ``ssh -N -L`` and the load generator (this process: after
starting everything it moves its own thread into the agent namespace with
setns(2), so its sockets live there). Every route crosses the same link:

    direct     load -> 10.233.0.2:target                (plain TCP, no tunnel)
    ssh -L     load -> 127.0.0.1 -> ssh ==link==> sshd -> 127.0.0.1:target
    wstunnel   load -> 127.0.0.1 -> agent ==link==> relay -> 127.0.0.1:target

Workloads, route after route: 64-byte echo round trips idle; the same while
one bulk upload runs on another connection (and that upload's share of the
link, counted by the sink, i.e. bytes that crossed); four bulk uploads at
once and each one's share. Link share = received bytes/s over the link's
20 Mbit/s (payload only, so TCP/IP headers cap it near 96 %).

``--delay-ms 20`` adds the propagation delay netem would (netem is missing
on this kernel): a third namespace in the middle, two veth pairs, and our own
frame mover holding every Ethernet frame that long in each direction, so TCP
still runs end to end and sees the real round trip. Without it the idle
round trip is ~0.1 ms and all delay under load comes from buffers.

Run as root from the repository root (creates and deletes namespaces
``wsbench-a``/``wsbench-r`` (and ``wsbench-m``), addresses 10.233.0.1-2 exist
only inside them):

    .venv/bin/python benchmarks/slowlink.py --delay-ms 20   # the issue's link, about 100 s
    .venv/bin/python benchmarks/slowlink.py                 # no added delay
    .venv/bin/python benchmarks/slowlink.py --seconds 4  # quicker, noisier
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Final

NS_AGENT: Final = "wsbench-a"
NS_RELAY: Final = "wsbench-r"
NS_MID: Final = "wsbench-m"
ADDR_AGENT: Final = "10.233.0.1"
ADDR_RELAY: Final = "10.233.0.2"
RATE_MBIT: Final = 20
LINK_BYTES_PER_S: Final = RATE_MBIT * 1_000_000 / 8
TBF: Final = f"tbf rate {RATE_MBIT}mbit burst 32kbit latency 10ms"
ECHO_PORT, SINK_PORT, RELAY_PORT, SSHD_PORT = 17001, 17002, 17080, 17022
FORWARDS: Final = {"wstunnel ws://": (18001, 18002), "ssh -L": (19001, 19002)}
SSH_CIPHER: Final = "aes128-gcm@openssh.com"
BLOCK: Final = os.urandom(64 * 1024)
CLONE_NEWNET: Final = 0x40000000
IO_TIMEOUT: Final = 30.0


class BenchError(RuntimeError):
    """A workload or a process misbehaved; the message says how."""


# -- the targets process (runs in the relay namespace) --------------------------


def serve_targets() -> int:
    """Echo and metering sink on 0.0.0.0; ``query`` on stdin prints byte totals per tag."""
    totals: dict[str, int] = {}
    lock = threading.Lock()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def sink(conn: socket.socket) -> None:
        with conn:
            tag = b""
            while not tag.endswith(b"\n"):
                piece = conn.recv(1)
                if not piece:
                    return
                tag += piece
            name = tag.decode().strip()
            buf = bytearray(65536)
            while n := conn.recv_into(buf):
                with lock:
                    totals[name] = totals.get(name, 0) + n

    return serve_and_answer({ECHO_PORT: echo, SINK_PORT: sink}, lock,
                            lambda: json.dumps(totals))


def serve_and_answer(handlers: dict[int, Callable[[socket.socket], None]],
                     lock: threading.Lock, answer: Callable[[], str]) -> int:
    """Serve each port (on 0.0.0.0, a thread per connection) with its handler; print
    ``ready``, then ``answer()`` (under ``lock``) to each ``query`` line on stdin."""
    for port, handler in handlers.items():
        threading.Thread(target=_accept, args=(port, handler), daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "query":
            with lock:
                print(answer(), flush=True)
    return 0


def _accept(port: int, handler: Callable[[socket.socket], None]) -> None:
    server = socket.create_server(("0.0.0.0", port), backlog=64)
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


# -- namespaces and processes ------------------------------------------------------


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, timeout=30, capture_output=True)


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@contextlib.contextmanager
def slow_link(delay_ms: float) -> Iterator[None]:
    """Create the namespaces, the veth pair(s) and tbf on both ends; always delete.

    With a delay, a third namespace sits in the middle: two veth pairs and
    our own frame mover (``delay`` below), which holds every Ethernet frame
    ``delay_ms`` in each direction. Agent and relay still share one subnet.
    """
    namespaces = [NS_AGENT, NS_RELAY] + ([NS_MID] if delay_ms else [])
    if delay_ms and not shutil.which("ethtool"):
        raise BenchError("--delay-ms needs ethtool (apt-get install ethtool) to turn off "
                         "checksum offload on the veth ends")
    try:
        for ns in namespaces:
            run("ip", "netns", "add", ns)
        if delay_ms:
            run("ip", "link", "add", "wsb0", "netns", NS_AGENT, "type", "veth",
                "peer", "name", "wsm0", "netns", NS_MID)
            run("ip", "link", "add", "wsb1", "netns", NS_RELAY, "type", "veth",
                "peer", "name", "wsm1", "netns", NS_MID)
            for dev in ("wsm0", "wsm1"):
                run("ip", "-n", NS_MID, "link", "set", dev, "promisc", "on", "up")
        else:
            run("ip", "link", "add", "wsb0", "netns", NS_AGENT, "type", "veth",
                "peer", "name", "wsb1", "netns", NS_RELAY)
        for ns, dev, addr in ((NS_AGENT, "wsb0", ADDR_AGENT), (NS_RELAY, "wsb1", ADDR_RELAY)):
            run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                *TBF.split())
            if delay_ms:  # frames read by the mover must carry real checksums
                run("ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off")
        yield
    finally:
        for ns in namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                  text=True, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 15)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def serve_delay(left: str, right: str, delay: float) -> int:
    """Move Ethernet frames between two interfaces, holding each ``delay`` s.

    The propagation delay netem would add: frames keep their order, TCP sees
    the longer round trip end to end (nothing terminates the connection).
    """
    socks = {}
    for dev in (left, right):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        sock.bind((dev, 0))
        socks[dev] = sock

    def move(source: str, target: str) -> None:
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        ready = threading.Condition()

        def sender() -> None:
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, frame = queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with contextlib.suppress(OSError):
                    socks[target].send(frame)

        threading.Thread(target=sender, daemon=True).start()
        while True:
            frame, address = socks[source].recvfrom(65536)
            if address[2] == socket.PACKET_OUTGOING:
                continue  # our own transmission on this interface
            with ready:
                queue.append((time.monotonic() + delay, frame))
                ready.notify()

    threading.Thread(target=move, args=(right, left), daemon=True).start()
    move(left, right)
    return 0


def spawn(stack: contextlib.ExitStack, argv: Sequence[str], log: Path,
          **kwargs: object) -> subprocess.Popen[bytes]:
    out = stack.enter_context(log.open("wb"))
    # PYTHONSAFEPATH: see _procs.CHILD_ENV (A/B runs must import what --wstunnel says)
    proc = subprocess.Popen(list(argv), stdout=kwargs.pop("stdout", out),  # type: ignore[call-overload]
                            stderr=out, env={**os.environ, "PYTHONSAFEPATH": "1"}, **kwargs)
    stack.callback(_stop, proc)
    return proc  # type: ignore[no-any-return]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_delay(stack: contextlib.ExitStack, tmp: Path, delay_ms: float) -> None:
    """The frame mover of slow_link(delay_ms) in the middle namespace (none without delay)."""
    if delay_ms:
        spawn(stack, in_ns(NS_MID, [sys.executable, __file__, "delay",
                                    "--delay-ms", str(delay_ms)]), tmp / "delay.log")


def start_targets(stack: contextlib.ExitStack, tmp: Path,
                  script: str = __file__) -> subprocess.Popen[bytes]:
    """``script targets`` in the relay namespace (this file's, or another benchmark's)."""
    proc = spawn(stack, in_ns(NS_RELAY, [sys.executable, script, "targets"]),
                 tmp / "targets.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise BenchError("the targets process did not start")
    return proc


def start_wstunnel(stack: contextlib.ExitStack, tmp: Path, command: list[str],
                   extra: list[str]) -> None:
    spawn(stack, in_ns(NS_RELAY, [*command, "relay", "--listen", f"{ADDR_RELAY}:{RELAY_PORT}",
                                  "--allow", "127.0.0.1", "--no-auth", *extra]),
          tmp / "relay.log")
    try:
        wait_listening(NS_RELAY, ADDR_RELAY, RELAY_PORT)
    except BenchError as exc:
        log = (tmp / "relay.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{exc}; the relay's last log lines: {' | '.join(log)}") from None
    echo, sink = FORWARDS["wstunnel ws://"]
    spawn(stack, in_ns(NS_AGENT, [
        *command, "agent", "--relay", f"ws://{ADDR_RELAY}:{RELAY_PORT}/tunnel",
        "-L", f"127.0.0.1:{echo}:127.0.0.1:{ECHO_PORT}",
        "-L", f"127.0.0.1:{sink}:127.0.0.1:{SINK_PORT}", *extra]), tmp / "agent.log")


def start_ssh(stack: contextlib.ExitStack, tmp: Path) -> bool:
    if not (os.path.exists("/usr/sbin/sshd") and shutil.which("ssh")):
        print("ssh -L skipped: OpenSSH is not installed (benchmarks/tunnel.py installs it)",
              file=sys.stderr)
        return False
    for key in ("host_key", "client_key"):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / key))
    shutil.copy(tmp / "client_key.pub", tmp / "authorized_keys")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    config = tmp / "sshd_config"
    config.write_text("\n".join([
        f"Port {SSHD_PORT}", f"ListenAddress {ADDR_RELAY}", f"HostKey {tmp / 'host_key'}",
        f"PidFile {tmp / 'sshd.pid'}", f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
        "UsePAM no", "StrictModes no", "PasswordAuthentication no",
        "PermitRootLogin prohibit-password", "AllowTcpForwarding yes",
        f"Ciphers {SSH_CIPHER}", "Compression no", "UseDNS no", "LogLevel ERROR"]) + "\n")
    spawn(stack, in_ns(NS_RELAY, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)]),
          tmp / "sshd.log")
    wait_listening(NS_RELAY, ADDR_RELAY, SSHD_PORT)
    echo, sink = FORWARDS["ssh -L"]
    spawn(stack, in_ns(NS_AGENT, [
        "ssh", "-N", "-F", "/dev/null", "-c", SSH_CIPHER, "-p", str(SSHD_PORT),
        "-i", str(tmp / "client_key"), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp / 'known_hosts'}",
        "-o", "ExitOnForwardFailure=yes", "-o", "Compression=no",
        "-L", f"127.0.0.1:{echo}:127.0.0.1:{ECHO_PORT}",
        "-L", f"127.0.0.1:{sink}:127.0.0.1:{SINK_PORT}", f"root@{ADDR_RELAY}"]),
        tmp / "ssh.log")
    return True


def wait_listening(ns: str, host: str, port: int, timeout: float = 20.0) -> None:
    probe = f"import socket; socket.create_connection(({host!r}, {port}), 1).close()"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(in_ns(ns, [sys.executable, "-c", probe]), capture_output=True,
                          check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise BenchError(f"nothing listens on {host}:{port} in {ns}")


def enter_netns(ns: str) -> None:
    """Move this thread (and the threads it starts later) into ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
    finally:
        os.close(fd)


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """This thread (and the threads it starts) in ``ns`` until the block ends."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        enter_netns(ns)
        yield
    finally:
        ctypes.CDLL(None).setns(home, CLONE_NEWNET)
        os.close(home)


@contextlib.contextmanager
def running(threads: list[threading.Thread], stop: threading.Event) -> Iterator[None]:
    """``threads`` started, then told to ``stop`` and joined when the block ends."""
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(IO_TIMEOUT + 5)


# -- workloads (run inside the agent namespace) -----------------------------------


class Sink:
    """Byte totals per tag, read from the targets process (the far side of the link)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._in: IO[bytes] = proc.stdin  # type: ignore[assignment]
        self._out: IO[bytes] = proc.stdout  # type: ignore[assignment]

    def totals(self) -> dict[str, int]:
        self._in.write(b"query\n")
        self._in.flush()
        result: dict[str, int] = json.loads(self._out.readline())
        return result


@contextlib.contextmanager
def uploads(host: str, port: int, tags: list[str]) -> Iterator[None]:
    """One thread per tag streaming to the sink until the block ends."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def upload(tag: str) -> None:
        try:
            with socket.create_connection((host, port), timeout=IO_TIMEOUT) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(tag.encode() + b"\n")
                while not stop.is_set():
                    sock.sendall(BLOCK)
        except OSError as exc:
            errors.append(exc)

    with running([threading.Thread(target=upload, args=(tag,)) for tag in tags], stop):
        yield
    if errors:
        raise BenchError(f"upload failed: {errors[0]!r}")


def round_trips(host: str, port: int, seconds: float) -> list[float]:
    payload = bytes(range(64))
    samples: list[float] = []
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < 64:
                data = sock.recv(64 - got)
                if not data:
                    raise BenchError("echo closed the connection")
                got += len(data)
            samples.append(time.perf_counter() - start)
    return samples


def settle(sink: Sink, quiet: float = 0.5, timeout: float = 30.0) -> None:
    """Wait until the sink stops receiving: data of finished uploads still
    queued in socket buffers and tunnels must not count for the next workload."""
    deadline = time.monotonic() + timeout
    last = sum(sink.totals().values())
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = sum(sink.totals().values())
        if now == last:
            return
        last = now


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(route: str, host: str, ports: tuple[int, int], sink: Sink,
            seconds: float) -> dict[str, float]:
    echo, sink_port = ports
    out: dict[str, float] = {}
    idle = round_trips(host, echo, min(seconds, 3.0))
    out["echo idle p50 [ms]"], out["echo idle p99 [ms]"] = pct(idle, 0.5), pct(idle, 0.99)
    tag = f"{route}/bulk"
    with uploads(host, sink_port, [tag]):
        time.sleep(1.5)  # let every buffer on the path fill before timing
        before = sink.totals().get(tag, 0)
        start = time.perf_counter()
        loaded = round_trips(host, echo, seconds)
        rate = (sink.totals().get(tag, 0) - before) / (time.perf_counter() - start)
    out["echo under 1 bulk upload p50 [ms]"] = pct(loaded, 0.5)
    out["echo under 1 bulk upload p99 [ms]"] = pct(loaded, 0.99)
    out["  p99 minus idle p50 [ms]"] = out["echo under 1 bulk upload p99 [ms]"] - \
        out["echo idle p50 [ms]"]
    out["bulk share of the link [%]"] = 100 * rate / LINK_BYTES_PER_S
    settle(sink)
    tags = [f"{route}/four{i}" for i in range(4)]
    with uploads(host, sink_port, tags):
        time.sleep(1.5)
        before = sink.totals()
        time.sleep(seconds)
        after = sink.totals()
    moved = [after.get(t, 0) - before.get(t, 0) for t in tags]
    total = sum(moved) or 1
    shares = [100 * m / total for m in moved]
    out["4 bulk uploads: aggregate share of the link [%]"] = 100 * total / seconds / \
        LINK_BYTES_PER_S
    out["4 bulk uploads: smallest share [%]"] = min(shares)
    out["4 bulk uploads: largest share [%]"] = max(shares)
    settle(sink)
    return out


def table(results: dict[str, dict[str, float]]) -> str:
    routes = list(results)
    labels = list(next(iter(results.values())))
    lines = ["| workload | " + " | ".join(routes) + " | wstunnel/ssh |",
             "| --- " * (len(routes) + 2) + "|"]
    for label in labels:
        cells = [f"{results[r][label]:.1f}" for r in routes]
        ours, ssh = results.get("wstunnel ws://", {}).get(label), \
            results.get("ssh -L", {}).get(label)
        ratio = f"{ours / ssh:.2f}x" if ours is not None and ssh else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="bench",
                        choices=["bench", "targets", "delay"])
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="one-way delay added in a middle namespace (e.g. 20)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed part of each workload")
    parser.add_argument("--wstunnel", default=f"{shlex.quote(sys.executable)} -m wstunnel")
    parser.add_argument("--tunnel-arg", action="append", default=None,
                        help="extra argument for agent and relay (default --log-level=warning)")
    parser.add_argument("--no-ssh", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.command == "targets":
        return serve_targets()
    if args.command == "delay":
        return serve_delay("wsm0", "wsm1", args.delay_ms / 1000)
    if os.geteuid() != 0:
        print("slowlink.py needs root (network namespaces and tc)", file=sys.stderr)
        return 2
    extra = args.tunnel_arg if args.tunnel_arg is not None else ["--log-level=warning"]
    results: dict[str, dict[str, float]] = {}
    with slow_link(args.delay_ms), contextlib.ExitStack() as stack, \
            tempfile.TemporaryDirectory(prefix="slowlink-") as tmpname:
        tmp = Path(tmpname)
        start_delay(stack, tmp, args.delay_ms)
        sink = Sink(start_targets(stack, tmp))
        start_wstunnel(stack, tmp, shlex.split(args.wstunnel), extra)
        routes = {"direct": (ADDR_RELAY, (ECHO_PORT, SINK_PORT)),
                  "wstunnel ws://": ("127.0.0.1", FORWARDS["wstunnel ws://"])}
        if not args.no_ssh and start_ssh(stack, tmp):
            routes["ssh -L"] = ("127.0.0.1", FORWARDS["ssh -L"])
        with in_netns(NS_AGENT):
            for name, (host, ports) in routes.items():
                wait_port(host, ports[0])
                print(f"  {name} ...", file=sys.stderr, flush=True)
                results[name] = measure(name.split()[0], host, ports, sink, args.seconds)
    delay = f"{args.delay_ms:g} ms delay each way" if args.delay_ms else "no added delay"
    print(f"link: veth, {TBF} on both ends, {delay}; {args.seconds:g} s per timed part")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), 1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
