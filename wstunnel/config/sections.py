"""The mappings nested in a config: ``forwards`` entries (each kind), ``agents``
entries, the ``tls`` and ``rate_limit`` sections; and ``build``, which parses any
mapping, the whole document's too, against its table of keys.

Apart from schema.py, which keeps the top-level tables, the rules between keys
and the loaders; the messages (file, line, key path, what was expected) are the
same wherever a mapping is parsed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from ..addresses import HostPort
from . import values
from ._yaml import Document, join_key
from .model import RateLimit

if TYPE_CHECKING:  # (loaded where a relay config is built: see relay_model.py)
    from .relay_model import AgentAccount, RelayTLS
from .textforms import (
    DEFAULT_UDP_IDLE_TIMEOUT,
    LOCAL,
    REVERSE,
    TCP,
    UDP,
    Forward,
    KiB,
    check_reverse_listen,
    parse_forward,
    parse_listen,
    parse_socket_path,
)
from .values import Parser

__all__ = ["agent_account", "build", "forward", "rate_limit", "relay_tls"]

_RESERVED_KEYS: Final = {
    "token": "a token is a secret and does not belong in a config file: put it in a file "
             "(token_file), an environment variable (token_env) or a systemd credential "
             "(token_credential)",
}


def agent_account(doc: Document, path: str, value: Any) -> AgentAccount:
    from .relay_model import AgentAccount

    found = build(doc, path, value, _ACCOUNT_FIELDS,
                   {"token_hash": False, "allow": False, "listen_allow": False,
                    "rate_limit": False}, "an agent entry")
    return AgentAccount(**found)


def rate_limit(doc: Document, path: str, value: Any) -> RateLimit:
    """``{down: 10MiB, up: 5MiB, burst: 1MiB}``: bytes per second, at least one way."""
    found = build(doc, path, value, _RATE_LIMIT_FIELDS, dict.fromkeys(_RATE_LIMIT_FIELDS, False),
                   "a rate_limit section (down, up: bytes per second; burst: bytes)")
    if "down" not in found and "up" not in found:
        raise doc.error(path, "expected down, up or both (bytes per second, e.g. down: 10MiB)")
    return RateLimit(**found)


def relay_tls(doc: Document, path: str, value: Any) -> RelayTLS:
    from .relay_model import RelayTLS

    found = build(doc, path, value, _TLS_FIELDS, {"client_ca_file": False}, "a tls section")
    return RelayTLS(**{key: values.beside(doc, join_key(path, key), name)
                       for key, name in found.items()})


def forward(doc: Document, path: str, value: Any) -> Forward:
    """One ``forwards`` entry: ``-L``'s text, or a mapping whose first key says the
    kind (``listen``, ``dynamic``, ``reverse``); each mapping may carry a ``name``."""
    if isinstance(value, str):
        return values.checked(doc, path, parse_forward, value,
                              "[bind:]port:host:port, or a mapping")
    if isinstance(value, dict) and "dynamic" in value:
        return _dynamic_forward(doc, path, value)
    if isinstance(value, dict) and "reverse" in value:
        return _reverse_forward(doc, path, value)
    found = build(doc, path, value, _FORWARD_FIELDS, _OPTIONAL_FORWARD_KEYS, "a forward")
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
    found = build(doc, path, value, _DYNAMIC_FIELDS,
                   {"users_file": False, "name": False, "udp_idle_timeout": False,
                    "rate_limit": False}, "a dynamic forward")
    users = None
    if "users_file" in found:
        name = values.beside(doc, join_key(path, "users_file"), found["users_file"])
        users = values.users_file(doc, join_key(path, "users_file"), name)
    return dataclasses.replace(Forward.dynamic(found["dynamic"], users), name=found.get("name"),
                               rate_limit=found.get("rate_limit"),
                               udp_idle_timeout=found.get("udp_idle_timeout",
                                                          DEFAULT_UDP_IDLE_TIMEOUT))


def _reverse_forward(doc: Document, path: str, value: dict[str, Any]) -> Forward:
    """``{reverse: "[bind:]port", target: "host:port"}`` or ``-R``'s whole text as
    ``reverse`` (the relay listens; this agent dials the target)."""
    found = build(doc, path, value, _REVERSE_FIELDS,
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
                                              "rate_limit": rate_limit}
_FORWARD_FIELDS: Final[dict[str, Parser]] = {"listen": values.listen_or_path,
                                             "target": values.target_or_path,
                                             "name": values.forward_name,
                                             **_PROTOCOL_FIELDS}
_DYNAMIC_FIELDS: Final[dict[str, Parser]] = {"dynamic": values.listen,
                                             "users_file": values.file_path,
                                             "name": values.forward_name,
                                             "udp_idle_timeout": values.duration(0.001),
                                             "rate_limit": rate_limit}
_REVERSE_FIELDS: Final[dict[str, Parser]] = {"reverse": values.port_text,
                                             "target": values.target_or_path,
                                             "name": values.forward_name,
                                             **_PROTOCOL_FIELDS}
_ACCOUNT_FIELDS: Final[dict[str, Parser]] = {
    "name": values.agent_name,
    "token_hash": values.token_hash,
    "allow": values.list_of(values.allow_rule),
    "listen_allow": values.list_of(values.listen_rule),
    "rate_limit": rate_limit,
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


def build(doc: Document, path: str, value: Any, table: Mapping[str, Parser],
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

