"""Agent tokens: format, hashes, secret loading and per-source failure counts.

Theory of operation
-------------------
A token is ``<agent name>.<secret>``: the name says which ``agents:`` entry
to check (so the relay runs one hash, not one per agent) and lets the agent
say whose token was refused; the secret is 32 random bytes, base64url. The
relay config stores only a hash, so a leaked config does not leak a usable
token:

* ``hmac-sha256:<salt>:<key>`` (what keygen prints): HMAC-SHA256 of the
  token keyed with a random salt. Checking costs about a microsecond. That
  is safe because the secret is 256 random bits: a slow hash only helps
  against guessing a secret someone chose, and nobody chooses these.
* ``scrypt:<n>:<r>:<p>:<salt>:<key>`` (what keygen printed before): still
  accepted; ~40 ms of CPU per check, so the relay rations these checks
  (``guard``) and remembers tokens that passed (``VerifiedTokens``).

Comparisons are constant-time; an unknown name is checked against a dummy
hash, so the answer says nothing about which part was wrong.

``RateLimiter`` is a token bucket per source address, charged on *failed*
attempts only. It never refuses a login (a stranger behind the same NAT
must not lock out a correct token); the relay uses it to quieten its log
and to put sources that keep failing behind the others. The table has a
size bound; the stalest sources are forgotten first.

Secrets never have to be on a command line: ``load_token`` reads a file, an
environment variable, or a systemd credential (``$CREDENTIALS_DIRECTORY``),
and warns when a token file is readable by others. Nothing here does I/O
other than reading those; the caller passes the clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..errors import ConfigError

__all__ = [
    "AGENT_NAME",
    "ANONYMOUS",
    "RateLimiter",
    "TokenHash",
    "VerifiedTokens",
    "bearer_token",
    "expand_credentials",
    "hash_token",
    "load_token",
    "new_token",
    "scrypt_hash",
    "token_agent",
    "verify_token",
]

AGENT_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
ANONYMOUS: Final = "anonymous"  # the identity of every session of a --no-auth relay
_SECRET_BYTES: Final = 32
_SECRET_CHARS: Final = 43  # base64url of _SECRET_BYTES, unpadded
_FAST: Final = "hmac-sha256"
_SLOW: Final = "scrypt"
_SCRYPT_N: Final = 1 << 14  # ~16 MiB and ~40 ms per check: cheap for us, dear for a guesser
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
_KEY_SIZE: Final = 32
_MAX_TOKEN_SIZE: Final = 256
_CREDENTIALS: Final = "CREDENTIALS_DIRECTORY"
_EXPOSED_BITS: Final = 0o044  # readable by the file's group or by everyone

log = logging.getLogger("wstunnel.agent")
_warned_exposed: set[tuple[str, int]] = set()  # (file, mode): warn once, not per reconnect


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
    """A parsed ``token_hash``: ``hmac-sha256:SALT:KEY`` or ``scrypt:N:R:P:SALT:KEY``."""

    scheme: str
    salt: bytes
    key: bytes
    n: int = 0
    r: int = 0
    p: int = 0

    @property
    def slow(self) -> bool:
        """True for scrypt: ~40 ms of CPU per check, so the relay rations those checks."""
        return self.scheme == _SLOW

    def __str__(self) -> str:
        if self.slow:
            return f"scrypt:{self.n}:{self.r}:{self.p}:{_b64(self.salt)}:{_b64(self.key)}"
        return f"{_FAST}:{_b64(self.salt)}:{_b64(self.key)}"

    @classmethod
    def parse(cls, text: str) -> TokenHash:
        """Parse a hash as ``wstunnel keygen --token`` prints it (or printed it before).

        Raises:
            ValueError: anything else (a plain token is refused with a hint).
        """
        parts = text.strip().split(":")
        if token_agent(text.strip()) is not None and len(parts) == 1:
            raise ValueError("this looks like a token, not a token hash; the relay config "
                             "must hold only the token_hash line `wstunnel keygen --token` "
                             "prints")
        if parts[0] == _SLOW:
            return _parse_scrypt(parts)
        if parts[0] == _FAST and len(parts) == 3:
            parsed = _decoded(parts[1:])
            if parsed is not None and len(parsed[0]) >= 16 and len(parsed[1]) == _KEY_SIZE:
                return cls(_FAST, parsed[0], parsed[1])
        raise ValueError(f"expected {_FAST}:SALT:KEY (or an older scrypt:N:R:P:SALT:KEY) as "
                         f"printed by `wstunnel keygen --token NAME`")


def _decoded(fields: list[str]) -> list[bytes] | None:
    try:
        return [_unb64(field) for field in fields]
    except ValueError:
        return None


def _parse_scrypt(parts: list[str]) -> TokenHash:
    try:
        _, n, r, p, salt, key = parts
        parsed = TokenHash(_SLOW, _unb64(salt), _unb64(key), int(n), int(r), int(p))
    except (ValueError, TypeError) as exc:
        raise ValueError("expected scrypt:N:R:P:SALT:KEY as printed by older "
                         "`wstunnel keygen --token NAME`") from exc
    if not _sane(parsed):
        raise ValueError("expected scrypt:N:R:P:SALT:KEY with N a power of two from 2 "
                         "to 2^20, R and P from 1 to 16, and a key of 16 bytes or more")
    return parsed


def _sane(h: TokenHash) -> bool:
    return (1 < h.n <= 1 << 20 and h.n & (h.n - 1) == 0 and 1 <= h.r <= 16 and 1 <= h.p <= 16
            and len(h.salt) >= 8 and len(h.key) >= 16)


def _scrypt(h: TokenHash) -> object:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=h.salt, length=len(h.key), n=h.n, r=h.r, p=h.p)


def _hmac(key: bytes, token: str) -> bytes:
    return hmac.new(key, token.encode(), hashlib.sha256).digest()


def hash_token(token: str) -> TokenHash:
    """The ``hmac-sha256`` hash of a generated token, with a fresh salt.

    A fast hash is as strong as a slow one here: the secret is 256 random
    bits, so there is nothing to guess faster. Only :func:`new_token`'s
    output qualifies.

    Raises:
        ValueError: the secret is shorter than a generated one (use
            :func:`scrypt_hash` for a secret someone chose).
    """
    _, _, secret = token.rpartition(".")
    if token_agent(token) is None or len(secret) < _SECRET_CHARS:
        raise ValueError("a fast hash protects only generated tokens (NAME. and 43 random "
                         "characters, as `wstunnel keygen --token NAME` makes)")
    salt = secrets.token_bytes(16)
    return TokenHash(_FAST, salt, _hmac(salt, token))


def scrypt_hash(token: str, *, n: int = _SCRYPT_N) -> TokenHash:
    """The slow ``scrypt`` hash of ``token`` with a fresh salt (the form keygen printed before)."""
    salt = secrets.token_bytes(16)
    h = TokenHash(_SLOW, salt, b"\0" * _KEY_SIZE, n, _SCRYPT_R, _SCRYPT_P)
    key = _scrypt(h).derive(token.encode())  # type: ignore[attr-defined]
    return TokenHash(_SLOW, salt, key, n, _SCRYPT_R, _SCRYPT_P)


_DUMMY: Final = TokenHash(_FAST, secrets.token_bytes(16), secrets.token_bytes(_KEY_SIZE))


def verify_token(token: str, stored: TokenHash | None) -> bool:
    """True if ``token`` matches ``stored``, in time independent of where it differs.

    ``stored=None`` (no such agent) still runs one fast check and answers
    False. A fast hash costs about a microsecond; a scrypt one ~40 ms of CPU
    (call it from a worker thread).
    """
    from cryptography.exceptions import InvalidKey

    if len(token) > _MAX_TOKEN_SIZE:
        return False
    target = stored if stored is not None else _DUMMY
    if not target.slow:
        return hmac.compare_digest(_hmac(target.salt, token), target.key) and stored is not None
    try:
        _scrypt(target).verify(token.encode(), target.key)  # type: ignore[attr-defined]
    except InvalidKey:
        return False
    return True


class VerifiedTokens:
    """Tokens that passed a slow (scrypt) check: the agent's next login costs one HMAC.

    Holds, per agent name, the stored hash it matched and an HMAC of the token
    under a key made at start (never the token itself), so the table is
    useless outside this process. A token matches only while the agent's
    ``token_hash`` is unchanged; one entry per agent that logged in.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(_KEY_SIZE)
        self._known: dict[str, tuple[TokenHash, bytes]] = {}

    def remember(self, name: str, stored: TokenHash, token: str) -> None:
        """Record that ``token`` verified against ``stored`` for agent ``name``."""
        self._known[name] = (stored, _hmac(self._key, token))

    def known(self, name: str, stored: TokenHash, token: str) -> bool:
        """True if ``token`` verified before against this very ``stored`` hash."""
        entry = self._known.get(name)
        return (entry is not None and entry[0] == stored
                and hmac.compare_digest(entry[1], _hmac(self._key, token)))


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
    token = _checked_token(value, key)
    if key == "token_file":
        _warn_if_exposed(path, token)
    return token


def _warn_if_exposed(path: Path, token: str) -> None:
    """Log once when other users may read the token (systemd credentials are exempt)."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return  # (it was just read; a race with a rename is not worth a second message)
    if not mode & _EXPOSED_BITS or _in_credentials_directory(path):
        return
    if (str(path), mode) in _warned_exposed:
        return
    _warned_exposed.add((str(path), mode))
    who = "every user on this host" if mode & 0o004 else "the file's group"
    log.warning("the token file %s is readable by %s (mode %04o): whoever reads it can log "
                "in as agent %s; run `chmod 600 %s`", path, who, mode, token_agent(token), path)


def _in_credentials_directory(path: Path) -> bool:
    directory = os.environ.get(_CREDENTIALS)
    if not directory:
        return False
    return path.resolve().is_relative_to(Path(directory).resolve())


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

    def is_clean(self, key: str, now: float) -> bool:
        """True if ``key`` has no failure left on its record (its bucket is full)."""
        return self._level(key, now) >= float(self.burst)

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
