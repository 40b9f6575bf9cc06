"""Certificates, tokens, log watching and a fake resolver for the security tests."""

from __future__ import annotations

import datetime
import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wstunnel.config import AgentAccount, RelayTLS
from wstunnel.security.allow_rule import AllowRule
from wstunnel.security.auth import hash_token, new_token, scrypt_hash
from wstunnel.security.tls import pem_fingerprint, self_signed_certificate

UTC = datetime.timezone.utc


@dataclass
class CertFiles:
    cert: Path
    key: Path
    fingerprint: str

    @property
    def relay_tls(self) -> RelayTLS:
        return RelayTLS(str(self.cert), str(self.key))


def write_self_signed(directory: Path, stem: str, names: list[str], *, days: int = 30,
                      not_before: datetime.datetime | None = None) -> CertFiles:
    key_pem, cert_pem = self_signed_certificate(names, days=days, not_before=not_before)
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return CertFiles(cert, key, pem_fingerprint(cert_pem))


def expired_certificate(directory: Path, names: list[str]) -> CertFiles:
    """Valid for one day, ten days ago."""
    start = datetime.datetime.now(UTC) - datetime.timedelta(days=10)
    return write_self_signed(directory, "expired", names, days=1, not_before=start)


def write_ca_and_client(directory: Path, agent_name: str) -> tuple[Path, Path, Path]:
    """A CA and a client certificate with CN=agent_name it signed: (ca, cert, key)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test agents CA")])
    now = datetime.datetime.now(UTC) - datetime.timedelta(minutes=5)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "agents-ca.crt", directory / "agent.crt", directory / "agent.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def account(name: str, *rules: str, token: str | None = None,
            scrypt_n: int | None = None) -> tuple[AgentAccount, str]:
    """An agents: entry and its token: the hmac-sha256 hash keygen prints, or with
    ``scrypt_n`` an older scrypt line of that cost."""
    token = token or new_token(name)
    stored = hash_token(token) if scrypt_n is None else scrypt_hash(token, n=scrypt_n)
    return AgentAccount(name, stored, tuple(AllowRule.parse(r) for r in rules)), token


class LogWatcher(logging.Handler):
    """Collects wstunnel log lines; ``wait_for`` blocks until one contains a text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()}")
        self._changed.set()

    def matching(self, *needles: str) -> list[str]:
        return [line for line in self.lines if all(n in line for n in needles)]

    async def wait_for(self, *needles: str, count: int = 1) -> list[str]:
        while len(self.matching(*needles)) < count:
            self._changed = trio.Event()
            await self._changed.wait()
        return self.matching(*needles)


@contextmanager
def watch_logs() -> Iterator[LogWatcher]:
    watcher = LogWatcher()
    logger = logging.getLogger("wstunnel")
    old_level = logger.level
    logger.addHandler(watcher)
    logger.setLevel(logging.DEBUG)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(old_level)


class FakeResolver(trio.abc.HostnameResolver):
    """Answers chosen names with chosen addresses (or blocks), else the system resolver."""

    def __init__(self, names: dict[str, str], block: set[str] | None = None) -> None:
        self.names = names
        self.block = block or set()
        self.release = trio.Event()

    async def getaddrinfo(self, host: bytes | None | str, port: Any, family: int = 0,
                          type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name in self.block:
            await self.release.wait()
        if name in self.names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "",
                     (self.names[name], int(port)))]
        return await trio.to_thread.run_sync(socket.getaddrinfo, host, port, family, type,
                                             proto, flags)

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        return await trio.to_thread.run_sync(socket.getnameinfo, sockaddr, flags)


def install_resolver(resolver: FakeResolver) -> Callable[[], None]:
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    return lambda: trio.socket.set_custom_hostname_resolver(previous)
