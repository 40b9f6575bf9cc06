"""Processes for the tunnel benchmark: targets, our own sshd + ssh -L, wstunnel.

Theory of operation: every process the benchmark needs is started here and
registered on one ``contextlib.ExitStack``, so leaving the ``with`` block (by
success, error or Ctrl-C) stops them in reverse order: the ssh client before
its sshd, the agent before its relay, the targets last. A process gets
SIGTERM, then SIGKILL if it has not exited within a few seconds.

Each way to reach the targets is a ``Route``: the local ports for the echo,
sink and source targets, and the processes whose CPU time that route costs
(agent + relay, or ssh + sshd with all its per-connection children).

socat over TLS (``--socat``) is a reference, not a competitor: a C program
whose TLS is the same OpenSSL socket path wss:// uses (one ``SSL_read`` or
``SSL_write`` per 16 KiB record), with the suite ssh's cipher matches. What
it costs per GiB is what that TLS path costs without any Python.

The relay's and the agent's command lines come from ``_children.py``, which
the integration tests use too.

Only 127.0.0.1 is used. sshd is our own: a high loopback port, its own host
key, authorized key and config in a temporary directory; the system sshd is
never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from _children import agent_argv, relay_argv

TARGETS_SCRIPT: Final = Path(__file__).with_name("_targets.py")
FORWARDER_SCRIPT: Final = Path(__file__).with_name("_forwarder.py")
#: How the benchmarks run wstunnel unless told otherwise (``--wstunnel``).
WSTUNNEL_COMMAND: Final = f"{shlex.quote(sys.executable)} -m wstunnel"
SSHD: Final = "/usr/sbin/sshd"
SSH_CIPHER: Final = "aes128-gcm@openssh.com"
#: The TLS 1.3 suite that matches SSH_CIPHER (wstunnel offers it first too).
TLS_SUITE: Final = "TLS_AES_128_GCM_SHA256"
#: socat's transfer buffer (its default, 8 KiB, would cost it a write per 8 KiB).
SOCAT_BUFFER: Final = 1024 * 1024
TARGET_KINDS: Final = ("echo", "sink", "source")
STARTUP_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 5.0
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
#: The environment of every child. `python -m` puts the working directory
#: first on sys.path, so an A/B run from a checkout with `--wstunnel "env
#: PYTHONPATH=OTHER python -m wstunnel"` would import this checkout in both
#: arms; PYTHONSAFEPATH (Python 3.11) stops that.
CHILD_ENV: Final = {**os.environ, "PYTHONSAFEPATH": "1"}


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--wstunnel``, ``--json`` and ``--keep``, as every benchmark that starts
    wstunnel's processes takes them."""
    parser.add_argument("--wstunnel", default=WSTUNNEL_COMMAND,
                        help="command running the wstunnel CLI")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the process logs in DIR")


def exit_on_sigterm(signum: int, frame: object) -> None:
    """A SIGTERM handler: leave by SystemExit, so every ``with`` block stops its
    processes on the way out (install it with ``signal.signal``)."""
    raise SystemExit(128 + signum)


class BenchError(RuntimeError):
    """A workload or a process misbehaved; the message says how."""


@dataclass
class Route:
    """One way from the load generator to the targets."""

    name: str
    ports: dict[str, int]
    pids: list[int] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    #: How many of ``pids`` (the first ones) are the client side (agent, ssh).
    clients: int = 1
    #: Workloads this route is measured on (None: all).
    workloads: frozenset[str] | None = None


def free_port() -> int:
    """A loopback port that was free a moment ago (ssh -L and -L need numbers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(roots: Sequence[int]) -> float:
    """CPU (user + system) used so far by ``roots`` and all their descendants.

    Reaped children are already in their parent's cutime/cstime and live ones
    in nobody's, so summing all four fields over the live tree counts each
    CPU second once. Children that exit unreaped in between are lost, which
    is why this is sampled around each run rather than once at the end.
    """
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = Path(f"/proc/{entry}/stat").read_text()
                fields = text.rsplit(")", 1)[1].split()
                ticks = sum(int(x) for x in fields[11:15])
                stats[int(entry)] = (int(fields[1]), ticks / _CLOCK_TICKS)
    tree = set(roots) & stats.keys()
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    return sum(stats[pid][1] for pid in tree)


def echo_check(port: int, timeout: float = STARTUP_TIMEOUT) -> None:
    """Wait until a short echo makes it through ``port`` and back."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
                sock.sendall(b"ready?\n")
                if sock.recv(16) == b"ready?\n":
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise BenchError(f"nothing echoes through 127.0.0.1:{port} after {timeout:.0f} s: {last!r}")


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait until ``proc`` accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
            return
        time.sleep(0.05)
    raise BenchError(f"{what} is not listening on 127.0.0.1:{port}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group ``proc`` leads (a forking server and its children),
    after SIGCONT in case it was stopped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_TIMEOUT)


def spawn(stack: contextlib.ExitStack, argv: Sequence[str], log: Path | None,
          *, stdin: int | None = subprocess.DEVNULL,
          env: dict[str, str] | None = None, group: bool = False) -> subprocess.Popen[bytes]:
    """Start ``argv``; it is stopped when ``stack`` closes. Output goes to ``log``
    (appended: two processes may share one). With ``group`` it leads a process
    group of its own, and the whole group is killed (a forking server's children
    would outlive their parent)."""
    out: IO[bytes] | int = subprocess.PIPE
    if log is not None:
        out = stack.enter_context(log.open("ab"))
    proc = subprocess.Popen(list(argv), stdin=stdin, stdout=out, env=env or CHILD_ENV,
                            stderr=subprocess.STDOUT if log is not None else None,
                            start_new_session=group)
    stack.callback(_stop_group if group else _stop, proc)
    return proc


def vm_rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    """How many file descriptors ``pid`` has open, from /proc/PID/fd."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def _close_then_stop(proc: subprocess.Popen[bytes]) -> None:
    """Close stdin (the polite way to stop a helper), then make sure it is gone."""
    if proc.stdin is not None:
        proc.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_TIMEOUT)
    _stop(proc)


def start_targets(stack: contextlib.ExitStack, tmp: Path) -> Route:
    """The echo/sink/source process; the "direct" route talks to it straight."""
    log = stack.enter_context((tmp / "targets.log").open("wb"))
    proc = subprocess.Popen([sys.executable, str(TARGETS_SCRIPT), "serve"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    stack.callback(_close_then_stop, proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise BenchError("the target process exited before announcing its ports")
    ports = {kind: int(port) for kind, port in json.loads(line).items()}
    return Route("direct", ports, [proc.pid], [tmp / "targets.log"])


def ensure_sshd() -> str | None:
    """Make sure /usr/sbin/sshd exists; return why ssh is skipped, or None."""
    if os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen"):
        return None
    return _apt_install(["openssh-server", "openssh-client"], lambda: os.path.exists(SSHD))


def ensure_socat() -> str | None:
    """Make sure socat is installed; return why it is skipped, or None."""
    if shutil.which("socat"):
        return None
    return _apt_install(["socat"], lambda: shutil.which("socat") is not None)


def _apt_install(packages: list[str], installed: Callable[[], bool]) -> str | None:
    what = " ".join(packages)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{what} not installed (and not root with apt-get to install it)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", *packages]
    print(f"installing {what} with apt-get ...", file=sys.stderr, flush=True)
    for step in (install, ["apt-get", "update"], install):
        done = subprocess.run(step, env=env, capture_output=True, timeout=900, check=False)
        if done.returncode == 0 and installed():
            return None
    return f"apt-get install {what} failed"


def _sshd_config(tmp: Path, port: int) -> Path:
    config = tmp / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", "AddressFamily inet",
        f"HostKey {tmp / 'host_key'}", f"PidFile {tmp / 'sshd.pid'}",
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
        "UsePAM no", "StrictModes no", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "AllowTcpForwarding yes",
        f"Ciphers {SSH_CIPHER}", "Compression no", "UseDNS no", "LogLevel ERROR",
        "MaxSessions 1000", "MaxStartups 1000",
    ]) + "\n")
    return config


def start_ssh(stack: contextlib.ExitStack, tmp: Path, targets: Route) -> Route:
    """Our own sshd on a high loopback port, and ``ssh -N -L`` to every target."""
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / key)],
                       check=True, timeout=30)
    shutil.copy(tmp / "client_key.pub", tmp / "authorized_keys")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
    sshd_port = free_port()
    config = _sshd_config(tmp, sshd_port)
    sshd = spawn(stack, [SSHD, "-D", "-e", "-f", str(config)], tmp / "sshd.log")
    wait_listening(sshd_port, sshd, "sshd")
    ports = {kind: free_port() for kind in TARGET_KINDS}
    forwards = [arg for kind in TARGET_KINDS for arg in
                ("-L", f"127.0.0.1:{ports[kind]}:127.0.0.1:{targets.ports[kind]}")]
    user = pwd.getpwuid(os.getuid()).pw_name
    ssh = spawn(stack, [
        "ssh", "-N", "-F", "/dev/null", "-c", SSH_CIPHER, "-p", str(sshd_port),
        "-i", str(tmp / "client_key"), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp / 'known_hosts'}",
        "-o", "ExitOnForwardFailure=yes", "-o", "Compression=no", "-o", "LogLevel=ERROR",
        *forwards, f"{user}@127.0.0.1",
    ], tmp / "ssh.log")
    route = Route("ssh -L", ports, [ssh.pid, sshd.pid], [tmp / "sshd.log", tmp / "ssh.log"])
    _check_route(route, ssh)
    return route


def relay_tls(command: Sequence[str], tmp: Path,
              folder: str = "tls") -> tuple[list[str], list[str]]:
    """A throwaway certificate for 127.0.0.1: (relay arguments, agent arguments).

    ``wstunnel keygen`` writes relay.crt/relay.key into ``tmp / folder`` and
    prints the pin the agent checks (``--relay-fingerprint``), as a user would
    set up a wss:// relay.
    """
    keys = tmp / folder
    done = subprocess.run([*command, "keygen", "--out", str(keys), "--name", "127.0.0.1",
                           "--force"], capture_output=True, text=True, timeout=60, check=False,
                          env=CHILD_ENV)
    pins = [line for line in done.stdout.splitlines() if line.startswith("sha256:")]
    if done.returncode != 0 or not pins:
        raise BenchError(f"wstunnel keygen failed ({done.returncode}): {done.stderr.strip()}")
    return (["--tls-cert-file", str(keys / "relay.crt"), "--tls-key-file", str(keys / "relay.key")],
            ["--relay-fingerprint", pins[0]])


def start_wstunnel(stack: contextlib.ExitStack, tmp: Path, targets: Route,
                   command: Sequence[str], relay_args: Sequence[str],
                   agent_args: Sequence[str], *, tls: bool = False,
                   transport: str | None = None) -> Route:
    """``wstunnel relay`` and ``wstunnel agent`` from the CLI, one forward per target.

    With ``tls`` the relay serves wss:// with a fresh self-signed certificate
    and the agent pins it; the route is then named "wstunnel wss://".
    ``transport`` (streaming, polling) forces the agent's transport: the route is
    then named "wstunnel ws:// streaming".
    """
    scheme = "wss" if tls else "ws"
    label = scheme if transport is None else f"{scheme}-{transport}"
    if transport is not None:
        agent_args = [*agent_args, f"--transport={transport}"]
    relay_tls_args, agent_tls_args = relay_tls(command, tmp) if tls else ([], [])
    relay_port = free_port()
    relay_log, agent_log = tmp / f"relay-{label}.log", tmp / f"agent-{label}.log"
    relay = spawn(stack, [*command, *relay_argv(relay_port, *relay_tls_args, *relay_args)],
                  relay_log)
    wait_listening(relay_port, relay, f"wstunnel relay ({scheme}://)")
    ports = {kind: free_port() for kind in TARGET_KINDS}
    forwards = [(ports[kind], targets.ports[kind]) for kind in TARGET_KINDS]
    agent = spawn(stack, [*command, *agent_argv(relay_port, forwards, *agent_tls_args,
                                                *agent_args, scheme=scheme)], agent_log)
    name = f"wstunnel {scheme}://" + ("" if transport is None else f" {transport}")
    route = Route(name, ports, [agent.pid, relay.pid], [relay_log, agent_log])
    _check_route(route, agent)
    return route


def start_socat(stack: contextlib.ExitStack, tmp: Path, targets: Route,
                command: Sequence[str]) -> Route:
    """socat over TLS, one client/server pair per target: TCP-LISTEN -> OPENSSL
    -> OPENSSL-LISTEN -> TCP (module docstring). Bulk workloads only: socat
    forks a process per connection, which is not what churn should compare."""
    keys = tmp / "socat-tls"
    relay_tls(command, tmp, keys.name)
    conf = tmp / "socat-openssl.cnf"
    conf.write_text("openssl_conf = conf\n[conf]\nssl_conf = ssl\n[ssl]\n"
                    "system_default = tls\n[tls]\nCiphersuites = " + TLS_SUITE + "\n")
    env = {**CHILD_ENV, "OPENSSL_CONF": str(conf)}
    ports = {kind: free_port() for kind in TARGET_KINDS}
    servers, clients, logs = [], [], []
    for kind in TARGET_KINDS:
        server_port = free_port()
        log = tmp / f"socat-{kind}.log"
        logs.append(log)
        server = spawn(stack, [
            "socat", "-b", str(SOCAT_BUFFER),
            f"OPENSSL-LISTEN:{server_port},bind=127.0.0.1,reuseaddr,fork,"
            f"cert={keys / 'relay.crt'},key={keys / 'relay.key'},verify=0",
            f"TCP:127.0.0.1:{targets.ports[kind]},nodelay"], log, env=env)
        wait_listening(server_port, server, f"socat TLS server ({kind})")
        client = spawn(stack, [
            "socat", "-b", str(SOCAT_BUFFER),
            f"TCP-LISTEN:{ports[kind]},bind=127.0.0.1,reuseaddr,fork,nodelay",
            f"OPENSSL:127.0.0.1:{server_port},verify=0,nodelay"], log, env=env)
        wait_listening(ports[kind], client, f"socat TLS client ({kind})")
        servers.append(server.pid)
        clients.append(client.pid)
    route = Route("socat TLS", ports, [*clients, *servers], logs, clients=len(clients),
                  workloads=frozenset({"upload", "download", "parallel"}))
    echo_check(route.ports["echo"])
    return route


def start_forwarders(stack: contextlib.ExitStack, tmp: Path, targets: Route,
                     mode: str) -> Route:
    """Two bare Python forwarders chained per target (``_forwarder.py``, ``mode``
    trio or selectors): what a tunnel of agent and relay pays with nothing on the
    wire but the bytes. Plain TCP: compare it with ws://."""
    ports = {kind: free_port() for kind in TARGET_KINDS}
    pids, logs = [], []
    for kind in TARGET_KINDS:
        log = tmp / f"forwarder-{mode}-{kind}.log"
        logs.append(log)
        middle = free_port()
        for listen, target in ((middle, targets.ports[kind]), (ports[kind], middle)):
            proc = spawn(stack, [sys.executable, str(FORWARDER_SCRIPT), mode, str(listen),
                                 str(target)], log)
            wait_listening(listen, proc, f"{mode} forwarder ({kind})")
            pids.append(proc.pid)
    route = Route(f"floor {mode}", ports, pids[1::2] + pids[0::2], logs, clients=len(pids) // 2)
    echo_check(route.ports["echo"])
    return route


def _check_route(route: Route, client: subprocess.Popen[bytes]) -> None:
    try:
        echo_check(route.ports["echo"])
    except BenchError:
        if client.poll() is not None:
            raise BenchError(f"{route.name}: client exited with status "
                             f"{client.returncode}; see {route.logs}") from None
        raise


def log_tail(route: Route, lines: int = 5) -> str:
    """The last lines of a route's logs, for an error message."""
    parts = []
    for log in route.logs:
        with contextlib.suppress(OSError):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                parts.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(parts)
