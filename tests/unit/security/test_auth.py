"""Tokens, token hashes, secret sources and the failed-login rate limiter."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
from pathlib import Path

import pytest

from wstunnel.errors import ConfigError
from wstunnel.security.auth import (
    RateLimiter,
    TokenHash,
    VerifiedTokens,
    bearer_token,
    hash_token,
    load_token,
    new_token,
    scrypt_hash,
    token_agent,
    verify_token,
)


def test_a_token_carries_its_agent_name_and_256_random_bits() -> None:
    """new_token is NAME.SECRET with a 43-character secret, different every time."""
    token = new_token("build-01")
    name, secret = token.split(".")
    assert token_agent(token) == name == "build-01" and len(secret) == 43
    assert new_token("build-01") != token
    with pytest.raises(ValueError):
        new_token("bad name")
    assert token_agent("no-dot") is None and token_agent("a.") is None


def test_keygen_hash_verifies_only_its_token_and_round_trips_as_text() -> None:
    """hmac-sha256:SALT:KEY parses back; only the exact token verifies; an unknown agent never
    does; the line holds neither the token nor its secret."""
    token = new_token("a1")
    stored = TokenHash.parse(str(hash_token(token)))
    assert str(stored).startswith("hmac-sha256:") and not stored.slow
    assert verify_token(token, stored)
    assert not verify_token(token + "x", stored)
    assert not verify_token(new_token("a1"), stored)
    assert not verify_token(token, None)
    assert token not in str(stored) and token.split(".")[1] not in str(stored)
    assert hash_token(token) != hash_token(token)  # a fresh salt each time


def test_keygen_hash_is_hmac_sha256_of_the_token_keyed_by_the_salt() -> None:
    """The documented formula (docs/SECURITY.md), so other tools can make or check the line."""
    token = new_token("a1")
    scheme, *fields = str(hash_token(token)).split(":")
    salt, key = (base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)) for text in fields)
    assert scheme == "hmac-sha256"
    assert hmac.new(salt, token.encode(), hashlib.sha256).digest() == key
    assert len(salt) == 16


def test_only_generated_tokens_get_the_fast_hash() -> None:
    """A secret someone chose (shorter than keygen's 256 bits) must not get a fast hash."""
    with pytest.raises(ValueError, match="only generated tokens"):
        hash_token("a1.correct-horse-battery")
    stored = scrypt_hash("a1.correct-horse-battery", n=1 << 10)
    assert verify_token("a1.correct-horse-battery", stored)


def test_older_scrypt_lines_keep_verifying() -> None:
    """scrypt:N:R:P:SALT:KEY (what keygen printed before) parses, round-trips and verifies."""
    token = new_token("a1")
    stored = TokenHash.parse(str(scrypt_hash(token, n=1 << 10)))
    assert str(stored).startswith("scrypt:1024:8:1:") and stored.slow
    assert verify_token(token, stored)
    assert not verify_token(token + "x", stored)
    assert not verify_token(new_token("a1"), stored)


def test_verified_tokens_remember_only_that_token_for_that_hash() -> None:
    """A token that passed a slow check is known again, but not another token, another
    agent's name, or the same token once the agent's token_hash changed (rotation)."""
    token = new_token("a1")
    stored = scrypt_hash(token, n=1 << 10)
    verified = VerifiedTokens()
    assert not verified.known("a1", stored, token)
    verified.remember("a1", stored, token)
    assert verified.known("a1", stored, token)
    assert not verified.known("a1", stored, new_token("a1"))
    assert not verified.known("a2", stored, token)
    assert not verified.known("a1", scrypt_hash(token, n=1 << 10), token)


@pytest.mark.parametrize("text, fragment", [
    ("a1.c2VjcmV0c2VjcmV0", "looks like a token"),
    ("scrypt:3:8:1:AAAAAAAAAAA:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "power of two"),
    ("md5:x", "expected hmac-sha256"),
    ("scrypt:16384:8:1:!!:??", "expected scrypt"),
    ("hmac-sha256:AAAAAAAAAAAAAAAAAAAAAA", "expected hmac-sha256"),
    ("hmac-sha256:AAAAAAAAAAAAAAAAAAAAAA:AAAA", "expected hmac-sha256"),  # key too short
    ("hmac-sha256:AAAA:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "expected hmac-sha256"),
    ("sha256:" + "ab" * 32, "expected hmac-sha256"),  # a relay_fingerprint pasted here
])
def test_bad_hashes_are_refused(text: str, fragment: str) -> None:
    """Anything but a sane hash line is refused; a pasted token gets a specific hint."""
    with pytest.raises(ValueError, match=fragment):
        TokenHash.parse(text)


def test_bearer_header_parsing() -> None:
    """Only `Bearer <token>` yields a token, case-insensitively, with a size bound."""
    assert bearer_token("Bearer a.b") == "a.b" and bearer_token("bearer  a.b ") == "a.b"
    assert bearer_token(None) is None and bearer_token("Basic YTpi") is None
    assert bearer_token("Bearer ") is None and bearer_token("Bearer " + "a" * 300) is None


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file (comments skipped), an environment variable or a systemd credential."""
    token = new_token("a1")
    path = tmp_path / "token"
    path.write_text(f"# example secret\n\n{token}\n")
    assert load_token(token_file=str(path)) == token
    monkeypatch.setenv("T", token)
    assert load_token(token_env="T") == token
    (tmp_path / "wstunnel-token").write_text(token)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert load_token(token_credential="wstunnel-token") == token
    assert load_token(token_file="$CREDENTIALS_DIRECTORY/wstunnel-token") == token
    assert load_token() is None


@pytest.mark.parametrize("setup, kwargs, fragment", [
    (lambda p: None, {"token_file": "missing"}, "cannot read the token"),
    (lambda p: (p / "t").write_text("# only a comment\n"), {"token_file": "t"}, "is empty"),
    (lambda p: (p / "t").write_text("not a token\n"), {"token_file": "t"}, "not a wstunnel token"),
    (lambda p: None, {"token_env": "UNSET_VAR_FOR_TEST"}, "not set"),
    (lambda p: None, {"token_credential": "x"}, "CREDENTIALS_DIRECTORY is not set"),
])
def test_token_source_errors_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            setup: object, kwargs: dict[str, str],
                                            fragment: str) -> None:
    """A configured but unusable source is a ConfigError naming its key."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=fragment) as info:
        load_token(**kwargs)  # type: ignore[arg-type]
    assert info.value.key_path == next(iter(kwargs))


def test_rate_limiter_allows_a_burst_then_one_per_interval() -> None:
    """Five failures pass, the sixth waits; the bucket refills with time; sources are separate."""
    limiter = RateLimiter(burst=5, interval=6.0, max_keys=2)
    for _ in range(5):
        assert limiter.retry_after("a", 0.0) == 0
        limiter.charge("a", 0.0)
    assert limiter.retry_after("a", 0.0) == pytest.approx(6.0)
    assert limiter.retry_after("a", 3.0) == pytest.approx(3.0)
    assert limiter.retry_after("a", 6.0) == 0
    assert limiter.retry_after("b", 0.0) == 0
    limiter.charge("b", 0.0)
    limiter.charge("c", 0.0)  # evicts the stalest source, "a"
    assert limiter.retry_after("a", 0.0) == 0


def test_rate_limiter_knows_which_sources_have_failed() -> None:
    """A source is clean until it fails, and again once its bucket has refilled."""
    limiter = RateLimiter(burst=2, interval=6.0)
    assert limiter.is_clean("a", 0.0)
    limiter.charge("a", 0.0)
    assert not limiter.is_clean("a", 0.0) and limiter.retry_after("a", 0.0) == 0
    assert not limiter.is_clean("a", 5.9) and limiter.is_clean("a", 6.0)


def _token_file(directory: Path, mode: int) -> tuple[Path, str]:
    token = new_token("laptop")
    path = directory / f"token-{mode:o}"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path, token


@pytest.mark.parametrize("mode, who", [(0o644, "every user"), (0o640, "the file's group"),
                                       (0o604, "every user")])
def test_a_token_file_others_can_read_gets_one_warning_with_the_fix(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, who: str) -> None:
    """Readable by group or others: a warning naming the file, the agent and `chmod 600
    FILE`; once per file and mode, not on every re-read before a reconnect."""
    path, token = _token_file(tmp_path, mode)
    with caplog.at_level(logging.WARNING, logger="wstunnel"):
        assert load_token(token_file=str(path)) == token
        assert load_token(token_file=str(path)) == token
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.name.startswith("wstunnel")
    assert str(path) in record.getMessage() and who in record.getMessage()
    assert f"chmod 600 {path}" in record.getMessage() and "laptop" in record.getMessage()


def test_private_token_files_and_systemd_credentials_are_not_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mode 0600 or 0400 is quiet; so is a token from $CREDENTIALS_DIRECTORY (systemd keeps
    that directory private), whether named by token_credential or a token_file path in it."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    shared, token = _token_file(credentials, 0o644)
    with caplog.at_level(logging.WARNING, logger="wstunnel"):
        for mode in (0o600, 0o400):
            assert load_token(token_file=str(_token_file(tmp_path, mode)[0])) is not None
        assert load_token(token_credential=shared.name) == token
        assert load_token(token_file=f"$CREDENTIALS_DIRECTORY/{shared.name}") == token
    assert caplog.records == []
    assert os.stat(shared).st_mode & 0o777 == 0o644  # (the case really was readable)
