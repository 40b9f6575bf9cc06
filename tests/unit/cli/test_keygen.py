"""`wstunnel keygen --token NAME --out FILE`: a token file nobody else can read, ever."""

from __future__ import annotations

import os
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
