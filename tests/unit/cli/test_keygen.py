"""`wstunnel keygen --token NAME --out FILE`: a token file nobody else can read, ever."""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from wstunnel.cli import keygen, main
from wstunnel.security.auth import TokenHash, load_token, token_agent, verify_token


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0, so only the mode keygen asks for protects the file (not the test's umask)."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _hash_from(stderr: str) -> TokenHash:
    (line,) = [line for line in stderr.splitlines() if "token_hash:" in line]
    return TokenHash.parse(line.split("token_hash:")[1])


@pytest.mark.usefixtures("open_umask")
def test_token_out_writes_a_private_token_file_and_prints_only_the_relay_entry(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The file holds the token (mode 0600), stdout stays empty, stderr has the hash line
    that verifies it; the file is never overwritten without --force."""
    path = tmp_path / "laptop.token"
    assert main(["keygen", "--token", "laptop", "--out", str(path)]) == 0
    captured = capsys.readouterr()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = load_token(token_file=str(path))
    assert token is not None and token_agent(token) == "laptop"
    assert captured.out == "" and token.split(".")[1] not in captured.err
    assert str(path) in captured.err and verify_token(token, _hash_from(captured.err))
    assert main(["keygen", "--token", "laptop", "--out", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err and load_token(token_file=str(path)) == token


@pytest.mark.usefixtures("open_umask")
def test_the_token_file_is_born_with_mode_0600(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Not chmod'ed afterwards: the moment the file exists, before the token is in it, only
    its owner can read it."""
    modes_at_creation = []
    real_open = os.open

    def watching_open(path: str, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        modes_at_creation.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return fd

    monkeypatch.setattr(keygen.os, "open", watching_open)
    assert main(["keygen", "--token", "laptop", "--out", str(tmp_path / "t")]) == 0
    assert modes_at_creation == [0o600]


def test_force_replaces_a_readable_file_with_a_private_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--force over a world-readable file leaves mode 0600 and the new token."""
    path = tmp_path / "laptop.token"
    path.write_text("old\n")
    path.chmod(0o644)
    assert main(["keygen", "--token", "laptop", "--out", str(path), "--force"]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert verify_token(path.read_text().strip(), _hash_from(capsys.readouterr().err))


def test_keygen_says_what_it_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Neither --out nor --token, or an --out in a missing directory: exit 2 and one line."""
    assert main(["keygen"]) == 2
    assert "--token NAME" in capsys.readouterr().err
    assert main(["keygen", "--token", "a1", "--out", str(tmp_path / "no" / "t")]) == 2
    assert "cannot create" in capsys.readouterr().err


@pytest.mark.parametrize("days", ["0", "-5"])
def test_a_certificate_valid_for_no_day_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], days: str) -> None:
    """--days 0 made a certificate already expired, a negative one a traceback: both are
    a usage error saying what to give, and nothing is written."""
    assert main(["keygen", "--out", str(tmp_path / "c"), "--name", "relay", "--days", days]) == 2
    assert "--days: give 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_certificate_out_that_is_a_file_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--out naming a file (say, a token written before) is one line, not a traceback."""
    (tmp_path / "t").write_text("x\n")
    assert main(["keygen", "--out", str(tmp_path / "t"), "--name", "relay"]) == 2
    assert f"cannot create the directory {tmp_path / 't'}" in capsys.readouterr().err


@pytest.mark.parametrize("present", [keygen.CERT_NAME, keygen.KEY_NAME])
def test_a_lone_key_or_certificate_is_left_alone_and_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], present: str) -> None:
    """One of relay.key and relay.crt already there: nothing is written (a new key beside
    the old certificate would not match it), the error names the file that exists and
    says --force replaces both; with --force both are new and match."""
    (tmp_path / present).write_text("old\n")
    assert main(["keygen", "--out", str(tmp_path), "--name", "relay"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / present) in err and "--force replaces both" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [present]
    assert (tmp_path / present).read_text() == "old\n"
    assert main(["keygen", "--out", str(tmp_path), "--name", "relay", "--force"]) == 0
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / keygen.CERT_NAME, tmp_path / keygen.KEY_NAME)


@pytest.mark.parametrize("name", ["bad name!", "relay..example.com", "-relay", "", "a/b",
                                  "10.0.0.300", "*"])
def test_a_certificate_name_must_be_a_dns_name_or_an_ip_address(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    """A name no client could ever check against is a usage error saying what a name
    may be, and nothing is written."""
    assert main(["keygen", "--out", str(tmp_path / "c"), "--name", "relay.example.com",
                 f"--name={name}"]) == 2
    err = capsys.readouterr().err
    assert f"--name {name!r}" in err and "a DNS name or an IP address" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("name", ["relay", "relay.example.com", "*.example.com",
                                  "192.0.2.1", "2001:db8::1", "my_host.internal"])
def test_dns_names_ip_addresses_and_wildcards_make_a_certificate(
        tmp_path: Path, name: str) -> None:
    """What the certificate's names may be: DNS names (a wildcard first label too) and
    IPv4 or IPv6 addresses."""
    assert main(["keygen", "--out", str(tmp_path), "--name", name]) == 0
    assert (tmp_path / keygen.CERT_NAME).exists()


@pytest.mark.parametrize("extra", [["--name", "relay"], ["--days", "30"]])
def test_certificate_options_with_token_are_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    """--name and --days shape a certificate; with --token (which makes none) they
    would be ignored silently, so keygen says which flags go with which form."""
    out = tmp_path / "laptop.token"
    assert main(["keygen", "--token", "laptop", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert f"{extra[0]} is for a relay certificate" in err and "--token" in err
    assert not out.exists()
