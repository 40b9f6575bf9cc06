"""TLS: the only place that builds ``ssl.SSLContext`` objects; self-signed certificates.

Theory of operation
-------------------
Relay: ``server_context`` loads a certificate chain and key from files
(TLS 1.2 or newer). With a client CA it also requires a client certificate
signed by that CA; ``client_identity`` then turns the verified certificate's
subject common name into an agent name. The relay builds a fresh context on
SIGHUP and uses it for new connections only; sessions already up keep the
context (and the certificate) they were accepted with.

Agent: ``client_context`` verifies the relay in one of three ways:

* ``verify`` (default): the system CA store, or ``ca_file`` instead, with the
  host name checked against ``server_name`` (SNI and Host may differ from the
  address dialled);
* ``pin``: a SHA-256 fingerprint of the relay's leaf certificate. OpenSSL's
  chain checks are off (the certificate is usually self-signed) and
  ``check_pin`` compares the fingerprint right after the handshake, before a
  single byte of HTTP is sent. Only the fingerprint counts: expiry and names
  are not checked, exactly as with an SSH host key;
* ``insecure``: nothing is checked; callers log a warning on every connect.

``self_signed_certificate`` makes the key and certificate ``wstunnel keygen``
writes; fingerprints are printed and parsed as ``sha256:<64 hex digits>``
(colons and upper case are accepted on input).
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import hmac
import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..errors import HandshakeError
from .openssl_tuning import tune_context

__all__ = [
    "ALPN",
    "CertificateMismatch",
    "ClientTLS",
    "VerifyMode",
    "check_pin",
    "client_context",
    "client_identity",
    "describe_verify_error",
    "fingerprint",
    "parse_fingerprint",
    "pem_fingerprint",
    "self_signed_certificate",
    "server_context",
]

ALPN: Final = "http/1.1"
_FINGERPRINT: Final = re.compile(r"sha256:((?:[0-9a-f]{2}:?){31}[0-9a-f]{2})", re.IGNORECASE)


class VerifyMode(enum.Enum):
    VERIFY = "verify"
    PIN = "pin"
    INSECURE = "insecure"


class CertificateMismatch(HandshakeError):
    """The relay's certificate is not the pinned one."""


@dataclass(frozen=True)
class ClientTLS:
    """How the agent checks the relay (built from the agent config)."""

    ca_file: str | None = None
    relay_fingerprint: str | None = None  # normalized "sha256:<hex>"
    insecure_skip_verify: bool = False
    client_cert_file: str | None = None
    client_key_file: str | None = None

    @property
    def mode(self) -> VerifyMode:
        if self.insecure_skip_verify:
            return VerifyMode.INSECURE
        return VerifyMode.PIN if self.relay_fingerprint else VerifyMode.VERIFY


def fingerprint(der: bytes) -> str:
    """``sha256:<hex>`` of a DER certificate, the form the agent's pin takes."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def parse_fingerprint(text: str) -> str:
    """Normalize a pinned fingerprint to ``sha256:<64 lower-case hex>``.

    Raises:
        ValueError: not ``sha256:`` followed by 32 bytes of hex.
    """
    match = _FINGERPRINT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected sha256: followed by 64 hex digits (as `wstunnel keygen` "
                         f"prints), got {text!r}")
    return "sha256:" + match.group(1).replace(":", "").lower()


def _base_context(purpose: int) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 renegotiation would make a write wait for a read (net/tls_stream.py)
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols([ALPN])
    tune_context(context)  # read-ahead, AES-128-GCM first (openssl_tuning.py)
    return context


def server_context(cert_file: str, key_file: str, client_ca_file: str | None = None
                   ) -> ssl.SSLContext:
    """The relay's context: TLS 1.2+, certificate chain and key from files.

    Raises:
        OSError: a file is missing or unreadable.
        ssl.SSLError: the files do not hold a matching certificate and key.
    """
    context = _base_context(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca_file)
    return context


def client_context(settings: ClientTLS) -> ssl.SSLContext:
    """The agent's context for one connect, according to ``settings.mode``.

    Raises:
        OSError, ssl.SSLError: a CA, certificate or key file cannot be used.
    """
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    if settings.mode is VerifyMode.VERIFY:
        if settings.ca_file is not None:
            context.load_verify_locations(cafile=settings.ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.client_cert_file is not None:
        context.load_cert_chain(settings.client_cert_file, settings.client_key_file)
    return context


def check_pin(der: bytes | None, expected: str, where: str) -> None:
    """Compare the relay's leaf certificate with the pinned fingerprint.

    Raises:
        CertificateMismatch: naming both fingerprints.
    """
    actual = fingerprint(der) if der else "no certificate"
    if not hmac.compare_digest(actual.encode(), expected.encode()):
        raise CertificateMismatch(
            f"{where}: the relay's certificate is {actual}, but relay_fingerprint pins "
            f"{expected}; if the relay's certificate was replaced on purpose, update "
            f"relay_fingerprint, otherwise something is intercepting the connection")


def describe_verify_error(exc: ssl.SSLCertVerificationError, server_name: str) -> str:
    """One line on why the relay's certificate was not accepted, and what to do."""
    code = getattr(exc, "verify_code", None)
    message = getattr(exc, "verify_message", None) or str(exc)
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        advice = "the certificate has expired: renew it on the relay (and check both clocks)"
    elif code == 62 or "hostname mismatch" in message.lower():
        advice = (f"the certificate is not valid for {server_name!r}: set server_name to a "
                  f"name it was issued for, or issue one for this name")
    elif code in (18, 19, 20, 21):
        advice = ("the certificate is not signed by a CA we trust: set ca_file, or pin a "
                  "self-signed certificate with relay_fingerprint")
    else:
        advice = "check the relay's certificate, ca_file and server_name"
    return f"TLS: the relay's certificate was rejected ({message}) \N{EM DASH} {advice}"


def client_identity(peercert: dict[str, Any] | None) -> str | None:
    """The subject common name of a verified client certificate, if any."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def self_signed_certificate(names: Sequence[str], *, days: int = 825,
                            not_before: datetime.datetime | None = None
                            ) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a self-signed certificate for ``names`` (PEM each).

    Names that parse as IP addresses become IP subject alternative names, the
    rest DNS names; the first name is also the common name.

    Returns:
        (key PEM, certificate PEM).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
        minutes=5)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False,
                                     False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def pem_fingerprint(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of a PEM certificate (the first one in the data)."""
    return fingerprint(ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii")))
