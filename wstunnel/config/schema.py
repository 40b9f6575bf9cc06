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
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from .. import mux, ws
from ..addresses import HostPort
from ..security.auth import TokenHash
from ..security.forwarded import IPNetwork
from ..security.policy import AllowRule, Policy
from ..security.tls import ClientTLS
from ._yaml import Document, join_index, join_key, load_document, parse_document
from .proxy_url import NO_PROXY, parse_proxy_url
from .textforms import (
    DEFAULT_BIND_HOST,
    DEFAULT_PATH,
    Forward,
    KiB,
    MiB,
    RelayURL,
    parse_forward,
    parse_host_port,
    parse_listen,
    parse_relay_url,
    parse_size,
    parse_url_path,
)
from .values import (
    _agent_name,
    _allow_rule,
    _checked,
    _choice,
    _describe,
    _duration,
    _file,
    _fingerprint,
    _flag,
    _headers,
    _host_header,
    _host_port,
    _list_of,
    _listen,
    _optional,
    _Parser,
    _proxy,
    _readable_file,
    _size,
    _socket_path,
    _target,
    _text,
    _token_hash,
    _trusted_proxy,
    _url,
    _url_path,
)

__all__ = [
    "DEFAULT_BIND_HOST",
    "DEFAULT_INITIAL_WINDOW",
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_CHUNK_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_QUEUED_SIZE",
    "DEFAULT_MAX_SEND_WINDOW",
    "DEFAULT_PATH",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "AgentAccount",
    "AgentConfig",
    "Forward",
    "HostPort",
    "RelayConfig",
    "RelayTLS",
    "RelayURL",
    "agent_problem",
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
    "relay_problem",
]

# The protocol core's limits are the config's limits: one source of truth.
DEFAULT_INITIAL_WINDOW: Final = mux.DEFAULT_INITIAL_WINDOW
DEFAULT_MAX_CHUNK_SIZE: Final = mux.DEFAULT_MAX_CHUNK_SIZE
DEFAULT_MAX_CHANNELS: Final = mux.DEFAULT_MAX_CHANNELS
DEFAULT_MAX_SEND_WINDOW: Final = mux.DEFAULT_MAX_SEND_WINDOW
DEFAULT_MAX_QUEUED_SIZE: Final = mux.DEFAULT_MAX_QUEUED_SIZE
DEFAULT_MAX_MESSAGE_SIZE: Final = ws.DEFAULT_MAX_MESSAGE_SIZE
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")
_RECORD_OVERHEAD: Final = 64  # room for a mux record header around a chunk
_RESERVED_KEYS: Final = {
    "token": "a token is a secret and does not belong in a config file: put it in a file "
             "(token_file), an environment variable (token_env) or a systemd credential "
             "(token_credential)",
}
DEFAULT_MAX_PENDING_OPENS: Final = 64
DEFAULT_MAX_BUFFERED_SIZE: Final = 256 * MiB  # = 1024 channels x 256 KiB windows
DEFAULT_MAX_SESSIONS_PER_AGENT: Final = 8


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
    max_send_window: int = DEFAULT_MAX_SEND_WINDOW  # per channel, whatever the peer grants
    max_queued_size: int = DEFAULT_MAX_QUEUED_SIZE  # per session, all channels together
    proxy: str | None = field(default=None, repr=False)  # None: environment; "none": direct
    proxy_password_file: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    host_header: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    token_file: str | None = None
    token_env: str | None = None
    token_credential: str | None = None
    ca_file: str | None = None
    relay_fingerprint: str | None = None
    insecure_skip_verify: bool = False
    server_name: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    metrics: HostPort | None = None  # serve Prometheus text on http://HOST:PORT/metrics
    admin_socket: str | None = None  # unix socket for `wstunnel status`
    source: str = field(default="<command line>", compare=False)  # file named in messages

    @property
    def relay_url(self) -> RelayURL:
        """``relay`` split into what the agent dials."""
        return parse_relay_url(self.relay)

    @property
    def client_tls(self) -> ClientTLS:
        """How the agent checks the relay's certificate."""
        return ClientTLS(self.ca_file, self.relay_fingerprint, self.insecure_skip_verify,
                         self.client_cert_file, self.client_key_file)


@dataclass(frozen=True)
class RelayTLS:
    """The relay's ``tls:`` section."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass(frozen=True)
class AgentAccount:
    """One entry of the relay's ``agents:`` list."""

    name: str
    token_hash: TokenHash | None = None
    allow: tuple[AllowRule, ...] = ()

    @property
    def policy(self) -> Policy:
        return Policy(self.allow)


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
    max_send_window: int = DEFAULT_MAX_SEND_WINDOW  # per channel, whatever the peer grants
    max_queued_size: int = DEFAULT_MAX_QUEUED_SIZE  # per session, all channels together
    max_channels: int = DEFAULT_MAX_CHANNELS
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    trusted_proxies: tuple[IPNetwork, ...] = ()
    log_level: str = "info"
    log_format: str = "text"
    tls: RelayTLS | None = None
    agents: tuple[AgentAccount, ...] = ()
    no_auth: bool = False
    max_pending_opens: int = DEFAULT_MAX_PENDING_OPENS
    max_buffered_size: int = DEFAULT_MAX_BUFFERED_SIZE
    max_sessions_per_agent: int = DEFAULT_MAX_SESSIONS_PER_AGENT
    idle_timeout: float = 0.0
    metrics: HostPort | None = None  # serve Prometheus text on http://HOST:PORT/metrics
    admin_socket: str | None = None  # unix socket for `wstunnel status`
    source: str = field(default="<command line>", compare=False)  # file named in messages

    @property
    def policy(self) -> Policy:
        """The destination policy built from ``allow``."""
        return Policy(self.allow)


# -------------------------------------------------------------- YAML parsers

def _agent_account(doc: Document, path: str, value: Any) -> AgentAccount:
    values = _build(doc, path, value, _ACCOUNT_FIELDS, {"token_hash": False, "allow": False},
                    "an agent entry")
    return AgentAccount(**values)


def _relay_tls(doc: Document, path: str, value: Any) -> RelayTLS:
    values = _build(doc, path, value, _TLS_FIELDS, {"client_ca_file": False}, "a tls section")
    return RelayTLS(**values)


def _forward(doc: Document, path: str, value: Any) -> Forward:
    if isinstance(value, str):
        return _checked(doc, path, parse_forward, value, "[bind:]port:host:port")
    values = _build(doc, path, value, _FORWARD_FIELDS, {}, "a forward")
    return Forward.of(values["listen"], values["target"])


_FORWARD_FIELDS: Final[dict[str, _Parser]] = {"listen": _listen, "target": _target}
_ACCOUNT_FIELDS: Final[dict[str, _Parser]] = {
    "name": _agent_name, "token_hash": _token_hash, "allow": _list_of(_allow_rule)}
_TLS_FIELDS: Final[dict[str, _Parser]] = {
    "cert_file": _file, "key_file": _file, "client_ca_file": _file}

_COMMON_FIELDS: Final[dict[str, _Parser]] = {
    "handshake_timeout": _duration(0.001),
    "ping_interval": _duration(0.001),
    "ping_timeout": _duration(0.001),
    "drain_timeout": _duration(0.0),
    "initial_window": _size(mux.MIN_WINDOW, mux.MAX_WINDOW),
    "max_chunk_size": _size(mux.MIN_CHUNK_SIZE, mux.MAX_CHUNK_SIZE),
    "max_send_window": _size(mux.MIN_WINDOW, mux.MAX_WINDOW),
    "max_queued_size": _size(mux.MIN_WINDOW, 64 * 1024 * MiB),
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
    "proxy": _proxy,
    "proxy_password_file": _readable_file,
    "headers": _headers,
    "host_header": _host_header,
    **_COMMON_FIELDS,
    "token_file": _file,
    "token_env": _text("an environment variable name"),
    "token_credential": _text("a systemd credential name"),
    "ca_file": _file,
    "relay_fingerprint": _fingerprint,
    "insecure_skip_verify": _flag,
    "server_name": _text("a host name"),
    "client_cert_file": _file,
    "client_key_file": _file,
}

_RELAY_FIELDS: Final[dict[str, _Parser]] = {
    "listen": _host_port,
    "path": _url_path,
    "allow": _list_of(_allow_rule),
    "connect_timeout": _duration(0.001),
    "max_channels": _size(1, 65536, "a count"),
    "max_message_size": _size(4 * KiB, 64 * MiB),
    "trusted_proxies": _list_of(_trusted_proxy),
    **_COMMON_FIELDS,
    "tls": _relay_tls,
    "agents": _list_of(_agent_account),
    "no_auth": _flag,
    "max_pending_opens": _size(1, 65536, "a count"),
    "max_buffered_size": _size(16 * KiB, 64 * 1024 * MiB),
    "max_sessions_per_agent": _size(1, 65536, "a count"),
    "idle_timeout": _duration(0.0),
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
        return _RESERVED_KEYS[key]
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
    article = "an" if role == "agent" else "a"
    values = _build(doc, "", data, table, required, f"{article} {role} config")
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
    if (config.proxy_password_file is not None and config.proxy not in (None, NO_PROXY)
            and parse_proxy_url(config.proxy).username is None):
        raise doc.error("proxy", "proxy_password_file needs a user name in the proxy URL, "
                                 "e.g. http://USER@proxy.example.com:3128")
    problem = agent_problem(config)
    if problem is not None:
        raise doc.error(problem[0], problem[1])
    return config


def agent_problem(config: AgentConfig) -> tuple[str, str] | None:
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
    if tls_keys and not config.relay_url.secure:
        return tls_keys[0], f"{tls_keys[0]} needs a wss:// relay URL, got {config.relay}"
    if config.client_key_file and not config.client_cert_file:
        return "client_key_file", "client_key_file needs client_cert_file"
    return None


def _check_relay(doc: Document, config: RelayConfig) -> RelayConfig:
    if config.max_message_size < config.max_chunk_size + _RECORD_OVERHEAD:
        key = "max_message_size" if "max_message_size" in doc.lines else "max_chunk_size"
        raise doc.error(key, f"max_message_size must exceed max_chunk_size "
                        f"({config.max_chunk_size}) by at least {_RECORD_OVERHEAD} bytes")
    problem = relay_problem(config)
    if problem is not None:
        raise doc.error(problem[0], problem[1])
    return config


def relay_problem(config: RelayConfig) -> tuple[str, str] | None:
    """(key, message) for a contradiction between the relay's security settings."""
    if config.no_auth and config.agents:
        return "no_auth", "no_auth accepts every agent anonymously; remove it or the agents list"
    if config.allow and not config.no_auth:
        return "allow", ("the global allow list applies only with no_auth; with agent "
                         "authentication put the rules under agents[].allow")
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


def demo_configs(echo_port: int, sink_port: int, *,
                 relay_port: int = 0) -> tuple[RelayConfig, AgentConfig]:
    """Loopback configs for ``wstunnel demo``: a relay allowing exactly the two
    targets (no_auth: nothing but this process can reach it in the demo's few
    seconds, and it only opens those two loopback ports), and an agent
    forwarding a free local port to each of them."""
    loopback = DEFAULT_BIND_HOST
    relay = RelayConfig(listen=HostPort(loopback, relay_port), source="<demo>", no_auth=True,
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
    for key in _AGENT_PATH_KEYS:
        if values.get(key) is not None:
            values[key] = _beside(doc, values[key])
    return _check_agent(doc, AgentConfig(**values))


def _relay_from(doc: Document) -> RelayConfig:
    values = _config_values(doc, RelayConfig, _RELAY_FIELDS, "relay")
    tls = values.get("tls")
    if tls is not None:
        ca = tls.client_ca_file
        values["tls"] = RelayTLS(_beside(doc, tls.cert_file), _beside(doc, tls.key_file),
                                 _beside(doc, ca) if ca is not None else None)
    return _check_relay(doc, RelayConfig(**values))


_AGENT_PATH_KEYS: Final = ("token_file", "ca_file", "client_cert_file", "client_key_file")


def _beside(doc: Document, path: str) -> str:
    """A relative file path in a config file is relative to that file's directory."""
    if path.startswith("$") or Path(path).is_absolute() or doc.source.startswith("<"):
        return path
    return str(Path(doc.source).parent / path)
