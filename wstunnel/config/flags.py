"""Command-line flags: a mapping of config keys, merged over the file and checked by the schema.

Theory of operation
-------------------
A flag is another way of writing a key (``-L`` writes ``forwards``,
``--tls-cert-file`` writes ``tls.cert_file``), so the command line is turned
into the mapping a YAML file would hold, put over the file's mapping (a flag
replaces the file's whole value: ``-L`` the whole ``forwards`` list), and
the result goes through ``schema.agent_from``/``relay_from`` like any file.
Every value parser and every rule between keys therefore applies to flags
too; there is no second validation path to drift from the first.

What differs is only how a problem is told. ``FlagDocument`` answers the
schema's questions about where a value came from: an error about a value a
flag gave names the flag (``-L: expected [bind:]port:host:port ...``), one
about a file's value keeps ``file:line: key:``; a required key missing with
no file says which flag to give; relative file names in flags stay relative
to the working directory, not to the file.

The tables map argparse destinations to flags; an option the tables do not
know is a bug and fails loudly (the CLI tests would catch it at once).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ..errors import ConfigError
from ._yaml import Document, load_document, parent_path
from .model import AgentConfig
from .schema import agent_from, relay_from

if TYPE_CHECKING:
    from .relay_model import RelayConfig

__all__ = ["AGENT_FLAGS", "RELAY_FLAGS", "Flag", "FlagDocument", "agent_config", "relay_config"]

COMMAND_LINE: Final = "<command line>"


@dataclass(frozen=True)
class Flag:
    """A command-line option and the config key it writes."""

    name: str  # as messages name it: "-L", "--tls-cert-file"
    key: str  # the key path in a config file: "forwards", "tls.cert_file"


def _same_names(*keys: str) -> dict[str, Flag]:
    """Flags spelled like their keys in kebab-case (``token_file``: ``--token-file``)."""
    return {key: Flag("--" + key.replace("_", "-"), key) for key in keys}


_SERVICE_FLAGS: Final = _same_names("log_level", "log_format", "metrics", "metrics_auth_file",
                                    "admin_socket", "access_log")

#: ``wstunnel agent``: argparse destination -> flag. ``--no-proxy`` writes ``proxy: none``.
AGENT_FLAGS: Final[Mapping[str, Flag]] = {
    "forwards": Flag("-L", "forwards"),
    "stdio": Flag("--stdio", "stdio"),
    "dynamic_forwards": Flag("-D", "forwards"),  # (each {"dynamic": "[bind:]port"})
    "reverse_forwards": Flag("-R", "forwards"),  # (each {"reverse": "[bind:]port:host:port"})
    "headers": Flag("--header", "headers"),
    **_same_names("relay", "proxy", "proxy_password_file", "host_header", "transport",
                  "user_agent", "token_file",
                  "token_env", "token_credential", "ca_file", "relay_fingerprint",
                  "insecure_skip_verify", "server_name", "client_cert_file",
                  "client_key_file"),
    **_SERVICE_FLAGS,
}

#: ``wstunnel relay``: argparse destination -> flag.
RELAY_FLAGS: Final[Mapping[str, Flag]] = {
    "trusted_proxies": Flag("--trusted-proxy", "trusted_proxies"),
    **{f"tls_{key}": Flag(f"--tls-{key.replace('_', '-')}", f"tls.{key}")
       for key in ("cert_file", "key_file", "client_ca_file")},
    **_same_names("listen", "allow", "listen_allow", "path", "no_auth", "resume_grace"),
    **_SERVICE_FLAGS,
}

# What to say when a required key is in neither a file nor a flag.
_MISSING: Final = {
    "relay": "give --relay ws://HOST:PORT/tunnel or -c agent.yaml",
    "forwards": "give at least one -L [bind:]port:host:port (or -R, -D), or --stdio host:port, or "
                "-c agent.yaml",
    "listen": "give --listen HOST:PORT or -c relay.yaml",
    "tls.cert_file": "give both --tls-cert-file and --tls-key-file",
    "tls.key_file": "give both --tls-cert-file and --tls-key-file",
}
_LIST_ITEM: Final = re.compile(r"(\w+)\[(\d+)\]")


@dataclass(frozen=True)
class FlagDocument(Document):
    """A file's document (or an empty one) with the flags' values put over it."""

    flags: Mapping[str, str] = field(default_factory=dict)  # key path -> flag name

    def flag_of(self, path: str) -> str | None:
        """The flag that gave ``path`` or the value holding it; None: the file did."""
        while path:
            if path in self.flags:
                return self.flags[path]
            path = parent_path(path)
        return None

    def error(self, path: str, message: str) -> ConfigError:
        """Name the flag when one gave the value, else the file, line and key path."""
        flag = self.flag_of(path)
        if flag is None:
            return super().error(path, message)
        return ConfigError(message, key_path=flag)

    def missing(self, path: str, what: str) -> ConfigError:
        """Without a file (or its section) to add the key to, say which flags to give."""
        hint = _MISSING.get(path)
        if hint is not None and parent_path(path) not in self.lines:
            return ConfigError(hint)
        return super().missing(path, what)

    def given(self, path: str) -> bool:
        return self.flag_of(path) is not None or super().given(path)

    def name(self, path: str) -> str:
        """``-L 9000:db:5432`` for an entry of a repeated flag's list."""
        flag = self.flag_of(path)
        if flag is None:
            return super().name(path)
        item = _LIST_ITEM.fullmatch(path)
        values = self.data.get(item[1]) if item and isinstance(self.data, dict) else None
        if item is None or not isinstance(values, list) or int(item[2]) >= len(values):
            return flag
        value = values[int(item[2])]
        if isinstance(value, dict) and len(value) == 1 and set(value) <= {"dynamic", "reverse"}:
            value = next(iter(value.values()))  # (-D, -R as written)
        return f"{flag} {value}"

    def in_file(self, path: str) -> bool:
        return self.flag_of(path) is None and super().in_file(path)


def agent_config(path: str | Path | None, options: Mapping[str, object]) -> AgentConfig:
    """The agent config from the file at ``path`` (if any) with flags replacing its keys.

    Args:
        path: the ``-c`` file, or None for flags alone.
        options: argparse destination -> value (None: the flag was not given).

    Raises:
        ConfigError: naming the flag, or the file, line and key, of the bad value.
    """
    return agent_from(with_flags(path, options, AGENT_FLAGS))


def relay_config(path: str | Path | None, options: Mapping[str, object]) -> RelayConfig:
    """The relay config from the file at ``path`` (if any) with flags replacing its keys.

    Raises:
        ConfigError: naming the flag, or the file, line and key, of the bad value.
    """
    return relay_from(with_flags(path, options, RELAY_FLAGS))


def with_flags(path: str | Path | None, options: Mapping[str, object],
               table: Mapping[str, Flag]) -> FlagDocument:
    """The file's document (or an empty one) with each given flag's value put at its key.

    Raises:
        ConfigError: the file cannot be read or is not YAML.
        LookupError: an option has no entry in ``table`` (a bug: a flag without a key).
    """
    unknown = sorted(set(options) - set(table))
    if unknown:
        raise LookupError(f"command-line options without a config key: {', '.join(unknown)}")
    doc = load_document(path) if path is not None else Document(COMMAND_LINE, {})
    if not isinstance(doc.data, dict):  # not a mapping: the schema says so, naming the file
        return FlagDocument(doc.source, doc.data, doc.lines)
    data = dict(doc.data)
    flags: dict[str, str] = {}
    for dest, value in options.items():
        if value is not None:
            flag = table[dest]
            value = list(value) if isinstance(value, (list, tuple)) else value
            if flag.key in flags and isinstance(value, list):
                _extend(data, flags, flag, value)
                continue
            _put(data, flag.key, value)
            flags[flag.key] = flag.name
    return FlagDocument(doc.source, data, doc.lines, flags)


def _extend(data: dict[str, object], flags: dict[str, str], flag: Flag,
            value: list[object]) -> None:
    """A second flag for the same list (``-D`` after ``-L``) adds its entries, each
    remembered as its own flag's (so that messages name ``-D``, not ``-L``)."""
    earlier = data[flag.key]
    assert isinstance(earlier, list), "the first flag for this key put a list"
    for i in range(len(earlier), len(earlier) + len(value)):
        flags[f"{flag.key}[{i}]"] = flag.name
    data[flag.key] = [*earlier, *value]


def _put(data: dict[str, object], key_path: str, value: object) -> None:
    """Set ``key_path`` (``key`` or ``section.key``) in ``data``, keeping the section's
    other keys (``--tls-key-file`` replaces only ``tls.key_file``)."""
    section_name, _, key = key_path.rpartition(".")
    if not section_name:
        data[key] = value
        return
    section = data.get(section_name)
    data[section_name] = {**(section if isinstance(section, dict) else {}), key: value}
