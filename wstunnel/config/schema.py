"""The schema: which keys each config has, how each is parsed, and the rules between them.

Every problem becomes a ``ConfigError`` that names the file, the line, the
key path and what was expected, e.g.
``agent.yaml:12: forwards[1].target: expected host:port, got "db.internal"``,
or, for a value given on the command line, the flag (``-L: ...``).

Each config class (model.py) is paired with a table ``{key: parser}``; the
dataclass field defaults are the YAML defaults, so the two cannot drift apart.
A parser (values.py) gets ``(document, key_path, raw_value)`` and returns the
typed value or raises through ``document.error``. Cross-field rules run after
all fields parsed. A document is a YAML file, a mapping, or a file with
command-line flags merged over it (flags.py): all go through ``agent_from``/
``relay_from``, so every rule applies however a value was given.
The role of a file (``load_config``) is its ``role:`` key when present,
otherwise ``relay:`` means an agent config and ``listen:`` a relay config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import MISSING, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .. import mux
from ..addresses import HostPort
from . import values
from ._yaml import Document, join_index, join_key, load_document, parse_document
from .model import LOG_FORMATS, LOG_LEVELS, AgentConfig, RateLimit

if TYPE_CHECKING:  # (loaded where a relay config is built: see relay_model.py)
    from .relay_model import AgentAccount, RelayConfig, RelayTLS
from .textforms import (
    DEFAULT_UDP_IDLE_TIMEOUT,
    LOCAL,
    REVERSE,
    TCP,
    UDP,
    Forward,
    KiB,
    MiB,
    check_reverse_listen,
    parse_forward,
    parse_listen,
    parse_socket_path,
)
from .values import Parser

__all__ = [
    "agent_from",
    "any_from",
    "load_agent_config",
    "load_config",
    "load_relay_config",
    "parse_config",
    "relay_from",
]

_RECORD_OVERHEAD: Final = 64  # room for a mux record header around a chunk
_RESERVED_KEYS: Final = {
    "token": "a token is a secret and does not belong in a config file: put it in a file "
             "(token_file), an environment variable (token_env) or a systemd credential "
             "(token_credential)",
}


# ---------------------------------------------------------------- the tables

def _agent_account(doc: Document, path: str, value: Any) -> AgentAccount:
    from .relay_model import AgentAccount

    found = _build(doc, path, value, _ACCOUNT_FIELDS,
                   {"token_hash": False, "allow": False, "listen_allow": False,
                    "rate_limit": False}, "an agent entry")
    return AgentAccount(**found)


def _rate_limit(doc: Document, path: str, value: Any) -> RateLimit:
    """``{down: 10MiB, up: 5MiB, burst: 1MiB}``: bytes per second, at least one way."""
    found = _build(doc, path, value, _RATE_LIMIT_FIELDS, dict.fromkeys(_RATE_LIMIT_FIELDS, False),
                   "a rate_limit section (down, up: bytes per second; burst: bytes)")
    if "down" not in found and "up" not in found:
        raise doc.error(path, "expected down, up or both (bytes per second, e.g. down: 10MiB)")
    return RateLimit(**found)


def _relay_tls(doc: Document, path: str, value: Any) -> RelayTLS:
    from .relay_model import RelayTLS

    found = _build(doc, path, value, _TLS_FIELDS, {"client_ca_file": False}, "a tls section")
    return RelayTLS(**{key: _beside(doc, join_key(path, key), name)
                       for key, name in found.items()})


def _forward(doc: Document, path: str, value: Any) -> Forward:
    """One ``forwards`` entry: ``-L``'s text, or a mapping whose first key says the
    kind (``listen``, ``dynamic``, ``reverse``); each mapping may carry a ``name``."""
    if isinstance(value, str):
        return values.checked(doc, path, parse_forward, value,
                              "[bind:]port:host:port, or a mapping")
    if isinstance(value, dict) and "dynamic" in value:
        return _dynamic_forward(doc, path, value)
    if isinstance(value, dict) and "reverse" in value:
        return _reverse_forward(doc, path, value)
    found = _build(doc, path, value, _FORWARD_FIELDS, _OPTIONAL_FORWARD_KEYS, "a forward")
    listen, target = found["listen"], found["target"]
    forward = dataclasses.replace(_joined(listen, target), name=found.get("name"),
                                  rate_limit=found.get("rate_limit"))
    return _with_protocol(doc, path, forward, found)


#: Keys a ``listen`` or ``reverse`` forward mapping may leave out.
_OPTIONAL_FORWARD_KEYS: Final = {"name": False, "protocol": False, "udp_idle_timeout": False,
                                  "rate_limit": False}


def _with_protocol(doc: Document, path: str, forward: Forward,
                   found: dict[str, Any]) -> Forward:
    """``protocol: udp`` (or ``udp:`` in the text form) and ``udp_idle_timeout``."""
    protocol = found.get("protocol", forward.protocol)
    if protocol != forward.protocol and forward.protocol == UDP:
        raise doc.error(join_key(path, "protocol"), "the forward is written udp:...; "
                        "leave protocol out or write protocol: udp")
    if protocol == UDP and (forward.listen_path is not None or forward.target_path is not None):
        raise doc.error(join_key(path, "protocol"), "a UDP forward needs host:port at both "
                        "ends (unix sockets are streams)")
    if "udp_idle_timeout" in found and protocol != UDP:
        raise doc.error(join_key(path, "udp_idle_timeout"),
                        "udp_idle_timeout is for UDP forwards only (protocol: udp)")
    return dataclasses.replace(forward, protocol=protocol, udp_idle_timeout=found.get(
        "udp_idle_timeout", forward.udp_idle_timeout))


def _joined(listen: HostPort | str, target: HostPort | str, kind: str = LOCAL) -> Forward:
    """A forward from a listen address or path and a target address or ``unix:`` path."""
    forward = Forward("", 0, "", 0, kind)
    if isinstance(listen, str):
        forward = dataclasses.replace(forward, listen_path=listen)
    else:
        forward = dataclasses.replace(forward, listen_host=listen.host, listen_port=listen.port)
    if isinstance(target, str):
        return dataclasses.replace(forward, target_path=target)
    return dataclasses.replace(forward, target_host=target.host, target_port=target.port)


def _dynamic_forward(doc: Document, path: str, value: dict[str, Any]) -> Forward:
    """``{dynamic: "[bind:]port", users_file: FILE}`` (``-D``): a SOCKS/HTTP proxy."""
    found = _build(doc, path, value, _DYNAMIC_FIELDS,
                   {"users_file": False, "name": False, "udp_idle_timeout": False,
                    "rate_limit": False}, "a dynamic forward")
    users = None
    if "users_file" in found:
        name = _beside(doc, join_key(path, "users_file"), found["users_file"])
        users = values.users_file(doc, join_key(path, "users_file"), name)
    return dataclasses.replace(Forward.dynamic(found["dynamic"], users), name=found.get("name"),
                               rate_limit=found.get("rate_limit"),
                               udp_idle_timeout=found.get("udp_idle_timeout",
                                                          DEFAULT_UDP_IDLE_TIMEOUT))


def _reverse_forward(doc: Document, path: str, value: dict[str, Any]) -> Forward:
    """``{reverse: "[bind:]port", target: "host:port"}`` or ``-R``'s whole text as
    ``reverse`` (the relay listens; this agent dials the target)."""
    found = _build(doc, path, value, _REVERSE_FIELDS,
                   {"target": False, **_OPTIONAL_FORWARD_KEYS}, "a reverse forward")
    where = join_key(path, "reverse")
    if "target" not in found:
        forward = values.checked(doc, where, partial(parse_forward, kind=REVERSE),
                                 found["reverse"], "[bind:]port:host:port")
    else:
        listen = values.checked(doc, where, _reverse_listen, found["reverse"], "[bind:]port")
        forward = _joined(listen, found["target"], REVERSE)
        try:
            check_reverse_listen(forward)
        except ValueError as exc:
            raise doc.error(where, str(exc)) from exc
    forward = dataclasses.replace(forward, name=found.get("name"),
                                  rate_limit=found.get("rate_limit"))
    return _with_protocol(doc, path, forward, found)


def _reverse_listen(text: str) -> HostPort | str:
    return parse_socket_path(text) if text.startswith("/") else parse_listen(text)


_PROTOCOL_FIELDS: Final[dict[str, Parser]] = {"protocol": values.choice((TCP, UDP)),
                                              "udp_idle_timeout": values.duration(0.001),
                                              "rate_limit": _rate_limit}
_FORWARD_FIELDS: Final[dict[str, Parser]] = {"listen": values.listen_or_path,
                                             "target": values.target_or_path,
                                             "name": values.forward_name,
                                             **_PROTOCOL_FIELDS}
_DYNAMIC_FIELDS: Final[dict[str, Parser]] = {"dynamic": values.listen,
                                             "users_file": values.file_path,
                                             "name": values.forward_name,
                                             "udp_idle_timeout": values.duration(0.001),
                                             "rate_limit": _rate_limit}
_REVERSE_FIELDS: Final[dict[str, Parser]] = {"reverse": values.port_text,
                                             "target": values.target_or_path,
                                             "name": values.forward_name,
                                             **_PROTOCOL_FIELDS}
_ACCOUNT_FIELDS: Final[dict[str, Parser]] = {
    "name": values.agent_name,
    "token_hash": values.token_hash,
    "allow": values.list_of(values.allow_rule),
    "listen_allow": values.list_of(values.listen_rule),
    "rate_limit": _rate_limit,
}
_RATE_LIMIT_FIELDS: Final[dict[str, Parser]] = {
    "down": values.size(KiB, 1 << 40, "a rate in bytes per second"),
    "up": values.size(KiB, 1 << 40, "a rate in bytes per second"),
    "burst": values.size(KiB, 1 << 40),
}
_TLS_FIELDS: Final[dict[str, Parser]] = {
    "cert_file": values.file_path,
    "key_file": values.file_path,
    "client_ca_file": values.file_path,
}

_ACCESS_LOG_WORDS: Final = {"off": "off", "false": "off", "no": "off",
                             "on": "on", "true": "on", "yes": "on", "stderr": "on"}


def _access_log(doc: Document, path: str, value: Any) -> str:
    """off (YAML's false), on or stderr (true: the log stream), or a file path."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if not isinstance(value, str) or not value.strip():
        raise doc.error(path, "expected off, on (the log stream) or a file path, got "
                              f"{values.describe(value)}")
    word = _ACCESS_LOG_WORDS.get(value.strip().lower())
    return word if word is not None else _beside(doc, path, value.strip())


_COMMON_FIELDS: Final[dict[str, Parser]] = {
    "handshake_timeout": values.duration(0.001),
    "ping_interval": values.duration(0.001),
    "ping_timeout": values.duration(0.001),
    "drain_timeout": values.duration(0.0),
    "initial_window": values.size(mux.MIN_WINDOW, mux.MAX_WINDOW),
    "max_chunk_size": values.size(mux.MIN_CHUNK_SIZE, mux.MAX_CHUNK_SIZE),
    "max_send_window": values.size(mux.MIN_WINDOW, mux.MAX_WINDOW),
    "max_queued_size": values.size(mux.MIN_WINDOW, 64 * 1024 * MiB),
    "log_level": values.choice(LOG_LEVELS),
    "log_format": values.choice(LOG_FORMATS),
    "metrics": values.optional(values.host_port),
    "metrics_auth_file": values.readable_file,
    "admin_socket": values.optional(values.socket_path),
    "access_log": _access_log,
}

_AGENT_FIELDS: Final[dict[str, Parser]] = {
    "relay": values.urls,
    "forwards": values.list_of(_forward, at_least=1),
    "stdio": values.optional(values.stdio_target),
    "connect_wait_timeout": values.duration(0.0),
    "reconnect_min_interval": values.duration(0.001),
    "reconnect_max_interval": values.duration(0.001),
    "proxy": values.proxy,
    "proxy_password_file": values.readable_file,
    "headers": values.headers,
    "host_header": values.host_header,
    "transport": values.choice(("auto", "websocket", "streaming", "polling")),
    "user_agent": values.text("a User-Agent text"),
    **_COMMON_FIELDS,
    "token_file": values.file_path,
    "token_env": values.text("an environment variable name"),
    "token_credential": values.text("a systemd credential name"),
    "ca_file": values.file_path,
    "relay_fingerprint": values.fingerprint,
    "insecure_skip_verify": values.boolean,
    "server_name": values.text("a host name"),
    "client_cert_file": values.file_path,
    "client_key_file": values.file_path,
}

_RELAY_FIELDS: Final[dict[str, Parser]] = {
    "listen": values.listen,  # a bare port: 127.0.0.1 (like -L); 0.0.0.0:PORT for all
    "path": values.url_path,
    "allow": values.list_of(values.allow_rule),
    "listen_allow": values.list_of(values.listen_rule),
    "connect_timeout": values.duration(0.001),
    "max_channels": values.size(1, 65536, "a count"),
    "max_message_size": values.size(4 * KiB, 64 * MiB),
    "trusted_proxies": values.list_of(values.trusted_proxy),
    **_COMMON_FIELDS,
    "tls": _relay_tls,
    "agents": values.list_of(_agent_account),
    "no_auth": values.boolean,
    "max_pending_opens": values.size(1, 65536, "a count"),
    "max_buffered_size": values.size(16 * KiB, 64 * 1024 * MiB),
    "max_sessions_per_agent": values.size(1, 65536, "a count"),
    "rate_limit": _rate_limit,
    "idle_timeout": values.duration(0.0),
    "resume_grace": values.duration(0.0),
}


def _build(doc: Document, path: str, value: Any, table: Mapping[str, Parser],
           required: Mapping[str, bool], what: str) -> dict[str, Any]:
    """Parse a mapping against ``table``; every key is required unless ``required`` says not."""
    if not isinstance(value, dict):
        raise doc.error(path, f"expected {what} (a mapping of keys), "
                              f"got {values.describe(value)}")
    for key in value:
        if key not in table:
            raise doc.error(join_key(path, key), _unknown_key_message(key, table))
    missing = [k for k in table if k not in value and required.get(k, True)]
    if missing:
        raise doc.missing(join_key(path, missing[0]), what)
    return {k: parse(doc, join_key(path, k), value[k]) for k, parse in table.items()
            if k in value}


def _unknown_key_message(key: str, table: Mapping[str, object]) -> str:
    if key in _RESERVED_KEYS:
        return _RESERVED_KEYS[key]
    import difflib  # (only for a mistyped key: an agent's start does not pay for it)

    close = difflib.get_close_matches(key, list(table), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r}; {hint}allowed keys: {', '.join(table)}"


def _config_values(doc: Document, cls: type[Any], table: Mapping[str, Parser],
                   role: str) -> dict[str, Any]:
    """Constructor arguments for ``cls`` from the whole document."""
    data = doc.data
    if isinstance(data, dict) and "role" in data:
        if data["role"] != role:
            raise doc.error("role", f"expected {role!r} for `wstunnel {role}`, "
                                    f"got {values.describe(data['role'])}")
        data = {k: v for k, v in data.items() if k != "role"}
    required = {f.name: f.default is MISSING for f in fields(cls) if f.init}
    article = "an" if role == "agent" else "a"
    found = _build(doc, "", data, table, required, f"{article} {role} config")
    return {"source": doc.source, **found}


def _check_agent(doc: Document, config: AgentConfig) -> AgentConfig:
    if not config.forwards and config.stdio is None:  # (--stdio needs none)
        raise doc.missing("forwards", "an agent config")
    if config.reconnect_min_interval > config.reconnect_max_interval:
        key = ("reconnect_max_interval" if doc.given("reconnect_max_interval")
               else "reconnect_min_interval")
        raise doc.error(key, "reconnect_max_interval must be at least reconnect_min_interval "
                        f"({config.reconnect_min_interval:g}), got "
                        f"{config.reconnect_max_interval:g}")
    seen: dict[tuple[bool, str, str], int] = {}
    for i, forward in enumerate(config.forwards):
        at = (forward.kind == REVERSE, forward.protocol, forward.listen_text)
        if at in seen and (forward.listen_port != 0 or forward.listen_path is not None):
            where = "the relay's listen address" if at[0] else "listen address"
            raise doc.error(join_index("forwards", i),
                            f"{where} {forward.listen_text} is already used by "
                            f"{doc.name(join_index('forwards', seen[at]))}")
        seen[at] = i
    if (config.proxy_password_file is not None and config.proxy_url is not None
            and config.proxy_url.username is None):
        raise doc.error("proxy", "proxy_password_file needs a user name in the proxy URL, "
                                 "e.g. http://USER@proxy.example.com:3128")
    problem = _agent_problem(config)
    if problem is not None:
        raise doc.error(problem[0], problem[1])
    return config


def _agent_problem(config: AgentConfig) -> tuple[str, str] | None:
    """(key, message) for a contradiction between the agent's security settings."""
    sources = [k for k in ("token_file", "token_env", "token_credential") if getattr(config, k)]
    if len(sources) > 1:
        return sources[1], f"give one token source, not both {sources[0]} and {sources[1]}"
    verify = [k for k in ("ca_file", "relay_fingerprint", "insecure_skip_verify")
              if getattr(config, k)]
    if len(verify) > 1:
        return verify[1], (f"{verify[0]} and {verify[1]} are different ways to check the "
                           f"relay; choose one")
    tls_keys = [*verify, *(k for k in ("server_name", "client_cert_file", "client_key_file")
                           if getattr(config, k))]
    plain = [text for text, url in zip(_texts(config.relay), config.relay_urls, strict=True)
             if not url.secure]
    if tls_keys and plain:
        return tls_keys[0], f"{tls_keys[0]} needs a wss:// relay URL, got {plain[0]}"
    if config.client_key_file and not config.client_cert_file:
        return "client_key_file", "client_key_file needs client_cert_file"
    return None


def _check_relay(doc: Document, config: RelayConfig) -> RelayConfig:
    if config.max_message_size < config.max_chunk_size + _RECORD_OVERHEAD:
        key = "max_message_size" if doc.given("max_message_size") else "max_chunk_size"
        raise doc.error(key, f"max_message_size must exceed max_chunk_size "
                        f"({config.max_chunk_size}) by at least {_RECORD_OVERHEAD} bytes")
    problem = _relay_problem(config)
    if problem is not None:
        raise doc.error(problem[0], problem[1])
    return config


def _relay_problem(config: RelayConfig) -> tuple[str, str] | None:
    """(key, message) for a contradiction between the relay's security settings."""
    if config.no_auth and config.agents:
        return "no_auth", "no_auth accepts every agent anonymously; remove it or the agents list"
    if config.allow and not config.no_auth:
        return "allow", ("the global allow list applies only with no_auth; with agent "
                         "authentication put the rules under agents[].allow")
    if config.rate_limit is not None and not config.no_auth:
        return "rate_limit", ("the global rate_limit applies only with no_auth; with agent "
                              "authentication put it under agents[].rate_limit")
    seen: set[str] = set()
    mutual = config.tls is not None and config.tls.client_ca_file is not None
    for i, account in enumerate(config.agents):
        if account.name in seen:
            return join_index("agents", i), f"agent {account.name!r} is listed twice"
        seen.add(account.name)
        if account.token_hash is None and not mutual:
            return join_index("agents", i), (
                f"agent {account.name!r} has no token_hash; without tls.client_ca_file "
                f"(client certificates) it could never log in")
    return None


def load_agent_config(path: str | Path) -> AgentConfig:
    """Load and validate an agent YAML file.

    Raises:
        ConfigError: naming file, line, key path and what was expected.
    """
    return agent_from(load_document(path))


def load_relay_config(path: str | Path) -> RelayConfig:
    """Load and validate a relay YAML file.

    Raises:
        ConfigError: naming file, line, key path and what was expected.
    """
    return relay_from(load_document(path))


def load_config(path: str | Path) -> AgentConfig | RelayConfig:
    """Load either kind of file: ``role:`` decides, else ``relay:`` (agent) or ``listen:`` (relay).

    Raises:
        ConfigError: as the two loaders, or when the role cannot be told.
    """
    return any_from(load_document(path))


def parse_config(data: str | Mapping[str, Any],
                 source: str = "<string>") -> AgentConfig | RelayConfig:
    """Like ``load_config`` for YAML text or an already-loaded mapping (no line numbers).

    Raises:
        ConfigError: naming ``source`` and the key path.
    """
    if isinstance(data, str):
        return any_from(parse_document(data, source))
    return any_from(Document(source, dict(data)))


def any_from(doc: Document) -> AgentConfig | RelayConfig:
    """The config ``doc`` describes: ``role:`` decides, else ``relay:`` or ``listen:``."""
    data = doc.data
    role = data.get("role") if isinstance(data, dict) else None
    if role is None and isinstance(data, dict):
        guesses = [r for r, key in (("agent", "relay"), ("relay", "listen")) if key in data]
        role = guesses[0] if len(guesses) == 1 else None
    if role == "agent":
        return agent_from(doc)
    if role == "relay":
        return relay_from(doc)
    if isinstance(data, dict) and "role" in data:
        raise doc.error("role", f"expected agent or relay, got {values.describe(role)}")
    raise doc.error("", "cannot tell an agent config from a relay config; "
                        "add `role: agent` or `role: relay`")


def agent_from(doc: Document) -> AgentConfig:
    """The agent config ``doc`` describes, every key and every rule checked.

    Raises:
        ConfigError: located by ``doc`` (file and line, or flag).
    """
    found = _config_values(doc, AgentConfig, _AGENT_FIELDS, "agent")
    for key in _AGENT_PATH_KEYS:
        if found.get(key) is not None:
            found[key] = _beside(doc, key, found[key])
    return _check_agent(doc, AgentConfig(**found))


def relay_from(doc: Document) -> RelayConfig:
    """The relay config ``doc`` describes, every key and every rule checked.

    Raises:
        ConfigError: located by ``doc`` (file and line, or flag).
    """
    from .relay_model import RelayConfig

    found = _config_values(doc, RelayConfig, _RELAY_FIELDS, "relay")
    return _check_relay(doc, RelayConfig(**found))


_AGENT_PATH_KEYS: Final = ("token_file", "ca_file", "client_cert_file", "client_key_file")


def _beside(doc: Document, key_path: str, name: str) -> str:
    """A relative file name in a config file is relative to that file's directory."""
    if name.startswith("$") or Path(name).is_absolute() or not doc.in_file(key_path):
        return name
    return str(Path(doc.source).parent / name)


def _texts(relay: str | tuple[str, ...]) -> tuple[str, ...]:
    return (relay,) if isinstance(relay, str) else relay
