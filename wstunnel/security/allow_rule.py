"""Allow rules: one rule's text (``AllowRule.parse``) and the destinations it matches.

A rule stands on its own: the config parsers read rules, listen_policy.py builds
its rules on them, and policy.py weighs the rules against the dangerous
addresses and the relay host itself. Keeping the syntax here keeps policy.py
about the verdict.

Rules come in three kinds for ``host:port`` destinations (``AllowRule.parse``),
each with an optional port or port range (no port means any port), and one
for unix socket paths:

* a host name (``db.internal``) - matches the *requested* name exactly;
* a pattern (``*.example.com``) - matches any name below ``example.com`` at
  any depth, but not ``example.com`` itself;
* an IP address or CIDR (``10.0.0.5``, ``10.0.0.0/8``, ``[fd00::/8]:22``) -
  matches the *address actually connected to* (the relay resolves the name
  first and asks again with the address), or the requested host when that is
  already a literal IP;
* a unix socket path (``unix:/run/postgresql/.s.PGSQL.5432``) - matches that
  path exactly, or with a trailing ``/*`` (``unix:/run/app/*``) any socket
  directly in that directory (not in its subdirectories); ``unix:/run/app/``
  is refused with that hint, since it would match nothing. The requested path
  must be normal (absolute, no ``.``/``..`` components, no ``//``): it is
  compared as text and the kernel resolves it, so ``/run/app/x/../y`` could
  leave the directory through a symlink ``x``. Symbolic links inside an
  allowed directory are followed: whoever may write there decides.

A path rule never allows a ``host:port`` and a ``host:port`` rule never
allows a path (``Policy.refusal``, ``Policy.path_refusal``).

Rules name a protocol: a plain rule is for TCP, a rule written ``udp:RULE``
(``udp:10.0.0.53:53``, ``udp:*.example.com:53``, ``udp:[fd00::/8]``) is for
UDP flows only. A TCP rule never allows UDP and a UDP rule never allows TCP
(``Policy.refusal(..., udp=True)``); everything else (names, patterns,
addresses after DNS, the dangerous blocks, this host) works the same way.

Pure, like policy.py: no DNS, no sockets. Address syntax (host names, IP
literals, ports) is ``addresses.py``'s, shared with the config parsers.
"""

from __future__ import annotations

import enum
import ipaddress
import posixpath
from dataclasses import dataclass
from typing import Final

from ..addresses import (
    IPAddress,
    IPNetwork,
    is_hostname,
    normalize_hostname,
    parse_ip,
    parse_port,
)

__all__ = [
    "AllowRule",
    "RuleKind",
    "is_normal_path",
    "parse_path_rule",
    "path_matches",
    "UDP_RULE_PREFIX",
    "UNIX_RULE_PREFIX",
]

#: How a unix socket path rule is written: ``unix:/run/app.sock``, ``unix:/run/app/*``.
UNIX_RULE_PREFIX: Final = "unix:"
#: How a UDP rule is written: ``udp:10.0.0.53:53`` (any host:port rule after the prefix).
UDP_RULE_PREFIX: Final = "udp:"
_DIRECTORY_GLOB: Final = "/*"


class RuleKind(enum.Enum):
    """What an ``AllowRule`` matches against."""

    NAME = "name"  # the requested host name, exactly
    PATTERN = "pattern"  # the requested host name, any name below a suffix
    NETWORK = "network"  # the address connected to
    PATH = "unix path"  # a unix socket path, exactly or directly in a directory (``/*``)


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One allowed destination; build with ``AllowRule.parse``.

    ``host`` is the normalized name, the suffix with its leading dot
    (``.example.com``) for patterns, the network text for NETWORK rules, or
    the path (possibly ending in ``/*``) for PATH rules.
    """

    kind: RuleKind
    host: str
    network: IPNetwork | None = None
    port_low: int = 1
    port_high: int = 65535
    udp: bool = False  # a ``udp:`` rule: UDP flows only (and never TCP)

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """Parse ``host``, ``*.suffix``, ``ip``, ``cidr``, each with optional ``:port``/``:lo-hi``.

        IPv6 addresses and networks need brackets when a port follows
        (``[fd00::/8]:22``); without brackets the whole text is the address.

        ``unix:/path`` or ``unix:/directory/*``: a unix socket path rule.
        ``udp:`` followed by a host, pattern, IP or CIDR rule: the same, for UDP.

        Raises:
            ValueError: with a message saying what is wrong and what was expected.
        """
        if text.strip().startswith(UDP_RULE_PREFIX):
            return _udp_rule(text.strip())
        if text.strip().startswith(UNIX_RULE_PREFIX):
            return cls(RuleKind.PATH, parse_path_rule(text.strip()))
        host, ports = _split_rule(text.strip())
        low, high = _parse_port_range(ports) if ports is not None else (1, 65535)
        if "/" in host or parse_ip(host) is not None:
            network = _parse_network(host)
            return cls(RuleKind.NETWORK, str(network), network, low, high)
        if host.startswith("*."):
            suffix = normalize_hostname(host[2:])
            if not is_hostname(suffix):
                raise ValueError(f"expected a pattern like *.example.com, got {host!r}")
            return cls(RuleKind.PATTERN, "." + suffix, None, low, high)
        if "*" in host:
            raise ValueError(
                f"{host!r}: '*' is only allowed as a leading '*.' (e.g. *.example.com); "
                "to allow every public address use 0.0.0.0/0 and ::/0"
            )
        if not is_hostname(host):
            raise ValueError(f"expected a host name, IP address or CIDR, got {host!r}")
        return cls(RuleKind.NAME, normalize_hostname(host), None, low, high)

    def __str__(self) -> str:
        if self.kind is RuleKind.PATH:
            return UNIX_RULE_PREFIX + self.host
        prefix = UDP_RULE_PREFIX if self.udp else ""
        host = "*" + self.host if self.kind is RuleKind.PATTERN else self.host
        if self.port_low == 1 and self.port_high == 65535:
            return prefix + host
        if self.network is not None and self.network.version == 6:
            host = f"[{host}]"
        if self.port_low == self.port_high:
            return f"{prefix}{host}:{self.port_low}"
        return f"{prefix}{host}:{self.port_low}-{self.port_high}"

    def matches(self, name: str | None, port: int, address: IPAddress | None, *,
                udp: bool = False) -> bool:
        """True if this rule covers the destination.

        Args:
            name: normalized requested host name, or None if the host was an IP.
            port: requested port.
            address: the address to be connected to, if known.
            udp: the destination of a UDP flow (only ``udp:`` rules match), else TCP.
        """
        if (not self.port_low <= port <= self.port_high or self.kind is RuleKind.PATH
                or self.udp is not udp):
            return False
        if self.kind is RuleKind.NAME:
            return name == self.host
        if self.kind is RuleKind.PATTERN:
            return name is not None and name.endswith(self.host)
        assert self.network is not None
        return (
            address is not None
            and address.version == self.network.version
            and address in self.network
        )

    def may_match_after_dns(self, port: int, *, udp: bool = False) -> bool:
        """True for an IP/CIDR rule covering ``port`` (and the protocol): whether it
        matches a host name depends on what the name resolves to, so only DNS tells."""
        return (self.kind is RuleKind.NETWORK and self.udp is udp
                and self.port_low <= port <= self.port_high)

    def matches_path(self, path: str) -> bool:
        """True if this rule covers the unix socket ``path`` (a normal absolute path,
        ``is_normal_path``)."""
        return self.kind is RuleKind.PATH and path_matches(self.host, path)

    def names_explicitly(self, block: IPNetwork, label: str) -> bool:
        """True if this rule deliberately targets the dangerous ``block``."""
        if self.kind is RuleKind.NETWORK:
            assert self.network is not None
            return self.network.version == block.version and self.network.subnet_of(
                block  # type: ignore[arg-type]  # versions checked just above
            )
        return label == "loopback" and (
            self.kind is RuleKind.NAME
            and (self.host == "localhost" or self.host.endswith(".localhost"))
        )

    def names_address(self, address: IPAddress, port: int | None = None) -> bool:
        """True if this rule is for exactly ``address`` (and, given, exactly ``port``)."""
        network = self.network
        return (
            network is not None
            and network.num_addresses == 1
            and network.network_address == address
            and (port is None or self.port_low == self.port_high == port)
        )


def _udp_rule(text: str) -> AllowRule:
    """A ``udp:`` rule: the host:port rule after the prefix, for UDP."""
    rest = text[len(UDP_RULE_PREFIX):].strip()
    if rest.startswith((UNIX_RULE_PREFIX, UDP_RULE_PREFIX)):
        raise ValueError(f"expected udp: followed by a host, pattern, IP or CIDR rule "
                         f"(unix sockets are streams), got {text!r}")
    try:
        rule = AllowRule.parse(rest)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from exc
    return AllowRule(rule.kind, rule.host, rule.network, rule.port_low, rule.port_high, udp=True)


def parse_path_rule(text: str) -> str:
    """The path of a ``unix:`` rule, ``unix:/path`` or ``unix:/directory/*`` (the
    destination and the listen policy share it; ``path_matches`` is what it means).

    Raises:
        ValueError: not such a rule; for ``unix:/directory/`` (which no socket path
            would ever equal), what to write instead.
    """
    path = text[len(UNIX_RULE_PREFIX):]
    directory = path.removesuffix(_DIRECTORY_GLOB) if path != _DIRECTORY_GLOB else "/"
    bare = path.rstrip("/") or "/"
    if path.endswith("/") and is_normal_path(bare) and "*" not in bare:
        glob = UNIX_RULE_PREFIX + bare.rstrip("/") + _DIRECTORY_GLOB
        raise ValueError(
            f"{text!r} names a directory, and no socket path equals a directory: write "
            f"{glob} for any socket directly in {bare} (not in its subdirectories), or "
            f"the socket's own path")
    if not is_normal_path(directory) or "*" in directory:
        raise ValueError(
            f"expected unix:/absolute/path or unix:/directory/* (no *, '.' or '..' "
            f"elsewhere, no trailing '/'), got {text!r}")
    return path


def path_matches(rule_path: str, path: str) -> bool:
    """True if the rule path (``parse_path_rule``) covers the socket ``path`` (a
    normal absolute path): that path exactly, or for ``/directory/*`` any name
    directly in that directory."""
    if not rule_path.endswith(_DIRECTORY_GLOB):
        return path == rule_path
    directory = rule_path[:-1]  # (with its trailing "/")
    name = path[len(directory):]
    return path.startswith(directory) and "/" not in name and name not in ("", ".", "..")


def is_normal_path(path: str) -> bool:
    """True for an absolute path without NUL, empty, ``.`` or ``..`` components: one
    that means what its text says (up to symbolic links)."""
    return (path.startswith("/") and "\0" not in path
            and (path == "/" or posixpath.normpath(path) == path)
            and not path.startswith("//"))


def _split_rule(text: str) -> tuple[str, str | None]:
    """Split a rule into host and port text; see ``AllowRule.parse``."""
    if not text:
        raise ValueError("empty rule; expected a host, pattern, IP or CIDR")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [ipv6] or [ipv6]:port, got {text!r}")
        if parse_ip(host.partition("/")[0]) is None:
            raise ValueError(f"brackets are only for IPv6 addresses, got {text!r}")
        return host, (rest[1:] if rest else None)
    if text.count(":") > 1:
        return text, None  # bare IPv6 address or network: no port
    host, sep, ports = text.partition(":")
    return host, (ports if sep else None)


def _parse_port_range(text: str) -> tuple[int, int]:
    low_text, sep, high_text = text.partition("-")
    low = parse_port(low_text)
    high = parse_port(high_text) if sep else low
    if high < low:
        raise ValueError(f"port range {text!r} is backwards; write {high}-{low}")
    return low, high


def _parse_network(text: str) -> IPNetwork:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        loose = _loose_network(text)
        hint = f"; did you mean {loose}?" if loose is not None else ""
        raise ValueError(f"expected an IP address or CIDR, got {text!r}{hint}") from exc
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen == 128:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(mapped)
    return network


def _loose_network(text: str) -> IPNetwork | None:
    """The network ``text`` names if host bits were cleared, for the error hint."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
