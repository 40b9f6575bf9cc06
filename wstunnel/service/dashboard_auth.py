"""Basic auth for the metrics listener, from a file of ``user:password`` lines.

A line is ``user:password``, or ``user:sha256:<64 hex digits>`` (the SHA-256
of the password, ``printf %s 'PASSWORD' | sha256sum``) so the file need not
hold the password itself; blank lines and ``#`` comments are skipped. Every
check hashes the offered password and compares it with every user's digest
in constant time (``hmac.compare_digest``), so the time taken says nothing
about which user or which part was wrong. Pure code: the caller reads the
file and passes the ``Authorization`` header.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Final

from ..errors import ConfigError

__all__ = ["BasicAuth", "REALM"]

REALM: Final = "wstunnel"
_SHA256: Final = re.compile(r"sha256:([0-9a-fA-F]{64})")


def _digest(password: bytes) -> bytes:
    """Over the password's bytes: a header may carry any, not only UTF-8."""
    return hashlib.sha256(password).digest()


@dataclass(frozen=True)
class BasicAuth:
    """Who may read the metrics listener: user -> SHA-256 of the password."""

    users: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def parse(cls, text: str, source: str = "<auth file>") -> BasicAuth:
        """The users of a ``metrics_auth_file``'s ``text``.

        Raises:
            ConfigError: a line is not ``user:password``, or there is no user.
        """
        users = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, colon, password = line.partition(":")
            if not colon or not user or not password:
                raise ConfigError("expected user:password or user:sha256:HEX",
                                  source=source, line=number, key_path="metrics_auth_file")
            hashed = _SHA256.fullmatch(password)
            digest = bytes.fromhex(hashed.group(1)) if hashed else _digest(password.encode())
            users.append((user.encode(), digest))
        if not users:
            raise ConfigError("no user:password line; add one, or remove metrics_auth_file",
                              source=source)
        return cls(tuple(users))

    @classmethod
    def load(cls, path: str) -> BasicAuth:
        """Read and parse the file at ``path``.

        Raises:
            ConfigError: it cannot be read, or says nothing usable.
        """
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                              key_path="metrics_auth_file") from exc
        return cls.parse(text, path)

    def allows(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header value names a user with the right password."""
        credentials = _credentials(authorization)
        if credentials is None:
            return False
        user, digest = credentials[0], _digest(credentials[1])
        ok = False
        for known_user, known_digest in self.users:  # all of them: no early exit
            ok |= hmac.compare_digest(user, known_user) & hmac.compare_digest(digest, known_digest)
        return ok


def _credentials(authorization: bytes | None) -> tuple[bytes, bytes] | None:
    if authorization is None:
        return None
    scheme, _, encoded = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return user, password
