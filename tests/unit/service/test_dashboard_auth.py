"""Basic auth for the metrics listener: the file's forms, and what a header must hold."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from wstunnel.errors import ConfigError
from wstunnel.service.dashboard_auth import BasicAuth


def _basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


FILE = ("# who may look\n\nops:plain secret\n"
        f"viewer:sha256:{hashlib.sha256(b'hashed pw').hexdigest()}\n")


def test_plain_and_hashed_passwords_let_their_user_in() -> None:
    """A `user:password` line and a `user:sha256:HEX` line each admit their user with
    the right password (comments and blank lines skipped); the scheme is case-blind."""
    auth = BasicAuth.parse(FILE)
    assert auth.allows(_basic("ops", "plain secret"))
    assert auth.allows(_basic("viewer", "hashed pw"))
    assert auth.allows(b"basic " + base64.b64encode(b"ops:plain secret"))


@pytest.mark.parametrize("header", [
    None, b"", _basic("ops", "wrong"), _basic("viewer", "plain secret"),
    _basic("nobody", "plain secret"), _basic("ops", "plain secret")[:-2],
    b"Bearer " + base64.b64encode(b"ops:plain secret"), b"Basic !!!not base64",
    b"Basic " + base64.b64encode(b"ops"),
    # the hash itself is not the password
    _basic("viewer", f"sha256:{hashlib.sha256(b'hashed pw').hexdigest()}"),
])
def test_anything_else_is_refused(header: bytes | None) -> None:
    """No header, a wrong password, another user's password, an unknown user, a
    broken or non-Basic header, or the stored hash as password: refused."""
    assert not BasicAuth.parse(FILE).allows(header)


def test_a_bad_line_is_located(tmp_path: Path) -> None:
    """A line without `user:password` is an error naming the file and the line."""
    path = tmp_path / "auth"
    path.write_text("ops:x\nno colon here\n")
    with pytest.raises(ConfigError, match=r"auth:2: metrics_auth_file: expected user:password"):
        BasicAuth.load(str(path))


def test_an_empty_or_missing_file_says_what_to_do(tmp_path: Path) -> None:
    """A file with no user, or none at all, is an error that says what to change."""
    path = tmp_path / "auth"
    path.write_text("# nobody yet\n")
    with pytest.raises(ConfigError, match="no user:password line; add one"):
        BasicAuth.load(str(path))
    with pytest.raises(ConfigError, match="metrics_auth_file: cannot read"):
        BasicAuth.load(str(tmp_path / "missing"))


def test_a_password_that_is_not_utf8_is_refused_not_a_crash() -> None:
    """Anyone who reaches the metrics port may send any bytes as a password: one that is
    not UTF-8 is simply wrong (it used to raise, which took the listener down); a
    UTF-8 password still matches the file's line byte for byte."""
    auth = BasicAuth.parse("ops:plain secret\nü:pässword\n")
    assert not auth.allows(b"Basic " + base64.b64encode(b"ops:\xff\xfe"))
    assert not auth.allows(b"Basic " + base64.b64encode(b"\xff:plain secret"))
    assert auth.allows(b"Basic " + base64.b64encode("ü:pässword".encode()))
