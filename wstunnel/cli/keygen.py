"""``wstunnel keygen``: a relay key + self-signed certificate, or an agent token.

Files are created with mode 0600 and never overwritten unless asked, and a
token is shown once (printed, or written to its file), next to the only thing
the relay needs: its ``hmac-sha256`` hash.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

from ..addresses import is_hostname, parse_ip
from ..errors import ConfigError
from ..security.auth import hash_token, new_token
from ..security.tls import pem_fingerprint, self_signed_certificate

__all__ = ["KEY_NAME", "CERT_NAME", "DEFAULT_CERT_DAYS", "write_certificate", "print_token",
           "refuse_certificate_options"]

KEY_NAME: Final = "relay.key"
CERT_NAME: Final = "relay.crt"
DEFAULT_CERT_DAYS: Final = 825


def _write_private(path: Path, data: bytes, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)  # born private: no moment when others may read it
    except FileExistsError as exc:
        raise ConfigError(f"{path} already exists; use --force to replace it") from exc
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)  # (--force: a file that existed keeps its old mode)
        file.write(data)


def write_certificate(out: str, names: Sequence[str], *, days: int, force: bool,
                      stdout: TextIO) -> None:
    """Write ``relay.key`` and ``relay.crt`` into ``out`` and print how to use them.

    Raises:
        ConfigError: no names, or a file exists (without ``force``).
    """
    if not names:
        raise ConfigError("give at least one --name (the relay's DNS name or IP address)")
    for name in names:
        _check_name(name)
    if days < 1:
        raise ConfigError(f"--days: give 1 or more (a certificate valid {days} days has "
                          f"expired before it is used)")
    directory = Path(out)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the directory {directory}: {exc.strerror or exc} "
                          f"(--out names the directory for relay.key and relay.crt)") from exc
    if not force:
        _refuse_existing(directory)
    key_pem, cert_pem = self_signed_certificate(names, days=days)
    _write_private(directory / KEY_NAME, key_pem, force)
    _write_private(directory / CERT_NAME, cert_pem, force)
    print(pem_fingerprint(cert_pem), file=stdout)
    print(f"# wrote {directory / KEY_NAME} and {directory / CERT_NAME} (mode 0600), valid "
          f"{days} days for: {', '.join(names)}\n"
          f"# relay config:  tls: {{cert_file: {directory / CERT_NAME}, "
          f"key_file: {directory / KEY_NAME}}}\n"
          f"# agent config:  relay_fingerprint: \"{pem_fingerprint(cert_pem)}\"", file=stdout)


def _check_name(name: str) -> None:
    """A name a client can check the certificate against: a DNS name (a wildcard
    first label too) or an IP address."""
    host = name[2:] if name.startswith("*.") else name
    if parse_ip(name) is None and not is_hostname(host):
        raise ConfigError(f"--name {name!r} is not a DNS name or an IP address: give the "
                          f"relay's host name as agents dial it (letters, digits, hyphens "
                          f"and dots, *.example.com for a wildcard) or its IP address")


def _refuse_existing(directory: Path) -> None:
    """The key and the certificate are a pair: write both or neither (a new key beside
    an old certificate would not match it)."""
    existing = [str(directory / name) for name in (KEY_NAME, CERT_NAME)
                if (directory / name).exists()]
    if existing:
        also = f" (so does {existing[1]})" if len(existing) > 1 else ""
        raise ConfigError(f"{existing[0]} already exists{also}; nothing was written: "
                          f"--force replaces both {KEY_NAME} and {CERT_NAME} (or give "
                          f"another --out)")


def refuse_certificate_options(names: Sequence[str], days: int | None) -> None:
    """``--token`` makes no certificate: ``--name`` and ``--days`` would be ignored."""
    given = "--name" if names else "--days" if days is not None else None
    if given is not None:
        raise ConfigError(f"{given} is for a relay certificate (keygen --out DIR --name HOST "
                          f"[--days N]); --token NAME [--out FILE] makes an agent token and "
                          f"takes neither: run keygen once for each")


def print_token(name: str, *, out: str | None = None, force: bool = False,
                stdout: TextIO, stderr: TextIO) -> None:
    """Make a token for agent ``name``; print it or write it to ``out``, and the relay entry.

    Without ``out`` the token goes to stdout and the entry to stderr, so
    ``wstunnel keygen --token NAME > NAME.token`` writes a token file and shows
    the lines for the relay on the terminal. With ``out`` the file is created
    with mode 0600 (never readable by others, whatever the umask or the
    shell's redirection would have done) and the token is not printed.

    Raises:
        ConfigError: ``name`` is not a valid agent name, or ``out`` exists
            (without ``force``).
    """
    try:
        token = new_token(name)
    except ValueError as exc:
        raise ConfigError(str(exc), key_path="--token") from exc
    if out is None:
        print(token, file=stdout)
        where = (f"# {name}'s token went to stdout: keep it in a file only the agent can read\n"
                 f"# (token_file), an environment variable (token_env) or a systemd "
                 f"credential\n# (token_credential).")
    else:
        _write_private(Path(out), f"{token}\n".encode(), force)
        where = f"# {name}'s token is in {out} (mode 0600): the agent's token_file."
    print(f"{where} The relay needs only this entry under agents:\n"
          f"  - name: {name}\n"
          f"    token_hash: {hash_token(token)}\n"
          f"    allow: []          # destinations this agent may open, e.g. db.internal:5432",
          file=stderr)
