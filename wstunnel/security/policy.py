"""Destination policy: which ``host:port`` an agent may ask the relay to open.

Theory of operation
-------------------
A relay is a door into the network it stands in, so it is closed by default:
``Policy([])`` allows nothing, and every OPEN is checked against the rules
(allow_rule.py: the kinds of rule, their syntax, and what each one matches).

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

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ..addresses import (
    IPAddress,
    IPNetwork,
    bracketed,
    normalize_hostname,
    parse_ip,
    unmap_ipv4,
)
from .allow_rule import UNIX_RULE_PREFIX, AllowRule, RuleKind, is_normal_path

__all__ = [
    "HostSelf",
    "Listener",
    "Policy",
    "special_block",
    "this_host",
]

#: Verdicts a Policy remembers (the set is forgotten when full).
_MAX_VERDICTS: Final = 1024
# Ordered most specific first: an address belongs to the first block that
# contains it, and only a rule inside that block unlocks it.
_SPECIAL_BLOCKS: Final[tuple[tuple[IPNetwork, str], ...]] = tuple(
    (ipaddress.ip_network(net), label)
    for net, label in (
        ("169.254.169.254/32", "cloud metadata"),  # AWS, GCP, Azure, OpenStack
        ("fd00:ec2::254/128", "cloud metadata"),  # AWS over IPv6
        ("169.254.170.2/32", "cloud metadata"),  # AWS ECS task role credentials
        ("169.254.170.23/32", "cloud metadata"),  # AWS EKS pod identity credentials
        ("fd00:ec2::23/128", "cloud metadata"),  # the same over IPv6
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

    def refusal_before_dns(self, host: str, port: int, *, udp: bool = False) -> str | None:
        """Why ``host:port`` is refused whatever ``host`` resolves to, or None when
        only the resolved addresses can tell (then resolve, and ask ``refusal``).

        The relay asks this before resolving a name, so that an agent cannot make
        it look up names no rule could allow (a DNS side channel: exfiltration,
        probing internal DNS). A name is looked up only when a name or pattern
        rule matches it, or an IP/CIDR rule covers the port (and protocol).
        The text is ``refusal``'s for the name without an address.
        """
        why = self.refusal(host, port, udp=udp)
        if why is None or parse_ip(host.strip("[]")) is not None:
            return why  # (a literal needs no DNS: that verdict is final)
        if any(rule.may_match_after_dns(port, udp=udp) for rule in self.rules):
            return None
        return why

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
        literal = None if literal is None else _bare(literal)
        name = None if literal is not None else normalize_hostname(host)
        target = _bare(address) if address is not None else literal
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


def _bare(address: IPAddress) -> IPAddress:
    """``address`` as the host it reaches: IPv4 unmapped, and without an IPv6 zone
    (``fd00::2%eth0`` is ``fd00::2``; the zone only picks a link, yet it makes the
    address compare unequal to the relay's own ones and to exact rules)."""
    address = unmap_ipv4(address)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return ipaddress.IPv6Address(int(address))
    return address


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
