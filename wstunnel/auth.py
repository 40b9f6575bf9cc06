"""Agent tokens: format, scrypt hashes, secret loading and per-source rate limits.

Theory of operation
-------------------
A token is ``<agent name>.<secret>``: the name says which ``agents:`` entry
to check (so the relay runs one hash, not one per agent) and lets the agent
say whose token was refused; the secret is 32 random bytes, base64url. The
relay config stores only ``scrypt:<n>:<r>:<p>:<salt>:<key>`` (base64url,
unpadded), so a leaked config does not leak a usable token. Verification
derives the key again and compares in constant time (``Scrypt.verify``); an
unknown name is checked against a dummy hash so that the answer takes the
same time and says nothing about which part was wrong.

``RateLimiter`` is a token bucket per source address, charged on *failed*
attempts only, and checked before any hashing so that a flood of bad tokens
costs the relay nothing but a dictionary lookup. The table has a size bound;
the stalest sources are forgotten first.

Secrets never have to be on a command line: ``load_token`` reads a file, an
environment variable, or a systemd credential (``$CREDENTIALS_DIRECTORY``).
Nothing here does I/O other than reading those; the caller passes the clock.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

from .errors import ConfigError

__all__ = [
    "AGENT_NAME",
    "ANONYMOUS",
    "RateLimiter",
    "TokenHash",
    "bearer_token",
    "expand_credentials",
    "hash_token",
    "load_token",
    "new_token",
    "token_agent",
    "verify_token",
]

AGENT_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
ANONYMOUS: Final = "anonymous"  # the identity of every session of a --no-auth relay
_SECRET_BYTES: Final = 32
_SCRYPT_N: Final = 1 << 14  # ~16 MiB and ~40 ms per check: cheap for us, dear for a guesser
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
_KEY_SIZE: Final = 32
_MAX_TOKEN_SIZE: Final = 256
_CREDENTIALS: Final = "CREDENTIALS_DIRECTORY"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_token(name: str) -> str:
    """A fresh random token for agent ``name``.

    Raises:
        ValueError: ``name`` is not a valid agent name.
    """
    if not AGENT_NAME.fullmatch(name):
        raise ValueError(f"agent names are 1-64 letters, digits, '-' or '_', got {name!r}")
    return f"{name}.{_b64(secrets.token_bytes(_SECRET_BYTES))}"


def token_agent(token: str) -> str | None:
    """The agent name a token carries, or None if it is not a wstunnel token."""
    name, dot, secret = token.rpartition(".")
    if not dot or not secret or not AGENT_NAME.fullmatch(name):
        return None
    return name


@dataclass(frozen=True)
class TokenHash:
    """A parsed ``scrypt:n:r:p:salt:key`` line from the relay config."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def __str__(self) -> str:
        return f"scrypt:{self.n}:{self.r}:{self.p}:{_b64(self.salt)}:{_b64(self.key)}"

    @classmethod
    def parse(cls, text: str) -> TokenHash:
        """Parse the hash form ``wstunnel keygen --token`` prints.

        Raises:
            ValueError: anything else (a plain token is refused with a hint).
        """
        parts = text.strip().split(":")
        if token_agent(text.strip()) is not None and len(parts) == 1:
            raise ValueError("this looks like a token, not a token hash; the relay config "
                             "must hold only the scrypt:... line `wstunnel keygen --token` prints")
        try:
            scheme, n, r, p, salt, key = parts
            parsed = cls(int(n), int(r), int(p), _unb64(salt), _unb64(key))
        except (ValueError, TypeError) as exc:
            raise ValueError("expected scrypt:N:R:P:SALT:KEY as printed by "
                             "`wstunnel keygen --token NAME`") from exc
        if scheme != "scrypt" or not _sane(parsed):
            raise ValueError("expected scrypt:N:R:P:SALT:KEY with N a power of two from 2 "
                             "to 2^20, R and P from 1 to 16, and a key of 16 bytes or more")
        return parsed


def _sane(h: TokenHash) -> bool:
    return (1 < h.n <= 1 << 20 and h.n & (h.n - 1) == 0 and 1 <= h.r <= 16 and 1 <= h.p <= 16
            and len(h.salt) >= 8 and len(h.key) >= 16)


def _scrypt(h: TokenHash) -> object:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=h.salt, length=len(h.key), n=h.n, r=h.r, p=h.p)


def hash_token(token: str, *, n: int = _SCRYPT_N) -> TokenHash:
    """The scrypt hash of ``token`` with a fresh salt (what the relay config stores)."""
    salt = secrets.token_bytes(16)
    h = TokenHash(n, _SCRYPT_R, _SCRYPT_P, salt, b"\0" * _KEY_SIZE)
    key = _scrypt(h).derive(token.encode())  # type: ignore[attr-defined]
    return TokenHash(n, _SCRYPT_R, _SCRYPT_P, salt, key)


@cache
def _dummy_hash() -> TokenHash:
    return hash_token(new_token("dummy"))


def verify_token(token: str, stored: TokenHash | None) -> bool:
    """True if ``token`` matches ``stored``, in time independent of where it differs.

    ``stored=None`` (no such agent) still runs one scrypt and answers False.
    CPU-bound (~40 ms): call it from a worker thread.
    """
    from cryptography.exceptions import InvalidKey

    if len(token) > _MAX_TOKEN_SIZE:
        return False
    target = stored if stored is not None else _dummy_hash()
    try:
        _scrypt(target).verify(token.encode(), target.key)  # type: ignore[attr-defined]
    except InvalidKey:
        return False
    return stored is not None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN_SIZE:
        return None
    return token


# ------------------------------------------------------------------ secrets

def expand_credentials(path: str) -> str:
    """Expand ``$CREDENTIALS_DIRECTORY`` / ``${CREDENTIALS_DIRECTORY}`` in a file path.

    Raises:
        ConfigError: the path uses it but systemd did not set it.
    """
    if _CREDENTIALS not in path:
        return path
    directory = os.environ.get(_CREDENTIALS)
    if not directory:
        raise ConfigError(f"{path}: $CREDENTIALS_DIRECTORY is not set; it is set by systemd "
                          f"for units with LoadCredential=")
    return path.replace("${" + _CREDENTIALS + "}", directory).replace("$" + _CREDENTIALS,
                                                                        directory)


def load_token(*, token_file: str | None = None, token_env: str | None = None,
               token_credential: str | None = None) -> str | None:
    """Read the agent's token from whichever source is configured (None: no token).

    Raises:
        ConfigError: the source is configured but empty, missing or unreadable,
            naming the key and what to do.
    """
    if token_env is not None:
        value = os.environ.get(token_env, "").strip()
        if not value:
            raise ConfigError(f"environment variable {token_env} is not set or empty",
                              key_path="token_env")
        return _checked_token(value, "token_env")
    if token_credential is not None:
        directory = os.environ.get(_CREDENTIALS)
        if not directory:
            raise ConfigError("$CREDENTIALS_DIRECTORY is not set (systemd sets it for units "
                              "with LoadCredential=)", key_path="token_credential")
        return _read_token(Path(directory) / token_credential, "token_credential")
    if token_file is not None:
        return _read_token(Path(expand_credentials(token_file)), "token_file")
    return None


def _read_token(path: Path, key: str) -> str:
    """The first line of ``path`` that is neither blank nor a ``#`` comment."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the token from {path}: {exc.strerror or exc}",
                          key_path=key) from exc
    value = next((line.strip() for line in lines
                  if line.strip() and not line.lstrip().startswith("#")), "")
    if not value:
        raise ConfigError(f"{path} is empty; put the token from `wstunnel keygen --token "
                          f"NAME` in it", key_path=key)
    return _checked_token(value, key)


def _checked_token(value: str, key: str) -> str:
    if token_agent(value) is None or len(value) > _MAX_TOKEN_SIZE or not value.isprintable():
        raise ConfigError("this is not a wstunnel token (expected NAME.SECRET as printed by "
                          "`wstunnel keygen --token NAME`)", key_path=key)
    return value


# ---------------------------------------------------------------- rate limit

class RateLimiter:
    """Token bucket per key: ``burst`` failures at once, then one per ``interval``."""

    def __init__(self, *, burst: int = 5, interval: float = 6.0, max_keys: int = 10000) -> None:
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, key: str, now: float) -> float:
        tokens, since = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - since) / self.interval)

    def retry_after(self, key: str, now: float) -> float:
        """0 if ``key`` may try now, else the seconds until it may."""
        level = self._level(key, now)
        return 0.0 if level >= 1.0 else (1.0 - level) * self.interval

    def charge(self, key: str, now: float) -> None:
        """Record one failure for ``key``."""
        level = max(0.0, self._level(key, now) - 1.0)
        self._buckets[key] = (level, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
