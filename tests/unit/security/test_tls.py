"""Fingerprints, self-signed certificates, contexts and `wstunnel keygen`."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from wstunnel.cli import main
from wstunnel.security.auth import TokenHash, token_agent, verify_token
from wstunnel.security.tls import (
    ClientTLS,
    VerifyMode,
    client_context,
    parse_fingerprint,
    pem_fingerprint,
    self_signed_certificate,
    server_context,
)


def test_fingerprint_forms() -> None:
    """sha256: with 64 hex digits, colons and case allowed on input; normalized on output."""
    hexes = "AB" * 32
    assert parse_fingerprint(f"sha256:{hexes}") == "sha256:" + "ab" * 32
    assert parse_fingerprint("SHA256:" + ":".join(["ab"] * 32)) == "sha256:" + "ab" * 32
    for bad in ("ab" * 32, "sha1:" + "ab" * 20, "sha256:" + "ab" * 31, "sha256:zz" + "a" * 62):
        with pytest.raises(ValueError, match="sha256:"):
            parse_fingerprint(bad)


def test_self_signed_certificate_covers_every_name(tmp_path: Path) -> None:
    """DNS names and IP addresses become SANs; the pair loads into a TLS 1.2+ server context."""
    key_pem, cert_pem = self_signed_certificate(["relay.example.com", "192.0.2.7", "::1"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["relay.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7"),
                                                         ipaddress.ip_address("::1")]
    (tmp_path / "c").write_bytes(cert_pem)
    (tmp_path / "k").write_bytes(key_pem)
    context = server_context(str(tmp_path / "c"), str(tmp_path / "k"))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE


def test_client_contexts_verify_unless_told_otherwise() -> None:
    """Default: verify with host names; pin and insecure turn OpenSSL's checks off."""
    assert ClientTLS().mode is VerifyMode.VERIFY
    context = client_context(ClientTLS())
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    pinned = ClientTLS(relay_fingerprint="sha256:" + "00" * 32)
    assert pinned.mode is VerifyMode.PIN and client_context(pinned).verify_mode == ssl.CERT_NONE
    assert ClientTLS(insecure_skip_verify=True).mode is VerifyMode.INSECURE


def test_keygen_writes_private_files_and_prints_the_pin(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """keygen --out: key and cert with mode 0600, the printed pin is the cert's; no overwrite."""
    out = tmp_path / "tls"
    argv = ["keygen", "--out", str(out), "--name", "relay.example.com", "--name", "127.0.0.1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    for name in ("relay.key", "relay.crt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    assert printed[0] == pem_fingerprint((out / "relay.crt").read_bytes())
    assert parse_fingerprint(printed[0]) == printed[0]
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


def test_keygen_token_prints_a_token_and_only_its_hash_for_the_relay(
        capsys: pytest.CaptureFixture[str]) -> None:
    """keygen --token: stdout is just the token (a ready token file); stderr has the relay
    entry, whose hash verifies the token and does not contain it."""
    assert main(["keygen", "--token", "ci-runner"]) == 0
    captured = capsys.readouterr()
    (token,) = captured.out.splitlines()
    assert token_agent(token) == "ci-runner"
    (hash_line,) = [line for line in captured.err.splitlines() if "token_hash:" in line]
    assert token.split(".")[1] not in captured.err
    assert verify_token(token, TokenHash.parse(hash_line.split("token_hash:")[1]))
    assert main(["keygen", "--token", "bad name"]) == 2
