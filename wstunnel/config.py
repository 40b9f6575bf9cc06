"""Configuration: frozen dataclasses loaded from YAML and checked field by field.

Every problem becomes a ``ConfigError`` that names the file, the line, the
key path and what was expected, e.g.
``agent.yaml:12: forwards[1].target: expected host:port, got "db.internal"``.

Each config class is paired with a table ``{key: parser}``; the dataclass
field defaults are the YAML defaults, so the two cannot drift apart. A parser
gets ``(document, key_path, raw_value)`` and returns the typed value or raises
through ``document.error``. Cross-field rules run after all fields parsed.
The role of a file (``load_config``) is its ``role:`` key when present,
otherwise ``relay:`` means an agent config and ``listen:`` a relay config.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Final, TypeVar

from ._textforms import (
    DEFAULT_BIND_HOST,
    DEFAULT_PATH,
    Forward,
    HostPort,
    KiB,
    MiB,
    RelayURL,
    parse_forward,
    parse_host_port,
    parse_listen,
    parse_relay_url,
    parse_size,
    parse_url_path,
    split_fields,
)
from ._yaml import Document, join_index, join_key, load_document, parse_document
from .policy import AllowRule, Policy

__all__ = [
    "DEFAULT_BIND_HOST",
    "DEFAULT_INITIAL_WINDOW",
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_CHUNK_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_PATH",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "AgentConfig",
    "Forward",
    "HostPort",
    "RelayConfig",
    "RelayURL",
    "demo_configs",
    "load_agent_config",
    "load_config",
    "load_relay_config",
    "parse_config",
    "parse_forward",
    "parse_host_port",
    "parse_listen",
    "parse_relay_url",
    "parse_size",
    "parse_url_path",
]

# Same values as the mux layer's defaults; repeated here so config does not
# depend on the protocol core.
DEFAULT_INITIAL_WINDOW: Final = 256 * KiB
DEFAULT_MAX_CHUNK_SIZE: Final = 16 * KiB
DEFAULT_MAX_CHANNELS: Final = 1024
DEFAULT_MAX_MESSAGE_SIZE: Final = 1 * MiB
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")
_MAX_DURATION: Final = 86400.0  # larger values are almost surely milliseconds
_RECORD_OVERHEAD: Final = 64  # room for a mux record header around a chunk
_MAX_SOCKET_PATH: Final = 107  # sun_path is 108 bytes with the terminating NUL
_RESERVED_KEYS: Final = {"tls": "TLS", "agents": "agent authentication",
                         "token": "agent authentication",
                         "relay_fingerprint": "certificate pinning"}


@dataclass(frozen=True)
class AgentConfig:
    """Settings of ``wstunnel agent`` (YAML keys equal field names)."""

    relay: str
    forwards: tuple[Forward, ...]
    connect_wait_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 10.0
    drain_timeout: float = 10.0
    reconnect_min_interval: float = 1.0
    reconnect_max_interval: float = 30.0
    handshake_timeout: float = 10.0
    initial_window: int = DEFAULT_INITIAL_WINDOW
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE
    log_level: str = "info"
    log_format: str = "text"
    metrics: HostPort | None = None  # serve Prometheus text on http://HOST:PORT/metrics
    admin_socket: str | None = None  # unix socket for `wstunnel status`
    source: str = field(default="<command line>", compare=False)  # file named in messages

    @property
    def relay_url(self) -> RelayURL:
        """``relay`` split into what the agent dials."""
        return parse_relay_url(self.relay)


@dataclass(frozen=True)
class RelayConfig:
    """Settings of ``wstunnel relay`` (YAML keys equal field names)."""

    listen: HostPort
    path: str = DEFAULT_PATH
    allow: tuple[AllowRule, ...] = ()
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 10.0
    drain_timeout: float = 10.0
    initial_window: int = DEFAULT_INITIAL_WINDOW
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE
    max_channels: int = DEFAULT_MAX_CHANNELS
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    log_level: str = "info"
    log_format: str = "text"
    metrics: HostPort | None = None  # serve Prometheus text on http://HOST:PORT/metrics
    admin_socket: str | None = None  # unix socket for `wstunnel status`
    source: str = field(default="<command line>", compare=False)  # file named in messages

    @property
    def policy(self) -> Policy:
        """The destination policy built from ``allow``."""
        return Policy(self.allow)


# -------------------------------------------------------------- YAML parsers

T = TypeVar("T")
_Parser = Callable[[Document, str, Any], Any]


def _describe(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (str, bool, int, float)):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a mapping"
    return "a list" if isinstance(value, list) else type(value).__name__


def _checked(doc: Document, path: str, parse: Callable[[str], T], value: object,
             expected: str) -> T:
    """Apply a text parser, turning its ValueError into a located ConfigError."""
    if not isinstance(value, str):
        raise doc.error(path, f"expected {expected}, got {_describe(value)}")
    try:
        return parse(value)
    except ValueError as exc:
        raise doc.error(path, str(exc)) from exc


def _duration(minimum: float) -> _Parser:
    def parse(doc: Document, path: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise doc.error(path, f"expected a number of seconds, got {_describe(value)}")
        if not minimum <= value <= _MAX_DURATION:
            bound = "greater than 0" if minimum > 0 else "at least 0"
            raise doc.error(path, f"expected seconds, {bound} and at most {_MAX_DURATION:g}, "
                                  f"got {value}")
        return float(value)
    return parse


def _size(low: int, high: int, what: str = "a size in bytes") -> _Parser:
    def parse(doc: Document, path: str, value: Any) -> int:
        if isinstance(value, str):
            value = _checked(doc, path, parse_size, value, what)
        if isinstance(value, bool) or not isinstance(value, int):
            raise doc.error(path, f"expected {what}, got {_describe(value)}")
        if not low <= value <= high:
            raise doc.error(path, f"expected {what} from {low} to {high}, got {value}")
        return value
    return parse


def _choice(options: tuple[str, ...]) -> _Parser:
    def parse(doc: Document, path: str, value: Any) -> str:
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        raise doc.error(path, f"expected one of {', '.join(options)}, got {_describe(value)}")
    return parse


def _host_port(doc: Document, path: str, value: Any) -> HostPort:
    return _checked(doc, path, lambda t: parse_host_port(t, allow_zero=True), value, "host:port")


def _listen(doc: Document, path: str, value: Any) -> HostPort:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return _checked(doc, path, parse_listen, value, "[bind:]port")


def _target(doc: Document, path: str, value: Any) -> HostPort:
    if not isinstance(value, str) or len(_split_or_none(value)) != 2:
        raise doc.error(path, f"expected host:port, got {_describe(value)}")
    return _checked(doc, path, parse_host_port, value, "host:port")


def _split_or_none(text: str) -> list[str]:
    try:
        return split_fields(text.strip())
    except ValueError:
        return []


def _optional(parse: _Parser) -> _Parser:
    def parse_or_none(doc: Document, path: str, value: Any) -> Any:
        return None if value is None else parse(doc, path, value)
    return parse_or_none


def _socket_path(doc: Document, path: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise doc.error(path, f"expected a file path, got {_describe(value)}")
    if len(value.encode()) > _MAX_SOCKET_PATH:
        raise doc.error(path, f"a unix socket path may have at most {_MAX_SOCKET_PATH} bytes, "
                              f"got {len(value.encode())}; pick a shorter one")
    return value


def _url(doc: Document, path: str, value: Any) -> str:
    _checked(doc, path, parse_relay_url, value, "a ws:// or wss:// URL")
    return str(value).strip()


def _url_path(doc: Document, path: str, value: Any) -> str:
    return _checked(doc, path, parse_url_path, value, "a URL path such as /tunnel")


def _list_of(item: _Parser, *, at_least: int = 0) -> _Parser:
    def parse(doc: Document, path: str, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise doc.error(path, f"expected a list, got {_describe(value)}")
        if len(value) < at_least:
            raise doc.error(path, f"expected at least {at_least} entry, got none")
        return tuple(item(doc, join_index(path, i), v) for i, v in enumerate(value))
    return parse


def _allow_rule(doc: Document, path: str, value: Any) -> AllowRule:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # a bare YAML number cannot be a rule, but say why below
    return _checked(doc, path, AllowRule.parse, value, "a host, pattern, IP or CIDR rule")


def _forward(doc: Document, path: str, value: Any) -> Forward:
    if isinstance(value, str):
        return _checked(doc, path, parse_forward, value, "[bind:]port:host:port")
    values = _build(doc, path, value, _FORWARD_FIELDS, {}, "a forward")
    return Forward.of(values["listen"], values["target"])


_FORWARD_FIELDS: Final[dict[str, _Parser]] = {"listen": _listen, "target": _target}

_COMMON_FIELDS: Final[dict[str, _Parser]] = {
    "handshake_timeout": _duration(0.001),
    "ping_interval": _duration(0.001),
    "ping_timeout": _duration(0.001),
    "drain_timeout": _duration(0.0),
    "initial_window": _size(16 * KiB, 16 * MiB),
    "max_chunk_size": _size(1 * KiB, 1 * MiB),
    "log_level": _choice(LOG_LEVELS),
    "log_format": _choice(LOG_FORMATS),
    "metrics": _optional(_host_port),
    "admin_socket": _optional(_socket_path),
}

_AGENT_FIELDS: Final[dict[str, _Parser]] = {
    "relay": _url,
    "forwards": _list_of(_forward, at_least=1),
    "connect_wait_timeout": _duration(0.0),
    "reconnect_min_interval": _duration(0.001),
    "reconnect_max_interval": _duration(0.001),
    **_COMMON_FIELDS,
}

_RELAY_FIELDS: Final[dict[str, _Parser]] = {
    "listen": _host_port,
    "path": _url_path,
    "allow": _list_of(_allow_rule),
    "connect_timeout": _duration(0.001),
    "max_channels": _size(1, 65536, "a count"),
    "max_message_size": _size(4 * KiB, 64 * MiB),
    **_COMMON_FIELDS,
}


def _build(doc: Document, path: str, value: Any, table: Mapping[str, _Parser],
           required: Mapping[str, bool], what: str) -> dict[str, Any]:
    """Parse a mapping against ``table``; every key is required unless ``required`` says not."""
    if not isinstance(value, dict):
        raise doc.error(path, f"expected {what} (a mapping of keys), got {_describe(value)}")
    for key in value:
        if key not in table:
            raise doc.error(join_key(path, key), _unknown_key_message(key, table))
    missing = [k for k in table if k not in value and required.get(k, True)]
    if missing:
        raise doc.error(join_key(path, missing[0]), f"required key is missing from {what}")
    return {k: parse(doc, join_key(path, k), value[k]) for k, parse in table.items()
            if k in value}


def _unknown_key_message(key: str, table: Mapping[str, object]) -> str:
    if key in _RESERVED_KEYS:
        return (f"{_RESERVED_KEYS[key]} is not supported by this version yet; "
                f"allowed keys: {', '.join(table)}")
    close = difflib.get_close_matches(key, list(table), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r}; {hint}allowed keys: {', '.join(table)}"


def _config_values(doc: Document, cls: type[Any], table: Mapping[str, _Parser],
                   role: str) -> dict[str, Any]:
    """Constructor arguments for ``cls`` from the whole document."""
    data = doc.data
    if isinstance(data, dict) and "role" in data:
        if data["role"] != role:
            raise doc.error("role", f"expected {role!r} for `wstunnel {role}`, "
                                    f"got {_describe(data['role'])}")
        data = {k: v for k, v in data.items() if k != "role"}
    required = {f.name: f.default is MISSING for f in fields(cls)}
    values = _build(doc, "", data, table, required, f"an {role} config")
    return {"source": doc.source, **values}


def _check_agent(doc: Document, config: AgentConfig) -> AgentConfig:
    if config.reconnect_min_interval > config.reconnect_max_interval:
        key = ("reconnect_max_interval" if "reconnect_max_interval" in doc.lines
               else "reconnect_min_interval")
        raise doc.error(key, "reconnect_max_interval must be at least reconnect_min_interval "
                        f"({config.reconnect_min_interval:g}), got "
                        f"{config.reconnect_max_interval:g}")
    seen: dict[HostPort, int] = {}
    for i, forward in enumerate(config.forwards):
        if forward.listen in seen and forward.listen.port != 0:
            raise doc.error(join_index("forwards", i),
                            f"listen address {forward.listen} is already used by "
                            f"forwards[{seen[forward.listen]}]")
        seen[forward.listen] = i
    return config


def _check_relay(doc: Document, config: RelayConfig) -> RelayConfig:
    if config.max_message_size < config.max_chunk_size + _RECORD_OVERHEAD:
        key = "max_message_size" if "max_message_size" in doc.lines else "max_chunk_size"
        raise doc.error(key, f"max_message_size must exceed max_chunk_size "
                        f"({config.max_chunk_size}) by at least {_RECORD_OVERHEAD} bytes")
    return config


def demo_configs(echo_port: int, sink_port: int, *,
                 relay_port: int = 0) -> tuple[RelayConfig, AgentConfig]:
    """Loopback configs for ``wstunnel demo``: a relay allowing exactly the two
    targets, and an agent forwarding a free local port to each of them."""
    loopback = DEFAULT_BIND_HOST
    relay = RelayConfig(listen=HostPort(loopback, relay_port), source="<demo>",
                        allow=tuple(AllowRule.parse(f"{loopback}:{port}")
                                    for port in (echo_port, sink_port)))
    forwards = tuple(Forward(loopback, 0, loopback, port) for port in (echo_port, sink_port))
    agent = AgentConfig(relay=f"ws://{loopback}:{relay_port}{DEFAULT_PATH}",
                        forwards=forwards, source="<demo>")
    return relay, agent


def load_agent_config(path: str | Path) -> AgentConfig:
    """Load and validate an agent YAML file.

    Raises:
        ConfigError: naming file, line, key path and what was expected.
    """
    return _agent_from(load_document(path))


def load_relay_config(path: str | Path) -> RelayConfig:
    """Load and validate a relay YAML file.

    Raises:
        ConfigError: naming file, line, key path and what was expected.
    """
    return _relay_from(load_document(path))


def load_config(path: str | Path) -> AgentConfig | RelayConfig:
    """Load either kind of file: ``role:`` decides, else ``relay:`` (agent) or ``listen:`` (relay).

    Raises:
        ConfigError: as the two loaders, or when the role cannot be told.
    """
    return _any_from(load_document(path))


def parse_config(data: str | Mapping[str, Any],
                 source: str = "<string>") -> AgentConfig | RelayConfig:
    """Like ``load_config`` for YAML text or an already-loaded mapping (no line numbers).

    Raises:
        ConfigError: naming ``source`` and the key path.
    """
    if isinstance(data, str):
        return _any_from(parse_document(data, source))
    return _any_from(Document(source, dict(data)))


def _any_from(doc: Document) -> AgentConfig | RelayConfig:
    data = doc.data
    role = data.get("role") if isinstance(data, dict) else None
    if role is None and isinstance(data, dict):
        guesses = [r for r, key in (("agent", "relay"), ("relay", "listen")) if key in data]
        role = guesses[0] if len(guesses) == 1 else None
    if role == "agent":
        return _agent_from(doc)
    if role == "relay":
        return _relay_from(doc)
    if isinstance(data, dict) and "role" in data:
        raise doc.error("role", f"expected agent or relay, got {_describe(role)}")
    raise doc.error("", "cannot tell an agent config from a relay config; "
                        "add `role: agent` or `role: relay`")


def _agent_from(doc: Document) -> AgentConfig:
    values = _config_values(doc, AgentConfig, _AGENT_FIELDS, "agent")
    return _check_agent(doc, AgentConfig(**values))


def _relay_from(doc: Document) -> RelayConfig:
    values = _config_values(doc, RelayConfig, _RELAY_FIELDS, "relay")
    return _check_relay(doc, RelayConfig(**values))
