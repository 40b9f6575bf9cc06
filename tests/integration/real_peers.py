"""Real nginx, haproxy, squid and tinyproxy for the traversal tests.

Each program gets a fresh directory (world-traversable: squid, tinyproxy and
nginx workers drop root), a config written from a template with ports chosen
free at test time, and is stopped by its pid in ``finally``. A program that is
not installed (or cannot start here) skips the test with the reason, never
passes it silently. Readiness is polled (an external program has no event to
wait on), bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0
PACKAGES = {"nginx": "nginx-light", "squid": "squid", "tinyproxy": "tinyproxy",
            "haproxy": "haproxy"}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def require(program: str) -> str:
    """The program's path, or skip the test saying how to install it."""
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.skip(f"{program} is not installed (apt-get install {PACKAGES[program]}; "
                    ".ci/run does this)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace each key exactly once, so a template cannot drift from its test."""
    for old, new in replacements.items():
        assert text.count(old) == 1, f"expected {old!r} exactly once in the template"
        text = text.replace(old, new)
    return text


@contextmanager
def peer_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wst-peer-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- certificates


@dataclass
class Pki:
    ca: Path  # the test CA certificate: SSL_CERT_FILE for the agent
    cert: Path  # server certificate for localhost and 127.0.0.1
    key: Path
    pem: Path  # cert + key, as haproxy wants them


def make_pki(directory: Path) -> Pki:
    """A test CA and a server certificate for localhost/127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wstunnel test CA")])
    ca = (_builder(ca_name, ca_name, ca_key.public_key(), now)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    alt = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))])
    cert = (_builder(name, ca_name, key.public_key(), now).add_extension(alt, critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pki = Pki(directory / "ca.crt", directory / "server.crt", directory / "server.key",
              directory / "server.pem")
    pki.ca.write_bytes(ca.public_bytes(pem))
    pki.cert.write_bytes(cert.public_bytes(pem))
    pki.key.write_bytes(key_pem)
    pki.pem.write_bytes(cert.public_bytes(pem) + key_pem)
    for path in (pki.key, pki.pem):
        path.chmod(0o644)  # test keys; the programs' unprivileged workers read them
    return pki


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             now: datetime.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


# ---------------------------------------------------------------- processes


def wait_listening(port: int, what: str, process: subprocess.Popen[bytes] | None = None,
                   log: Path | None = None) -> None:
    """Poll until ``port`` accepts, or skip/fail with the program's log."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            _cannot_start(what, log)
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    _cannot_start(what, log)


def _cannot_start(what: str, log: Path | None) -> None:
    text = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    pytest.skip(f"{what} could not start here: {text.strip() or 'no log'}")


def stop_pid(pid: int, timeout: float = 5.0, *, gently: bool = True) -> None:
    """SIGTERM (unless not ``gently``), SIGKILL after ``timeout``; returns when it is gone."""
    steps = ((signal.SIGTERM, timeout),) if gently else ()
    for sig, wait in (*steps, (signal.SIGKILL, timeout)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass  # not our child (a daemon): probe instead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def foreground(argv: list[str], what: str, port: int, log: Path,
               gently: bool = True) -> Iterator[None]:
    """Run a foreground program until the block ends (SIGKILL at once if not ``gently``)."""
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_listening(port, what, process, log)
        yield
    finally:
        stop_pid(process.pid, gently=gently)
        process.wait()
        _kill_group(process.pid)


def _kill_group(pgid: int) -> None:
    """Helpers the program started (squid's auth helper) share its process group."""
    with contextlib.suppress(ProcessLookupError):  # the group may already be empty
        os.killpg(pgid, signal.SIGKILL)


# ---------------------------------------------------------------- the programs


@dataclass
class Nginx:
    port: int
    directory: Path

    def error_log(self) -> str:
        return (self.directory / "error.log").read_text(errors="replace")


@contextmanager
def nginx(pki: Pki, relay_port: int, *, extra_server: str = "",
          server_settings: str = "", read_timeout: str | None = None,
          upstream: str = "") -> Iterator[Nginx]:
    """nginx running configs/nginx-relay.conf (TLS on a free port) in front of the relay.

    ``extra_server`` adds locations to the server block (e.g. a broken one);
    ``server_settings`` adds server-level directives; ``upstream``, an
    ``upstream wstunnel_relays { ... }`` block, replaces ``relay_port`` with it.
    """
    binary = require("nginx")
    port = free_port()
    relay = "wstunnel_relays" if upstream else f"{LOOPBACK}:{relay_port}"
    snippet = upstream + substitute((CONFIGS / "nginx-relay.conf").read_text(), {
        "listen 443 ssl;": f"listen {LOOPBACK}:{port} ssl;",
        "/etc/ssl/certs/relay.example.com.crt": str(pki.cert),
        "/etc/ssl/private/relay.example.com.key": str(pki.key),
        "proxy_pass http://127.0.0.1:8080;": f"proxy_pass http://{relay};",
    })
    if read_timeout is not None:
        snippet = substitute(snippet, {"proxy_read_timeout 60s;":
                                       f"proxy_read_timeout {read_timeout};"})
    snippet = substitute(snippet, {"    location /tunnel {":
                                   f"{server_settings}\n{extra_server}\n    location /tunnel {{"})
    with peer_dir() as directory:
        temp = directory / "tmp"
        temp.mkdir()
        temp.chmod(0o777)
        temps = " ".join(f"{name}_temp_path {temp}/{name};"
                         for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = directory / "nginx.conf"
        conf.write_text(
            f"daemon off; worker_processes 1; pid {directory}/nginx.pid; "
            f"error_log {directory}/error.log info;\n"
            "events { worker_connections 256; }\n"
            f"http {{ access_log {directory}/access.log; {temps}\n{snippet}\n}}\n")
        argv = [binary, "-p", str(directory), "-c", str(conf)]
        checked = subprocess.run([*argv, "-t"], capture_output=True, text=True,
                                 timeout=START_TIMEOUT)
        if checked.returncode != 0:
            pytest.fail(f"nginx rejected the config: {checked.stderr.strip()}")
        with foreground(argv, "nginx", port, directory / "nginx.log"):
            yield Nginx(port, directory)


SQUID_TEMPLATE = """\
http_port {host}:{port}
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log stdio:{dir}/access.log squid
shutdown_lifetime 1 second
auth_param basic program {helper} {dir}/passwd
acl authed proxy_auth REQUIRED
acl SSL_ports port 443 {relay_port}
acl CONNECT method CONNECT
# loopback only: a test proxy never reaches the outside (names matched, no DNS)
acl loopback_dst dstdomain 127.0.0.1 localhost
http_access deny !loopback_dst
http_access deny CONNECT !SSL_ports
http_access deny !authed
http_access allow localhost
http_access deny all
"""


@contextmanager
def squid(user: str, password: str, relay_port: int) -> Iterator[int]:
    """squid requiring Basic auth, allowing CONNECT to 443 and ``relay_port``; yields its port."""
    binary = require("squid")
    helper = "/usr/lib/squid/basic_ncsa_auth"
    if not os.path.exists(helper):
        pytest.skip(f"squid's {helper} is missing")
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to write squid's password file")
    port = free_port()
    with peer_dir() as directory:
        hashed = subprocess.run([openssl, "passwd", "-apr1", password], capture_output=True,
                                text=True, check=True).stdout.strip()
        (directory / "passwd").write_text(f"{user}:{hashed}\n")
        conf = directory / "squid.conf"
        conf.write_text(SQUID_TEMPLATE.format(host=LOOPBACK, port=port, dir=directory,
                                              helper=helper, relay_port=relay_port))
        if os.geteuid() == 0:
            shutil.chown(directory, "proxy", "proxy")
            for path in directory.iterdir():
                shutil.chown(path, "proxy", "proxy")
        # squid's clean stop takes seconds (shutdown_lifetime); nothing to keep here.
        with foreground([binary, "-N", "-f", str(conf)], "squid", port,
                        directory / "cache.log", gently=False):
            yield port


@contextmanager
def tinyproxy(user: str, password: str) -> Iterator[int]:
    """tinyproxy with Basic auth, CONNECT to any loopback port; yields its port."""
    binary = require("tinyproxy")
    port = free_port()
    with peer_dir() as directory:
        (directory / "filter").write_text("^127\\.0\\.0\\.1$\n^localhost$\n")
        run_as = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
        conf = directory / "tinyproxy.conf"
        conf.write_text(
            f"{run_as}Port {port}\nListen {LOOPBACK}\nAllow {LOOPBACK}\nTimeout 600\n"
            f"BasicAuth {user} {password}\nFilter \"{directory}/filter\"\n"
            "FilterDefaultDeny Yes\nFilterType ere\nLogLevel Info\n")
        with foreground([binary, "-d", "-c", str(conf)], "tinyproxy", port,
                        directory / "tinyproxy.log"):
            yield port


def _haproxy_config(pki: Pki, port: int, relay_ports: list[int],
                    changes: dict[str, str] | None) -> str:
    """configs/haproxy-relay.cfg with TLS on ``port``, the relays' and peer's addresses."""
    return substitute((CONFIGS / "haproxy-relay.cfg").read_text(), {
        "bind :443 ssl crt /etc/haproxy/relay.example.com.pem":
            f"bind {LOOPBACK}:{port} ssl crt {pki.pem}",
        "127.0.0.1:8081": f"{LOOPBACK}:{relay_ports[0]}",
        "127.0.0.1:8082": f"{LOOPBACK}:{relay_ports[1]}",
        "peer haproxy1 127.0.0.1:10000": f"peer haproxy1 {LOOPBACK}:{free_port()}",
        **(changes or {}),
    })


def _checked_haproxy_config(binary: str, directory: Path, config: str) -> Path:
    conf = directory / "haproxy.cfg"
    conf.write_text(config)
    checked = subprocess.run([binary, "-c", "-f", str(conf)], capture_output=True,
                             text=True, timeout=START_TIMEOUT)
    if checked.returncode != 0:
        pytest.fail(f"haproxy rejected the config: {checked.stdout}{checked.stderr}")
    return conf


@contextmanager
def haproxy(pki: Pki, relay_ports: list[int],
            changes: dict[str, str] | None = None) -> Iterator[int]:
    """haproxy running configs/haproxy-relay.cfg (TLS) in front of two relays;
    ``changes``: more text replacements (e.g. without the stickiness lines)."""
    binary = require("haproxy")
    port = free_port()
    with peer_dir() as directory:
        conf = _checked_haproxy_config(
            binary, directory, _haproxy_config(pki, port, relay_ports, changes))
        with foreground([binary, "-f", str(conf), "-db"], "haproxy", port,
                        directory / "haproxy.log"):
            yield port


@dataclass
class ReloadableHaproxy:
    """haproxy that can be reloaded as ``systemctl reload`` does: a new process
    takes over the listeners and the old one (``-sf``) finishes what it holds."""

    binary: str
    conf: Path
    port: int
    admin: Path  # the admin socket: always the newest process's
    directory: Path
    processes: list[subprocess.Popen[bytes]]

    def reload(self) -> None:
        """Start a process (the first, or one that replaces the newest)."""
        older = ["-sf", str(self.processes[-1].pid)] if self.processes else []
        log = self.directory / f"haproxy-{len(self.processes)}.log"
        with log.open("wb") as sink:
            self.processes.append(subprocess.Popen(
                [self.binary, "-f", str(self.conf), "-db", *older],
                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True))
        wait_listening(self.port, "haproxy", self.processes[-1], log)


@contextmanager
def reloadable_haproxy(pki: Pki, relay_ports: list[int]) -> Iterator[ReloadableHaproxy]:
    """configs/haproxy-relay.cfg as ``haproxy`` runs it, with an admin socket, and
    ``reload()``; every process started is stopped by its pid on the way out."""
    binary = require("haproxy")
    port = free_port()
    with peer_dir() as directory:
        admin = directory / "admin.sock"
        config = _haproxy_config(pki, port, relay_ports, {
            "\nglobal\n": f"\nglobal\n    stats socket {admin} level admin\n"})
        front = ReloadableHaproxy(binary, _checked_haproxy_config(binary, directory, config),
                                  port, admin, directory, [])
        try:
            front.reload()
            yield front
        finally:
            for process in front.processes:
                stop_pid(process.pid)
                process.wait()


SSHD = "/usr/sbin/sshd"


@contextmanager
def sshd(tmp: Path) -> Iterator[tuple[int, Path]]:
    """Our own sshd on 127.0.0.1 (key-only login as the current user); yields its port
    and the client key."""
    if not os.path.exists(SSHD) or shutil.which("ssh") is None or shutil.which("scp") is None:
        pytest.skip(f"{SSHD}, ssh or scp is not installed (apt-get install openssh-server "
                    "openssh-client)")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / key)],
                       check=True)
    (tmp / "authorized_keys").write_bytes((tmp / "client_key.pub").read_bytes())
    port = free_port()
    config = tmp / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", f"ListenAddress {LOOPBACK}", f"HostKey {tmp / 'host_key'}",
        f"PidFile {tmp / 'sshd.pid'}", f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
        "UsePAM no", "StrictModes no", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "UseDNS no", "LogLevel ERROR",
        "Subsystem sftp internal-sftp"]) + "\n")
    log = tmp / "sshd.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=log_file)
    try:
        wait_listening(port, "sshd", process, log)
        yield port, tmp / "client_key"
    finally:
        stop_pid(process.pid)
        process.wait()
