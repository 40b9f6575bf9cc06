"""``wstunnel check``: the files a config names must exist and be readable.

Loading a config does not open the token, certificate, key and CA files: the
role opens them when it starts (and again on reload), and a path through
``$CREDENTIALS_DIRECTORY`` only exists inside its systemd unit. So a file could
load cleanly and the real start then fail on a missing key. ``check`` opens
each named file once, so that mistake shows up, located like a bad value, before
anything is started.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from ._yaml import Document, load_document
from .model import AgentConfig
from .relay_model import RelayConfig
from .schema import any_from

__all__ = ["check_config", "named_files"]

_AGENT_FILE_KEYS: Final = ("token_file", "ca_file", "client_cert_file", "client_key_file",
                           "proxy_password_file")
_RELAY_FILE_KEYS: Final = ("cert_file", "key_file", "client_ca_file")


def check_config(path: str | Path) -> AgentConfig | RelayConfig:
    """Load ``path`` like ``load_config``, then open every file it names.

    Raises:
        ConfigError: a bad value, or ``file:line: key: cannot read ...``.
    """
    doc = load_document(path)
    config = any_from(doc)
    for key_path, name in named_files(config):
        _check_readable(doc, key_path, name)
    return config


def named_files(config: AgentConfig | RelayConfig) -> list[tuple[str, str]]:
    """(key path, file name) of every file ``config`` names, as the role will open it."""
    if isinstance(config, AgentConfig):
        found = [(key, getattr(config, key)) for key in _AGENT_FILE_KEYS]
    elif config.tls is not None:
        found = [(f"tls.{key}", getattr(config.tls, key)) for key in _RELAY_FILE_KEYS]
    else:
        found = []
    return [(key, name) for key, name in found if name is not None]


def _check_readable(doc: Document, key_path: str, name: str) -> None:
    if "$" in name:  # $CREDENTIALS_DIRECTORY: only systemd's unit can resolve it
        return
    try:
        with open(name, "rb") as file:
            file.read(1)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise doc.error(key_path, f"cannot read {json.dumps(name)}: {reason}; "
                                  f"fix the path (relative names are relative to the "
                                  f"config file) or the file's permissions") from exc
