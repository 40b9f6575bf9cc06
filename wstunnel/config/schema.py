"""The schema: which keys each config has, how each is parsed, and the rules between them.

Every problem becomes a ``ConfigError`` that names the file, the line, the
key path and what was expected, e.g.
``agent.yaml:12: forwards[1].target: expected host:port, got "db.internal"``,
or, for a value given on the command line, the flag (``-L: ...``).

Each config class (model.py) is paired with a table ``{key: parser}``; the
dataclass field defaults are the YAML defaults, so the two cannot drift apart.
A parser (values.py) gets ``(document, key_path, raw_value)`` and returns the
typed value or raises through ``document.error``; a nested mapping (a forward,
an agent entry, tls, rate_limit) is parsed in sections.py. Cross-field rules run after
all fields parsed. A document is a YAML file, a mapping, or a file with
command-line flags merged over it (flags.py): all go through ``agent_from``/
``relay_from``, so every rule applies however a value was given.
The role of a file (``load_config``) is its ``role:`` key when present,
otherwise ``relay:`` means an agent config and ``listen:`` a relay config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .. import mux
from . import sections, values
from ._yaml import Document, join_index, load_document, parse_document
from .model import LOG_FORMATS, LOG_LEVELS, AgentConfig

if TYPE_CHECKING:  # (loaded where a relay config is built: see relay_model.py)
    from .relay_model import RelayConfig
from .textforms import REVERSE, KiB, MiB
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


# ---------------------------------------------------------------- the tables

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
    return word if word is not None else values.beside(doc, path, value.strip())


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
    "forwards": values.list_of(sections.forward, at_least=1),
    "stdio": values.optional(values.stdio_target),
    "connect_wait_timeout": values.duration(0.0),
    "reconnect_min_interval": values.duration(0.001),
    "reconnect_max_interval": values.duration(0.001),
    "proxy": values.proxy,
    "proxy_password_file": values.password_file,
    "headers": values.headers,
    "host_header": values.host_header,
    "transport": values.choice(("auto", "websocket", "streaming", "polling")),
    "user_agent": values.user_agent,
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
    "tls": sections.relay_tls,
    "agents": values.list_of(sections.agent_account),
    "no_auth": values.boolean,
    "max_pending_opens": values.size(1, 65536, "a count"),
    "max_buffered_size": values.size(16 * KiB, 64 * 1024 * MiB),
    "max_sessions_per_agent": values.size(1, 65536, "a count"),
    "max_pending_handshakes": values.optional(values.size(1, 65536, "a count")),
    "rate_limit": sections.rate_limit,
    "idle_timeout": values.duration(0.0),
    "resume_grace": values.duration(0.0),
}


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
    found = sections.build(doc, "", data, table, required, f"{article} {role} config")
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
    if not isinstance(data, dict):  # (no role: to add to a list)
        raise doc.error("", "expected a mapping of settings (key: value lines), "
                            f"got {values.describe(data)}")
    role = data.get("role")
    if role is None:
        guesses = [r for r, key in (("agent", "relay"), ("relay", "listen")) if key in data]
        role = guesses[0] if len(guesses) == 1 else None
    if role == "agent":
        return agent_from(doc)
    if role == "relay":
        return relay_from(doc)
    if "role" in data:
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
            found[key] = values.beside(doc, key, found[key])
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


def _texts(relay: str | tuple[str, ...]) -> tuple[str, ...]:
    return (relay,) if isinstance(relay, str) else relay
