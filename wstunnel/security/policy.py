"""Destination policy: which ``host:port`` an agent may ask the relay to open.

Theory of operation
-------------------
A relay is a door into the network it stands in, so it is closed by default:
``Policy([])`` allows nothing, and every OPEN is checked against the rules.

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
  directly in that directory (not in its subdirectories). The requested path
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

Some addresses are dangerous even when a broad rule covers them: loopback
(the relay host itself), the unspecified address (which also reaches the
relay host), link-local, and cloud metadata services. They are refused unless
a rule names them *explicitly*: an IP/CIDR rule that lies entirely inside the
dangerous block the address belongs to (``127.0.0.1`` or ``127.0.0.0/8``
unlock loopback, ``0.0.0.0/0`` does not; a metadata address needs a rule for
exactly that address, ``169.254.0.0/16`` is not enough). The one name that
counts as explicit is ``localhost`` (and names under ``.localhost``, which
RFC 6761 reserves for loopback), and it unlocks loopback only. So a rule
``evil.example.com`` whose name resolves to ``127.0.0.1`` is still refused.

The relay host's own addresses (those of every interface, which reach its
services from the inside as loopback does) and the sockets this process
listens on (the relay's port, its metrics) are dangerous too. What this host
is comes in as ``HostSelf``: by default the process-wide ``this_host``, which
the relay fills at start and on reload (net/local_addresses.py enumerates the
addresses). An own address needs a rule for *exactly* that address
(``192.0.2.2`` or ``192.0.2.2:22``; no network containing it, however small,
and no name); an own listener needs a rule for exactly its address *and*
port (``127.0.0.1:9108``).

Everything here is pure: no DNS, no sockets. Address syntax (host names, IP
literals, ports) is ``addresses.py``'s, shared with the config parsers.
"""

from __future__ import annotations

import enum
import ipaddress
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ..addresses import (
    IPAddress,
    IPNetwork,
    bracketed,
    is_hostname,
    normalize_hostname,
    parse_ip,
    parse_port,
    unmap_ipv4,
)

__all__ = [
    "AllowRule",
    "HostSelf",
    "Listener",
    "Policy",
    "RuleKind",
    "is_normal_path",
    "UDP_RULE_PREFIX",
    "UNIX_RULE_PREFIX",
    "special_block",
    "this_host",
]

#: Verdicts a Policy remembers (the set is forgotten when full).
_MAX_VERDICTS: Final = 1024
#: How a unix socket path rule is written: ``unix:/run/app.sock``, ``unix:/run/app/*``.
UNIX_RULE_PREFIX: Final = "unix:"
#: How a UDP rule is written: ``udp:10.0.0.53:53`` (any host:port rule after the prefix).
UDP_RULE_PREFIX: Final = "udp:"
_DIRECTORY_GLOB: Final = "/*"

# Ordered most specific first: an address belongs to the first block that
# contains it, and only a rule inside that block unlocks it.
_SPECIAL_BLOCKS: Final[tuple[tuple[IPNetwork, str], ...]] = tuple(
    (ipaddress.ip_network(net), label)
    for net, label in (
        ("169.254.169.254/32", "cloud metadata"),  # AWS, GCP, Azure, OpenStack
        ("fd00:ec2::254/128", "cloud metadata"),  # AWS over IPv6
        ("100.100.100.200/32", "cloud metadata"),  # Alibaba Cloud
        ("168.63.129.16/32", "cloud metadata"),  # Azure WireServer
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("0.0.0.0/8", "unspecified"),  # connecting to 0.0.0.0 reaches this host
        ("::/128", "unspecified"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/10", "link-local"),
    )
)


def special_block(address: IPAddress) -> tuple[IPNetwork, str] | None:
    """The dangerous block (and its label) that ``address`` falls in, if any."""
    address = unmap_ipv4(address)
    for network, label in _SPECIAL_BLOCKS:
        if network.version == address.version and address in network:
            return network, label
    return None


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
            return cls(RuleKind.PATH, _parse_path_rule(text.strip()))
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

    def matches_path(self, path: str) -> bool:
        """True if this rule covers the unix socket ``path`` (a normal absolute path,
        ``is_normal_path``)."""
        if self.kind is not RuleKind.PATH:
            return False
        if not self.host.endswith(_DIRECTORY_GLOB):
            return path == self.host
        directory = self.host[:-1]  # (with its trailing "/")
        name = path[len(directory):]
        return path.startswith(directory) and "/" not in name and name not in ("", ".", "..")

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


def _parse_path_rule(text: str) -> str:
    """The path of a ``unix:`` rule (see ``AllowRule.parse``)."""
    path = text[len(UNIX_RULE_PREFIX):]
    directory = path.removesuffix(_DIRECTORY_GLOB) if path != _DIRECTORY_GLOB else "/"
    if not is_normal_path(directory) or "*" in directory:
        raise ValueError(
            f"expected unix:/absolute/path or unix:/directory/* (no *, '.' or '..' "
            f"elsewhere, no trailing '/'), got {text!r}")
    return path


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


@dataclass(frozen=True, slots=True)
class Listener:
    """A socket this process listens on, as a destination to refuse."""

    address: IPAddress | None  # None: bound to 0.0.0.0 or ::, every address of the host
    port: int
    label: str  # what it is, for the refusal ("tunnel port", "metrics")

    @classmethod
    def bound(cls, host: str, port: int, label: str) -> Listener:
        """The listener of a socket bound to ``(host, port)`` (``getsockname``)."""
        address = parse_ip(host.split("%")[0])
        if address is not None and address.is_unspecified:
            address = None
        return cls(address, port, label)


@dataclass(frozen=True, slots=True)
class HostSelf:
    """The relay host as a destination: its own addresses, and its listeners."""

    addresses: frozenset[IPAddress] = frozenset()
    listeners: tuple[Listener, ...] = ()

    def owns(self, address: IPAddress) -> bool:
        """True if a connection to ``address`` stays on this host."""
        return address in self.addresses or _loops_back(address)

    def is_own_address(self, address: IPAddress) -> bool:
        """True for an address of this host other than loopback and unspecified
        (those are dangerous blocks of their own, with their own rule)."""
        return address in self.addresses and not _loops_back(address)

    def listener_at(self, address: IPAddress, port: int) -> Listener | None:
        """Our listener that a connection to ``address:port`` would reach, if any."""
        for listener in self.listeners:
            if listener.port == port and (
                listener.address == address
                or ((listener.address is None or address.is_unspecified) and self.owns(address))
            ):
                return listener
        return None


def _loops_back(address: IPAddress) -> bool:
    block = special_block(address)
    return block is not None and block[1] in ("loopback", "unspecified")


class ThisHost:
    """The process-wide ``HostSelf`` (``this_host``): the relay sets the addresses at
    start and on reload; each listener (relay, metrics) adds itself while it serves."""

    def __init__(self) -> None:
        self.current = HostSelf()
        self._listeners: Counter[Listener] = Counter()

    def set_addresses(self, addresses: Iterable[IPAddress]) -> None:
        """This host's interface addresses (loopback may be included; it is refused anyway)."""
        self.current = HostSelf(frozenset(unmap_ipv4(a) for a in addresses), self.current.listeners)

    def add_listeners(self, listeners: Iterable[Listener]) -> None:
        self._listeners.update(listeners)
        self._publish()

    def remove_listeners(self, listeners: Iterable[Listener]) -> None:
        self._listeners.subtract(listeners)
        self._publish()

    def _publish(self) -> None:
        live = tuple(listener for listener, count in self._listeners.items() if count > 0)
        self._listeners = Counter({listener: self._listeners[listener] for listener in live})
        self.current = HostSelf(self.current.addresses, live)


this_host: Final = ThisHost()


class Policy:
    """An ordered set of ``AllowRule``; empty means nothing is allowed."""

    def __init__(self, rules: Iterable[AllowRule | str] = (), *,
                 host: HostSelf | None = None) -> None:
        """Args:
        rules: parsed rules or rule text (parsed with ``AllowRule.parse``).
        host: what this host is (own addresses and listeners); default: ``this_host``
            as it is at each check.
        """
        self.rules: tuple[AllowRule, ...] = tuple(
            rule if isinstance(rule, AllowRule) else AllowRule.parse(rule) for rule in rules
        )
        self._host = host
        # Verdicts of refusal(), which is pure: a relay asks the same few questions
        # for every channel (~20 us each, a noticeable part of a short connection).
        # They hold for one HostSelf: another one (a reload) clears them.
        self._verdicts: dict[tuple[str, int, IPAddress | None, bool], str | None] = {}
        self._verdicts_for: HostSelf | None = None

    def __repr__(self) -> str:
        return f"Policy({[str(rule) for rule in self.rules]!r})"

    def allows(self, host: str, port: int, address: IPAddress | None = None, *,
               udp: bool = False) -> bool:
        """True if the agent may open ``host:port`` (connecting to ``address``);
        ``udp``: a UDP flow (only ``udp:`` rules), else a TCP connection.

        Call it with the resolved ``address`` for the final decision. Without
        one, IP/CIDR rules cannot match a host name (so a False is not final),
        and a True from a name rule may still turn into a refusal once the
        name resolves to a dangerous address.
        """
        return self.refusal(host, port, address, udp=udp) is None

    def refusal(self, host: str, port: int, address: IPAddress | None = None, *,
                udp: bool = False) -> str | None:
        """Why ``host:port`` is refused (one line for the relay log), or None if allowed;
        ``udp``: for a UDP flow."""
        facts = self._host or this_host.current
        if facts is not self._verdicts_for:
            self._verdicts.clear()
            self._verdicts_for = facts
        key = (host, port, address, udp)
        verdicts = self._verdicts
        if key in verdicts:
            return verdicts[key]
        verdict = self._refusal(host, port, address, facts, udp)
        if len(verdicts) >= _MAX_VERDICTS:
            verdicts.clear()
        verdicts[key] = verdict
        return verdict

    def allows_path(self, path: str) -> bool:
        """True if the agent may connect to the unix socket ``path``."""
        return self.path_refusal(path) is None

    def path_refusal(self, path: str) -> str | None:
        """Why the unix socket ``path`` is refused (one line for the relay log), or None."""
        shown = UNIX_RULE_PREFIX + path
        if not is_normal_path(path):
            return (f"{shown!r} is not a normal absolute path (no '.', '..' or empty "
                    f"components); ask for the path itself")
        if any(rule.matches_path(path) for rule in self.rules):
            return None
        if not any(rule.kind is RuleKind.PATH for rule in self.rules):
            return (f"no allow rule matches {shown}: unix sockets need a unix:/path rule "
                    f"(host:port rules never allow them)")
        return f"no allow rule matches {shown}"

    def _refusal(
        self, host: str, port: int, address: IPAddress | None, facts: HostSelf, udp: bool
    ) -> str | None:
        literal = parse_ip(host.strip("[]"))
        name = None if literal is not None else normalize_hostname(host)
        target = unmap_ipv4(address) if address is not None else literal
        matching = [rule for rule in self.rules if rule.matches(name, port, target, udp=udp)]
        shown = host if target is None or target == literal else f"{host} ({target})"
        if not matching:
            if udp:
                return (f"no allow rule matches udp {shown} port {port} (UDP needs a "
                        f"udp: rule, e.g. udp:{bracketed(host)}:{port}; TCP rules never "
                        f"allow UDP)")
            return f"no allow rule matches {shown} port {port}"
        if target is None:
            return None
        return (_block_refusal(shown, target, matching)
                or _self_refusal(shown, target, port, matching, facts))


def _block_refusal(shown: str, target: IPAddress, matching: list[AllowRule]) -> str | None:
    block = special_block(target)
    if block is None or any(rule.names_explicitly(*block) for rule in matching):
        return None
    network, label = block
    return (
        f"{shown} is a {label} address; only a rule naming it explicitly "
        f"(e.g. {target} or a network inside {network}) allows it"
    )


def _self_refusal(
    shown: str, target: IPAddress, port: int, matching: list[AllowRule], facts: HostSelf
) -> str | None:
    """Why ``target:port`` is refused as the relay host itself, if it is."""
    listener = facts.listener_at(target, port)
    if listener is not None:
        if any(rule.names_address(target, port) for rule in matching):
            return None
        return (f"{shown} port {port} is this relay's own {listener.label}; only a rule for "
                f"exactly that address and port ({_endpoint(target, port)}) allows it")
    if not facts.is_own_address(target) or any(rule.names_address(target) for rule in matching):
        return None
    return (f"{shown} is an address of the relay host itself; only a rule for exactly that "
            f"address (e.g. {target} or {_endpoint(target, port)}) allows it")


def _endpoint(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
