"""Tokens, token hashes, secret sources and the failed-login rate limiter."""

from __future__ import annotations

from pathlib import Path

import pytest

from wstunnel.auth import (
    RateLimiter,
    TokenHash,
    bearer_token,
    hash_token,
    load_token,
    new_token,
    token_agent,
    verify_token,
)
from wstunnel.errors import ConfigError


def test_a_token_carries_its_agent_name_and_256_random_bits() -> None:
    """new_token is NAME.SECRET with a 43-character secret, different every time."""
    token = new_token("build-01")
    name, secret = token.split(".")
    assert token_agent(token) == name == "build-01" and len(secret) == 43
    assert new_token("build-01") != token
    with pytest.raises(ValueError):
        new_token("bad name")
    assert token_agent("no-dot") is None and token_agent("a.") is None


def test_hash_verifies_only_its_token_and_round_trips_as_text() -> None:
    """The stored form parses back; only the exact token verifies; an unknown agent never does."""
    token = new_token("a1")
    stored = TokenHash.parse(str(hash_token(token, n=1 << 10)))
    assert verify_token(token, stored)
    assert not verify_token(token + "x", stored)
    assert not verify_token(new_token("a1"), stored)
    assert not verify_token(token, None)
    assert token not in str(stored) and token.split(".")[1] not in str(stored)


@pytest.mark.parametrize("text, fragment", [
    ("a1.c2VjcmV0c2VjcmV0", "looks like a token"),
    ("scrypt:3:8:1:AAAAAAAAAAA:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "power of two"),
    ("md5:x", "expected scrypt"),
    ("scrypt:16384:8:1:!!:??", "expected scrypt"),
])
def test_bad_hashes_are_refused(text: str, fragment: str) -> None:
    """Anything but a sane scrypt line is refused; a pasted token gets a specific hint."""
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
