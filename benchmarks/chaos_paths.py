"""Faults on the paths benchmarks/faults.py does not take: reverse forwards (-R),
unix sockets at either end, IPv6 loopback, and a proxy or balancer (haproxy with
the shipped configs/haproxy-relay.cfg, squid or tinyproxy as CONNECT proxies)
between agent and relay. Does every connection end intact, or visibly broken?

A *shape* says where the clients connect and where the destinations listen:

    L-tcp      -L 127.0.0.1:P -> 127.0.0.1:T    (clients beside the agent)
    L-unix-in  -L /dir/agent.sock -> 127.0.0.1:T
    L-unix-out -L 127.0.0.1:P -> unix:/dir/target.sock (dialled by the relay)
    L-v6       -L [::1]:P -> [::1]:T, the agent reaching the relay over [::1]
    R-tcp      -R 127.0.0.1:P -> 127.0.0.1:T    (clients at the relay's listener,
               destinations beside the agent)
    R-unix     -R /dir/relay.sock -> unix:/dir/target.sock
    R-v6       -R [::1]:P -> [::1]:T, over [::1]

and a *path* how the agent reaches the relay: ``socat`` (a TCP forwarder), or
``haproxy`` (TLS, wss://), ``squid`` or ``tinyproxy`` (CONNECT). Faults:

    path-kill      SIGKILL the path's process group, start it again 0-2 s later
    path-restart   SIGTERM it (each program's own stop), start it again 0-2 s later
    relay-stop     SIGSTOP the relay past ping interval + timeout, then SIGCONT
                   (within resume_grace when it is longer than that; past it with
                   --resume-grace 3)
    agent-kill     SIGKILL the agent, start it again 0-1 s later; the ends beside
                   it are counted as ``relay-killed`` (the kernel closed them)
    relay-kill     SIGKILL the relay, start it again 0-1 s later (likewise)

Endings are those of benchmarks/_checked.py; clean-EOF-short, corrupt and timeout
must be 0 (exit status 1 otherwise), except clean-EOF-short of an end on a unix
socket, which is how a unix socket reports a failure (docs/PROTOCOL.md 6.1: it
has no RST) and is counted apart as ``unix-EOF``.

    .venv/bin/python benchmarks/chaos_paths.py --shape R-tcp --kinds path-kill,relay-stop
    .venv/bin/python benchmarks/chaos_paths.py --shape L-v6 --path haproxy --rounds 3
    .venv/bin/python benchmarks/chaos_paths.py --shape R-unix --resume-grace 3 --kinds relay-stop
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import _checked
import _procs
import faults
import trio
from _checked import Connection, Targets
from _procs import BenchError

#: A stopped relay outlasts both ends' pings (faults.PINGS, in both configs).
FREEZE_SECONDS: Final = faults.FREEZE_SECONDS
SHAPES: Final = ("L-tcp", "L-unix-in", "L-unix-out", "L-v6", "R-tcp", "R-unix", "R-v6")
PATHS: Final = ("socat", "haproxy", "squid", "tinyproxy")
UNIX_EOF: Final = "unix-EOF"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _connectable(address: tuple[str, int] | str) -> bool:
    try:
        if isinstance(address, str):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1.0)
                sock.connect(address)
        else:
            socket.create_connection(address, 1.0).close()
    except OSError:
        return False
    return True


def _bound(address: tuple[str, int] | str) -> bool:
    """Something listens there, found without connecting: a connection to the agent's
    forward would be a channel, and its destination would see it end empty."""
    if isinstance(address, str):
        return os.path.exists(address)
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            return True
    return False


async def _wait_listening(address: tuple[str, int] | str, proc: subprocess.Popen[bytes],
                          what: str, timeout: float = 20.0, *, connect: bool = True) -> None:
    deadline = time.monotonic() + timeout
    check = _connectable if connect else _bound
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} while starting")
        if await trio.to_thread.run_sync(check, address):
            return
        await trio.sleep(0.05)
    raise BenchError(f"{what} is not listening on {address}")


class KillAwareTargets(Targets):
    """Targets whose ``relay_kills`` changes at every look for a second after a kill:
    a destination connection the dying process had dialled may be accepted (and see
    the kernel's FIN) only after the kill was counted, and is the kill's, not a lie."""

    window_end = 0.0
    _kills = 0

    @property
    def relay_kills(self) -> int:
        if time.monotonic() < self.window_end:
            self._kills += 1
        return self._kills

    @relay_kills.setter
    def relay_kills(self, value: int) -> None:
        self._kills = value


@dataclass
class Layout:
    """Addresses of one shape: where clients connect, where the targets listen."""

    shape: str
    tmp: Path
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.shape.endswith("v6"):
            self.host = "::1"
        self.reverse = self.shape.startswith("R-")
        self.client_unix = self.shape in ("L-unix-in", "R-unix")
        self.target_unix = self.shape in ("L-unix-out", "R-unix")
        self.forward_port = _free_port(self.host)

    @property
    def client_address(self) -> tuple[str, int] | str:
        if self.client_unix:
            return str(self.tmp / ("relay.sock" if self.reverse else "agent.sock"))
        return (self.host, self.forward_port)

    @property
    def client_port_host(self) -> tuple[int | str, str]:
        """client_address as _checked.run_client takes it (a unix socket: a ``str`` port)."""
        where = self.client_address
        return (where, self.host) if isinstance(where, str) else (where[1], where[0])

    @property
    def target_path(self) -> str:
        return str(self.tmp / "target.sock")

    def forward_yaml(self, target_port: int) -> list[str]:
        target = (f"unix:{self.target_path}" if self.target_unix
                  else f"{_url_host(self.host)}:{target_port}")
        where = self.client_address
        listen = where if isinstance(where, str) else f"{_url_host(self.host)}:{self.forward_port}"
        key = "reverse" if self.reverse else "listen"
        return ["forwards:", f'  - {key}: "{listen}"', f'    target: "{target}"']


@dataclass
class Middle:
    """The program between agent and relay, killed and started again by the faults."""

    kind: str
    tmp: Path
    stack: contextlib.ExitStack
    host: str
    relay_port: int
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.port = _free_port("127.0.0.1" if self.kind != "socat" else self.host)
        if self.kind == "haproxy":
            self._haproxy_files()

    def agent_yaml(self) -> list[str]:
        relay = f"{_url_host(self.host)}:{self.relay_port}"
        if self.kind == "socat":
            return [f"relay: ws://{_url_host(self.host)}:{self.port}/tunnel", "proxy: none"]
        if self.kind == "haproxy":
            return [f"relay: wss://127.0.0.1:{self.port}/tunnel", "proxy: none",
                    f"ca_file: {self.tmp / 'cert.pem'}"]
        return [f"relay: ws://{relay}/tunnel", f"proxy: http://127.0.0.1:{self.port}"]

    async def start(self) -> None:
        argv = self._argv()
        self.proc = _procs.spawn(self.stack, argv, self.tmp / f"{self.kind}.log", group=True)
        self.starts += 1
        listen_host = self.host if self.kind == "socat" else "127.0.0.1"
        await _wait_listening((listen_host, self.port), self.proc, self.kind)

    async def stop(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, sig)
        try:
            await trio.to_thread.run_sync(self.proc.wait, 10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            await trio.to_thread.run_sync(self.proc.wait)

    def _argv(self) -> list[str]:
        if self.kind == "socat":
            v6 = "6" if ":" in self.host else ""
            return ["socat", "-b", "262144",
                    f"TCP{v6}-LISTEN:{self.port},bind={_url_host(self.host)},reuseaddr,fork",
                    f"TCP{v6}:{_url_host(self.host)}:{self.relay_port}"]
        if self.kind == "haproxy":
            return ["haproxy", "-f", str(self.tmp / "haproxy.cfg"), "-db"]
        if self.kind == "squid":
            return ["squid", "-N", "-f", str(self._squid_conf())]
        return ["tinyproxy", "-d", "-c", str(self._tinyproxy_conf())]

    def _haproxy_files(self) -> None:
        key, cert = self.tmp / "key.pem", self.tmp / "cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-days", "2",
                        "-keyout", str(key), "-out", str(cert)], check=True,
                       capture_output=True)
        (self.tmp / "server.pem").write_bytes(cert.read_bytes() + key.read_bytes())
        shipped = (Path(__file__).parent.parent / "configs" / "haproxy-relay.cfg").read_text()
        relay = f"{_url_host(self.host)}:{self.relay_port}"
        for old, new in {
            "bind :443 ssl crt /etc/haproxy/relay.example.com.pem":
                f"bind 127.0.0.1:{self.port} ssl crt {self.tmp / 'server.pem'}",
            "127.0.0.1:8081": relay, "127.0.0.1:8082": relay,
            "peer haproxy1 127.0.0.1:10000": f"peer haproxy1 127.0.0.1:{_free_port('127.0.0.1')}",
        }.items():
            assert old in shipped, old
            shipped = shipped.replace(old, new)
        (self.tmp / "haproxy.cfg").write_text(shipped)

    def _squid_conf(self) -> Path:
        conf = self.tmp / "squid.conf"
        conf.write_text("\n".join([
            f"http_port 127.0.0.1:{self.port}", "pid_filename none",
            f"cache_log {self.tmp / 'squid-cache.log'}", "access_log none",
            "shutdown_lifetime 1 second", f"acl SSL_ports port {self.relay_port}",
            "acl CONNECT method CONNECT",
            "acl loopback_dst dstdomain 127.0.0.1 localhost ::1 [::1]",
            "http_access deny !loopback_dst", "http_access deny CONNECT !SSL_ports",
            "http_access allow localhost", "http_access deny all", ""]))
        if os.geteuid() == 0:
            for path in (self.tmp, conf):
                os.chown(path, *_proxy_ids())
        return conf

    def _tinyproxy_conf(self) -> Path:
        conf = self.tmp / "tinyproxy.conf"
        run_as = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
        conf.write_text(f"{run_as}Port {self.port}\nListen 127.0.0.1\nAllow 127.0.0.1\n"
                        "Timeout 600\nLogLevel Info\n")
        return conf


def _proxy_ids() -> tuple[int, int]:
    import pwd
    entry = pwd.getpwnam("proxy")
    return entry.pw_uid, entry.pw_gid


@dataclass
class Tunnel:
    """Relay, path, agent, for one shape."""

    stack: contextlib.ExitStack
    tmp: Path
    command: list[str]
    layout: Layout
    path: Middle
    targets: Targets
    target_port: int
    resume_grace: float
    relay_port: int
    relay: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    relay_stopped: bool = False
    starts: Counter[str] = field(default_factory=Counter)

    async def start(self) -> None:
        await self.start_relay()
        await self.path.start()
        await self.start_agent()

    async def start_relay(self) -> None:
        host = _url_host(self.layout.host)
        config = faults.write_config(self.tmp, "relay.yaml", [
            f'listen: "{host}:{self.relay_port}"',
            f'allow: ["127.0.0.1", "::1", "unix:{self.tmp}/*"]', "no_auth: true",
            f'listen_allow: ["127.0.0.1:{self.layout.forward_port}", '
            f'"[::1]:{self.layout.forward_port}", "unix:{self.tmp}/*"]',
            "trusted_proxies: [127.0.0.1]", *faults.relay_settings(self.resume_grace)])
        self.relay = _procs.spawn(self.stack, [*self.command, "relay", "-c", str(config)],
                                  self.tmp / "relay.log")
        self.starts["relay"] += 1
        await _wait_listening((self.layout.host, self.relay_port), self.relay, "relay")

    async def start_agent(self) -> None:
        config = faults.write_config(self.tmp, "agent.yaml", [
            *self.path.agent_yaml(), *self.layout.forward_yaml(self.target_port),
            *faults.AGENT_SETTINGS])
        self.agent = _procs.spawn(self.stack, [*self.command, "agent", "-c", str(config)],
                                  self.tmp / "agent.log")
        self.starts["agent"] += 1
        if not self.layout.reverse:
            await _wait_listening(self.layout.client_address, self.agent, "agent",
                                  connect=False)

    def stop_relay(self, stopped: bool) -> None:
        assert self.relay is not None
        os.kill(self.relay.pid, signal.SIGSTOP if stopped else signal.SIGCONT)
        self.relay_stopped = stopped

    async def kill(self, which: str) -> None:
        proc = self.agent if which == "agent" else self.relay
        assert proc is not None
        if which == "relay" and self.relay_stopped:
            self.stop_relay(False)
        proc.kill()
        await trio.to_thread.run_sync(proc.wait)

    async def mend(self) -> None:
        if self.relay_stopped:
            self.stop_relay(False)
        if self.relay is None or self.relay.poll() is not None:
            await self.start_relay()
        if self.path.proc is None or self.path.proc.poll() is not None:
            await self.path.start()
        if self.agent is None or self.agent.poll() is not None:
            await self.start_agent()

    def figures(self) -> dict[str, tuple[int, int, int]]:
        procs = {"agent": self.agent, "relay": self.relay}
        return {name: (proc.pid, _procs.vm_rss_kib(proc.pid), _procs.open_fds(proc.pid))
                for name, proc in procs.items() if proc is not None and proc.poll() is None}


# -- faults --------------------------------------------------------------------------


Fault = Callable[[Tunnel, list[Connection]], Awaitable[None]]


async def _restart_path(tunnel: Tunnel, sig: int) -> None:
    await tunnel.path.stop(sig)
    await faults.restart_after(tunnel.path.start)


async def _path_kill(tunnel: Tunnel, conns: list[Connection]) -> None:
    await _restart_path(tunnel, signal.SIGKILL)


async def _path_restart(tunnel: Tunnel, conns: list[Connection]) -> None:
    await _restart_path(tunnel, signal.SIGTERM)


async def _relay_stop(tunnel: Tunnel, conns: list[Connection]) -> None:
    tunnel.stop_relay(True)
    try:
        await trio.sleep(FREEZE_SECONDS if tunnel.resume_grace > FREEZE_SECONDS
                         else tunnel.resume_grace + FREEZE_SECONDS)
    finally:
        tunnel.stop_relay(False)


def _mark_beside(tunnel: Tunnel, conns: list[Connection], which: str) -> None:
    """The ends the kernel closes when ``which`` dies: counted as killed, not judged."""
    targets_beside = tunnel.layout.reverse == (which == "agent")
    for conn in conns:
        end = conn.target if targets_beside else conn.client
        if end.live:
            end.end(_checked.RELAY_KILLED)
    if targets_beside:
        tunnel.targets.relay_kills += 1


async def _kill_restart(tunnel: Tunnel, conns: list[Connection], which: str) -> None:
    _mark_beside(tunnel, conns, which)
    await tunnel.kill(which)
    if isinstance(tunnel.targets, KillAwareTargets) and tunnel.layout.reverse == (
            which == "agent"):
        tunnel.targets.window_end = time.monotonic() + 1.0
    await faults.restart_after(tunnel.start_agent if which == "agent" else tunnel.start_relay,
                               1.0)


async def _agent_kill(tunnel: Tunnel, conns: list[Connection]) -> None:
    await _kill_restart(tunnel, conns, "agent")


async def _relay_kill(tunnel: Tunnel, conns: list[Connection]) -> None:
    await _kill_restart(tunnel, conns, "relay")


FAULTS: Final[dict[str, Fault]] = {
    "path-kill": _path_kill, "path-restart": _path_restart, "relay-stop": _relay_stop,
    "agent-kill": _agent_kill, "relay-kill": _relay_kill,
}


# -- rounds --------------------------------------------------------------------------


async def run_round(tunnel: Tunnel, args: argparse.Namespace,
                    seeds: itertools.count[int]) -> faults.Round:
    targets = tunnel.targets
    conns = faults.new_connections(seeds, args.connections, args.max_size)
    before = targets.headerless.copy()
    done, seconds = await faults.run_connections(tunnel, targets, conns, args, FAULTS,
                                                 *tunnel.layout.client_port_host)
    _unix_eofs(tunnel.layout, conns)
    await settle(tunnel)
    headerless = targets.headerless - before
    if tunnel.layout.target_unix:
        headerless[UNIX_EOF] += headerless.pop(_checked.EOF_SHORT, 0)
    return faults.Round(conns, done, seconds, tunnel.figures(), tunnel.starts["relay"],
                        headerless)


def _unix_eofs(layout: Layout, conns: list[Connection]) -> None:
    """A clean EOF short on a unix socket end is that socket's way to fail."""
    for conn in conns:
        for end, unix in ((conn.client, layout.client_unix), (conn.target, layout.target_unix)):
            if unix and end.ending == _checked.EOF_SHORT:
                end.ending = UNIX_EOF
        # Every byte of a download arrived (each checked against the pattern), then the
        # failure as EOF; the destination died before it could say which sha256 it sent.
        if (layout.client_unix and conn.client.ending == _checked.CORRUPT
                and conn.client.error == "sha256" and conn.sent_sha256 is None):
            conn.client.ending = UNIX_EOF


async def settle(tunnel: Tunnel) -> None:
    await tunnel.mend()
    await faults.wait_intact(tunnel.targets, *tunnel.layout.client_port_host, timeout=60)


async def serve_targets(nursery: trio.Nursery, layout: Layout, targets: Targets) -> int:
    if layout.target_unix:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(layout.target_path)
        sock.listen(128)
        listeners = [trio.SocketListener(sock)]
        await nursery.start(trio.serve_listeners, targets.handle, listeners)
        return 0
    listeners = await nursery.start(
        lambda task_status: trio.serve_tcp(targets.handle, 0, host=layout.host,
                                           task_status=task_status))
    return int(listeners[0].socket.getsockname()[1])


async def run(args: argparse.Namespace, stack: contextlib.ExitStack, tmp: Path) -> int:
    targets = KillAwareTargets(args.connection_timeout)
    layout = Layout(args.shape, tmp)
    async with trio.open_nursery() as nursery:
        target_port = await serve_targets(nursery, layout, targets)
        relay_port = _free_port(layout.host)
        path = Middle(args.path, tmp, stack, layout.host, relay_port)
        tunnel = Tunnel(stack, tmp, shlex.split(args.wstunnel), layout, path, targets,
                        target_port, args.resume_grace, relay_port)
        await tunnel.start()
        await settle(tunnel)
        start = tunnel.figures()
        print(f"start: {faults._figures(start)}", flush=True)
        rounds: list[faults.Round] = []
        seeds = itertools.count(1)
        for number in range(1, args.rounds + 1):
            rounds.append(await run_round(tunnel, args, seeds))
            print(faults.report_round(number, rounds[-1]).replace(
                "relay start", "relay starts"), flush=True)
            for conn in rounds[-1].conns:
                for side, end in (("client", conn.client), ("destination", conn.target)):
                    if end.ending in (*_checked.FAILURES, _checked.TIMEOUT):
                        print(f"  {side} of {'upload' if conn.upload else 'download'} "
                              f"{conn.seed} ({conn.size} B): {end.ending} {end.error}")
            unix = sum(rounds[-1].endings(side)[UNIX_EOF] for side in ("client", "target"))
            if unix:
                print(f"  unix-EOF (a unix socket's failure) {unix}", flush=True)
        print(faults.report_total(rounds, start), flush=True)
        print(f"  starts: {dict(tunnel.starts)}, {args.path} {path.starts}", flush=True)
        nursery.cancel_scope.cancel()
    return faults.verdict(rounds, tmp)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="R-tcp")
    parser.add_argument("--path", choices=PATHS, default="socat")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--connections", type=int, default=100, help="per round (100)")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--max-size", type=int, default=4 * faults.MIB, help="bytes (4 MiB)")
    parser.add_argument("--faults", type=int, default=4, help="per round, at most (4)")
    parser.add_argument("--kinds", default="path-kill,relay-stop",
                        help=f"comma-separated, of {','.join(FAULTS)}")
    return faults.parse_run_args(parser, argv, FAULTS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = faults.seed_random(args)
    print(f"chaos_paths.py --seed {seed} --shape {args.shape} --path {args.path}: "
          f"{args.rounds} x {args.connections} connections, {args.concurrency} at once, "
          f"up to {args.faults} faults a round ({', '.join(args.kinds)}), "
          f"resume_grace {args.resume_grace:g}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="wstunnel-chaos-"))
    os.chmod(tmp, 0o755)
    return faults.run_logged("chaos_paths.py", run, args, tmp)


if __name__ == "__main__":
    sys.exit(main())
