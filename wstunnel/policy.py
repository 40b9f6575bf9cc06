"""Destination policy: which ``host:port`` an agent may ask the relay to open.

Theory of operation
-------------------
A relay is a door into the network it stands in, so it is closed by default:
``Policy([])`` allows nothing, and every OPEN is checked against the rules.

Rules come in three kinds (``AllowRule.parse``), each with an optional port
or port range (no port means any port):

* a host name (``db.internal``) - matches the *requested* name exactly;
* a pattern (``*.example.com``) - matches any name below ``example.com`` at
  any depth, but not ``example.com`` itself;
* an IP address or CIDR (``10.0.0.5``, ``10.0.0.0/8``, ``[fd00::/8]:22``) -
  matches the *address actually connected to* (the relay resolves the name
  first and asks again with the address), or the requested host when that is
  already a literal IP.

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

Everything here is pure: no DNS, no sockets. The module also holds the small
address-syntax helpers (host names, IP literals, ports) that ``config.py``
shares, so both parse addresses the same way.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "AllowRule",
    "IPAddress",
    "IPNetwork",
    "Policy",
    "RuleKind",
    "is_hostname",
    "normalize_hostname",
    "parse_ip",
    "parse_port",
    "special_block",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Verdicts a Policy remembers (the set is forgotten when full).
_MAX_VERDICTS: Final = 1024

# Letters, digits, hyphen and underscore (common in internal names), 1..63
# characters, not starting or ending with a hyphen (RFC 1123 §2.1, relaxed).
_LABEL: Final = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)", re.IGNORECASE)
_MAX_NAME_LENGTH: Final = 253

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


def normalize_hostname(name: str) -> str:
    """Lower-case ``name`` and drop one trailing dot, so equal names compare equal."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def is_hostname(name: str) -> bool:
    """True if ``name`` is a syntactically valid DNS host name (not an IP).

    The last label may not be all digits, so typos such as ``10.0.0.300``
    are rejected instead of being looked up as names.
    """
    name = normalize_hostname(name)
    if not name or len(name) > _MAX_NAME_LENGTH:
        return False
    labels = name.split(".")
    if labels[-1].isdigit():
        return False
    return all(_LABEL.fullmatch(label) for label in labels)


def parse_ip(text: str) -> IPAddress | None:
    """Return ``text`` as an IP address, or None if it is not one.

    IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) become plain IPv4, so
    they cannot slip past IPv4 rules and blocks.
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return _unmap(address)


def _unmap(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    """Parse a decimal TCP port.

    Args:
        text: the digits.
        allow_zero: accept 0 ("any free port"), meaningful only for listening.

    Raises:
        ValueError: not a number, or outside 1..65535 (0..65535 with ``allow_zero``).
    """
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"expected a port number, got {text!r}")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is outside {low}..65535")
    return port


def special_block(address: IPAddress) -> tuple[IPNetwork, str] | None:
    """The dangerous block (and its label) that ``address`` falls in, if any."""
    address = _unmap(address)
    for network, label in _SPECIAL_BLOCKS:
        if network.version == address.version and address in network:
            return network, label
    return None


class RuleKind(enum.Enum):
    """What an ``AllowRule`` matches against."""

    NAME = "name"  # the requested host name, exactly
    PATTERN = "pattern"  # the requested host name, any name below a suffix
    NETWORK = "network"  # the address connected to


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One allowed destination; build with ``AllowRule.parse``.

    ``host`` is the normalized name, the suffix with its leading dot
    (``.example.com``) for patterns, or the network text for NETWORK rules.
    """

    kind: RuleKind
    host: str
    network: IPNetwork | None = None
    port_low: int = 1
    port_high: int = 65535

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """Parse ``host``, ``*.suffix``, ``ip``, ``cidr``, each with optional ``:port``/``:lo-hi``.

        IPv6 addresses and networks need brackets when a port follows
        (``[fd00::/8]:22``); without brackets the whole text is the address.

        Raises:
            ValueError: with a message saying what is wrong and what was expected.
        """
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
        host = "*" + self.host if self.kind is RuleKind.PATTERN else self.host
        if self.port_low == 1 and self.port_high == 65535:
            return host
        if self.network is not None and self.network.version == 6:
            host = f"[{host}]"
        if self.port_low == self.port_high:
            return f"{host}:{self.port_low}"
        return f"{host}:{self.port_low}-{self.port_high}"

    def matches(self, name: str | None, port: int, address: IPAddress | None) -> bool:
        """True if this rule covers the destination.

        Args:
            name: normalized requested host name, or None if the host was an IP.
            port: requested port.
            address: the address to be connected to, if known.
        """
        if not self.port_low <= port <= self.port_high:
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


class Policy:
    """An ordered set of ``AllowRule``; empty means nothing is allowed."""

    def __init__(self, rules: Iterable[AllowRule | str] = ()) -> None:
        """Args: rules: parsed rules or rule text (parsed with ``AllowRule.parse``)."""
        self.rules: tuple[AllowRule, ...] = tuple(
            rule if isinstance(rule, AllowRule) else AllowRule.parse(rule) for rule in rules
        )
        # Verdicts of refusal(), which is pure: a relay asks the same few questions
        # for every channel (~20 us each, a noticeable part of a short connection).
        self._verdicts: dict[tuple[str, int, IPAddress | None], str | None] = {}

    def __repr__(self) -> str:
        return f"Policy({[str(rule) for rule in self.rules]!r})"

    def allows(self, host: str, port: int, address: IPAddress | None = None) -> bool:
        """True if the agent may open ``host:port`` (connecting to ``address``).

        Call it with the resolved ``address`` for the final decision. Without
        one, IP/CIDR rules cannot match a host name (so a False is not final),
        and a True from a name rule may still turn into a refusal once the
        name resolves to a dangerous address.
        """
        return self.refusal(host, port, address) is None

    def refusal(self, host: str, port: int, address: IPAddress | None = None) -> str | None:
        """Why ``host:port`` is refused (one line for the relay log), or None if allowed."""
        key = (host, port, address)
        verdicts = self._verdicts
        if key in verdicts:
            return verdicts[key]
        verdict = self._refusal(host, port, address)
        if len(verdicts) >= _MAX_VERDICTS:
            verdicts.clear()
        verdicts[key] = verdict
        return verdict

    def _refusal(self, host: str, port: int, address: IPAddress | None) -> str | None:
        literal = parse_ip(host.strip("[]"))
        name = None if literal is not None else normalize_hostname(host)
        target = _unmap(address) if address is not None else literal
        matching = [rule for rule in self.rules if rule.matches(name, port, target)]
        shown = host if target is None or target == literal else f"{host} ({target})"
        if not matching:
            return f"no allow rule matches {shown} port {port}"
        block = special_block(target) if target is not None else None
        if block is None or any(rule.names_explicitly(*block) for rule in matching):
            return None
        network, label = block
        return (
            f"{shown} is a {label} address; only a rule naming it explicitly "
            f"(e.g. {target} or a network inside {network}) allows it"
        )
