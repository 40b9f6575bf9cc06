"""Parsers for single config values: each checks one YAML value and says, with
its file, line and key (or its flag), what was expected.

A parser is ``(document, key_path, raw_value) -> typed value`` and raises
through ``document.error``; ``schema.py`` composes them into the tables that
describe every key. Command-line flags reach the same parsers (flags.py), so
a value is checked the same way wherever it was written.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ..addresses import HostPort, split_fields
from ._yaml import Document, join_index, join_key
from .headers import check_header, parse_header_line, parse_host_header
from .proxy_url import NO_PROXY, parse_proxy_url
from .textforms import (
    MAX_SOCKET_PATH,
    UNIX_PREFIX,
    parse_host_port,
    parse_listen,
    parse_relay_url,
    parse_size,
    parse_socket_path,
    parse_url_path,
    parse_users,
)

if TYPE_CHECKING:  # (the relay's rule and login parsers load them when used: an agent's
    # flags need none of them, and ``--stdio`` pays for every import at each ssh)
    from ..security.allow_rule import AllowRule
    from ..security.auth import TokenHash
    from ..security.forwarded import IPNetwork
    from ..security.listen_policy import ListenRule

_MAX_DURATION: Final = 86400.0  # larger values are almost surely milliseconds
_MAX_SOCKET_PATH: Final = MAX_SOCKET_PATH
#: A forward's name: safe as a Prometheus label value and in a log line.
FORWARD_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")

T = TypeVar("T")
_log = logging.getLogger("wstunnel.config")
Parser = Callable[[Document, str, Any], Any]

__all__ = [
    "Parser",
    "agent_name",
    "forward_name",
    "listen_or_path",
    "listen_rule",
    "port_text",
    "urls",
    "user_agent",
    "target_or_path",
    "allow_rule",
    "beside",
    "boolean",
    "checked",
    "choice",
    "describe",
    "duration",
    "file_path",
    "fingerprint",
    "headers",
    "host_header",
    "host_port",
    "list_of",
    "listen",
    "optional",
    "proxy",
    "password_file",
    "readable_file",
    "size",
    "socket_path",
    "target",
    "text",
    "token_hash",
    "trusted_proxy",
    "url",
    "url_path",
    "users_file",
]


def describe(value: object) -> str:
    """A value as a message shows it after "got": JSON for scalars, else its kind."""
    if value is None:
        return "nothing"
    if isinstance(value, (str, bool, int, float)):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a mapping"
    return "a list" if isinstance(value, list) else type(value).__name__


def checked(doc: Document, path: str, parse: Callable[[str], T], value: object,
             expected: str) -> T:
    """Apply a text parser, turning its ValueError into a located ConfigError."""
    if not isinstance(value, str):
        raise doc.error(path, f"expected {expected}, got {describe(value)}")
    try:
        return parse(value)
    except ValueError as exc:
        raise doc.error(path, str(exc)) from exc


def duration(minimum: float) -> Parser:
    def parse(doc: Document, path: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise doc.error(path, f"expected a number of seconds, got {describe(value)}")
        if not minimum <= value <= _MAX_DURATION:
            bound = "greater than 0" if minimum > 0 else "at least 0"
            raise doc.error(path, f"expected seconds, {bound} and at most {_MAX_DURATION:g}, "
                                  f"got {value}")
        return float(value)
    return parse


def size(low: int, high: int, what: str = "a size in bytes") -> Parser:
    def parse(doc: Document, path: str, value: Any) -> int:
        if isinstance(value, str):
            value = checked(doc, path, parse_size, value, what)
        if isinstance(value, bool) or not isinstance(value, int):
            raise doc.error(path, f"expected {what}, got {describe(value)}")
        if not low <= value <= high:
            raise doc.error(path, f"expected {what} from {low} to {high}, got {value}")
        return value
    return parse


def choice(options: tuple[str, ...]) -> Parser:
    def parse(doc: Document, path: str, value: Any) -> str:
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        raise doc.error(path, f"expected one of {', '.join(options)}, got {describe(value)}")
    return parse


def host_port(doc: Document, path: str, value: Any) -> HostPort:
    return checked(doc, path, lambda t: parse_host_port(t, allow_zero=True), value, "host:port")


def listen(doc: Document, path: str, value: Any) -> HostPort:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return checked(doc, path, parse_listen, value, "[bind:]port")


def target(doc: Document, path: str, value: Any) -> HostPort:
    if not isinstance(value, str) or len(_split_or_none(value)) != 2:
        raise doc.error(path, f"expected host:port, got {describe(value)}")
    return checked(doc, path, parse_host_port, value, "host:port")


def port_text(doc: Document, path: str, value: Any) -> str:
    """Text that a text form parses next; a bare port may be written as a number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise doc.error(path, f"expected [bind:]port or a /path, got {describe(value)}")
    return value


def listen_or_path(doc: Document, path: str, value: Any) -> HostPort | str:
    """``[bind:]port``, or an absolute path for a unix socket listener."""
    if isinstance(value, str) and value.strip().startswith("/"):
        return checked(doc, path, parse_socket_path, value.strip(), "a unix socket path")
    return listen(doc, path, value)


def target_or_path(doc: Document, path: str, value: Any) -> HostPort | str:
    """``host:port``, or ``unix:/path`` for a unix socket target (the path alone)."""
    if isinstance(value, str) and value.strip().startswith(UNIX_PREFIX):
        return checked(doc, path, parse_socket_path, value.strip()[len(UNIX_PREFIX):],
                       "unix:/path")
    return target(doc, path, value)


def forward_name(doc: Document, path: str, value: Any) -> str:
    """A forward's name: a metric label value and a word in log lines."""
    if not isinstance(value, str) or not FORWARD_NAME.fullmatch(value):
        raise doc.error(path, "expected a forward name (1-64 letters, digits, '-', '_' or "
                              f"'.'), got {describe(value)}")
    return value


def stdio_target(doc: Document, path: str, value: Any) -> HostPort:
    """``host:port``, also as ssh's ``%h:%p`` writes an IPv6 address: ``::1:22``."""
    if isinstance(value, str) and value.count(":") > 1 and not value.startswith("["):
        host, _, port = value.rpartition(":")
        value = f"[{host}]:{port}"
    return target(doc, path, value)


def _split_or_none(written: str) -> list[str]:
    try:
        return split_fields(written.strip())
    except ValueError:
        return []


def optional(parse: Parser) -> Parser:
    def parse_or_none(doc: Document, path: str, value: Any) -> Any:
        return None if value is None else parse(doc, path, value)
    return parse_or_none


def socket_path(doc: Document, path: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise doc.error(path, f"expected a file path, got {describe(value)}")
    if len(value.encode()) > _MAX_SOCKET_PATH:
        raise doc.error(path, f"a unix socket path may have at most {_MAX_SOCKET_PATH} bytes, "
                              f"got {len(value.encode())}; pick a shorter one")
    return value


def url(doc: Document, path: str, value: Any) -> str:
    if isinstance(value, str):
        value = _as_websocket_url(doc, path, value)
    checked(doc, path, parse_relay_url, value, "a ws:// or wss:// URL")
    return str(value).strip()


def urls(doc: Document, path: str, value: Any) -> str | tuple[str, ...]:
    """One relay URL, or a list of them (the first preferred, the others fallbacks)."""
    if not isinstance(value, list):
        return url(doc, path, value)
    if not value:
        raise doc.error(path, "expected a ws:// or wss:// URL, or a list of them; got []")
    found = tuple(url(doc, join_index(path, i), item) for i, item in enumerate(value))
    return found[0] if len(found) == 1 else found


_WEBSOCKET_SCHEMES: Final = {"http": "ws", "https": "wss"}


def _as_websocket_url(doc: Document, path: str, text: str) -> str:
    """People type the relay's address as a web address; the relay speaks WebSocket
    on the same port, so ``http(s)://`` means ``ws(s)://`` (said once, as info)."""
    scheme, sep, rest = text.strip().partition("://")
    websocket = _WEBSOCKET_SCHEMES.get(scheme.lower()) if sep else None
    if websocket is None:
        return text
    written = f"{websocket}://{rest}"
    _log.info("%s", doc.error(path, f"{text.strip()} taken as {written} "
                                    f"(the relay's URL is ws:// or wss://)"))
    return written


def url_path(doc: Document, path: str, value: Any) -> str:
    return checked(doc, path, parse_url_path, value, "a URL path such as /tunnel")


def list_of(item: Parser, *, at_least: int = 0) -> Parser:
    def parse(doc: Document, path: str, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise doc.error(path, f"expected a list, got {describe(value)}")
        if len(value) < at_least:
            raise doc.error(path, f"expected at least {at_least} entry, got none")
        return tuple(item(doc, join_index(path, i), v) for i, v in enumerate(value))
    return parse


def allow_rule(doc: Document, path: str, value: Any) -> AllowRule:
    from ..security.allow_rule import AllowRule

    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # a bare YAML number cannot be a rule, but say why below
    return checked(doc, path, AllowRule.parse, value, "a host, pattern, IP or CIDR rule")


def listen_rule(doc: Document, path: str, value: Any) -> ListenRule:
    from ..security.listen_policy import ListenRule

    return checked(doc, path, ListenRule.parse, value,
                   "an IP or CIDR with an optional port, or unix:/path")


def boolean(doc: Document, path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise doc.error(path, f"expected true or false, got {describe(value)}")
    return value


def text(what: str) -> Parser:
    def parse(doc: Document, path: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise doc.error(path, f"expected {what}, got {describe(value)}")
        return value.strip()
    return parse


file_path = text("a file path")


def fingerprint(doc: Document, path: str, value: Any) -> str:
    from ..security.tls import parse_fingerprint

    return checked(doc, path, parse_fingerprint, value, "sha256:<hex> as keygen prints it")


def token_hash(doc: Document, path: str, value: Any) -> TokenHash:
    from ..security.auth import TokenHash

    return checked(doc, path, TokenHash.parse, value, "hmac-sha256:... as keygen prints it")


def agent_name(doc: Document, path: str, value: Any) -> str:
    from ..security.auth import AGENT_NAME

    if not isinstance(value, str) or not AGENT_NAME.fullmatch(value):
        raise doc.error(path, f"expected an agent name (1-64 letters, digits, '-' or '_'), "
                              f"got {describe(value)}")
    return value


def proxy(doc: Document, path: str, value: Any) -> str:
    if value is None:
        raise doc.error(path, f"expected an http:// proxy URL or {NO_PROXY!r} (connect "
                              "directly); leave the key out to use HTTPS_PROXY/HTTP_PROXY")
    if isinstance(value, str) and value.strip().lower() == NO_PROXY:
        return NO_PROXY
    checked(doc, path, parse_proxy_url, value, "an http:// proxy URL")
    return str(value).strip()


def readable_file(doc: Document, path: str, value: Any) -> str:
    """A file the role reads (``metrics_auth_file``): relative to the config file."""
    return _readable(doc, path, value, credential=False)


def password_file(doc: Document, path: str, value: Any) -> str:
    """``proxy_password_file``: as ``readable_file``, but a ``$CREDENTIALS_DIRECTORY/NAME``
    is left for the agent to expand when it reads it (only systemd's unit has it)."""
    return _readable(doc, path, value, credential=True)


def beside(doc: Document, key_path: str, name: str) -> str:
    """A relative file name in a config file is relative to that file's directory."""
    if name.startswith("$") or Path(name).is_absolute() or not doc.in_file(key_path):
        return name
    return str(Path(doc.source).parent / name)


def _readable(doc: Document, path: str, value: Any, *, credential: bool) -> str:
    if not isinstance(value, str) or not value.strip():
        raise doc.error(path, f"expected a file name, got {describe(value)}")
    name = beside(doc, path, value.strip())
    if credential and name.startswith("$"):
        return name
    if not os.access(name, os.R_OK) or not os.path.isfile(name):
        raise doc.error(path, f"cannot read {json.dumps(name)}: no such file, or no "
                              f"permission; fix the path (relative names are relative to "
                              f"the config file) or the file's permissions")
    return name


def users_file(doc: Document, path: str, name: str) -> frozenset[tuple[str, str]]:
    """The ``user:password`` pairs of a ``-D`` forward's users file (read at load and reload)."""
    try:
        with open(name, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise doc.error(path, f"cannot read {json.dumps(name)}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from exc
    try:
        return parse_users(text)
    except ValueError as exc:
        raise doc.error(path, f"{name}: {exc}") from exc


def headers(doc: Document, path: str, value: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(value, list):
        return tuple(checked(doc, join_index(path, i), parse_header_line, line,
                              "'Name: value'") for i, line in enumerate(value))
    if not isinstance(value, dict):
        raise doc.error(path, f"expected a mapping of header names to values, "
                              f"got {describe(value)}")
    pairs = []
    for name, raw in value.items():
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            raw = str(raw)
        if not isinstance(raw, str):
            raise doc.error(join_key(path, str(name)), f"expected a header value (text), "
                                                       f"got {describe(raw)}")
        pairs.append(checked(doc, join_key(path, str(name)),
                              functools.partial(check_header, str(name)), raw, "text"))
    return tuple(pairs)


def user_agent(doc: Document, path: str, value: Any) -> str:
    """A header value: a line break would break every request to the relay."""
    written: str = text("a User-Agent text")(doc, path, value)
    return checked(doc, path, lambda t: check_header("User-Agent", t)[1], written,
                   "a User-Agent text")


def host_header(doc: Document, path: str, value: Any) -> str:
    return checked(doc, path, parse_host_header, value, "host or host:port")


def trusted_proxy(doc: Document, path: str, value: Any) -> IPNetwork:
    from ..security.forwarded import parse_trusted_proxy

    return checked(doc, path, parse_trusted_proxy, value, "an IP address or CIDR network")


