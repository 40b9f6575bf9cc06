"""Listen policy: which addresses an agent may ask the relay to listen on (``-R``).

A reverse forward opens a port on the relay host to whoever can reach it, so
like the destination policy it is closed by default: ``ListenPolicy([])``
allows nothing, and an agent's ``listen_allow`` rules name what it may bind.

A rule is an IP address or CIDR with an optional port or port range
(``127.0.0.1:2222``, ``0.0.0.0:8000-8099``, ``[::1]:2222``), matched against the
address the agent asks to bind; or a unix socket path, ``unix:/run/app.sock``
exactly, or ``unix:/run/wstunnel/*`` for any socket directly in that
directory (allow_rule.py's syntax and meaning). A rule for a UDP listener
(``-R udp:``) starts with ``udp:`` (``udp:127.0.0.1:5353``): TCP rules never
allow UDP listeners, nor the other way round. Binding the unspecified
address (``0.0.0.0``, ``::``: every interface) needs a rule that contains
it, such as ``0.0.0.0:8080`` or ``0.0.0.0/0:8080``; ``10.0.0.0/8`` does not.
Host names are not rules here: the relay binds literal addresses only
(config/textforms.py refuses names in ``-R``).

Pure: no sockets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..addresses import IPNetwork, bracketed, parse_ip
from .allow_rule import AllowRule, RuleKind, is_normal_path, parse_path_rule, path_matches

__all__ = ["ListenPolicy", "ListenRule", "UNIX_RULE_PREFIX"]

UNIX_RULE_PREFIX = "unix:"


@dataclass(frozen=True, slots=True)
class ListenRule:
    """One allowed listen address: a network and port range, or a unix path."""

    network: IPNetwork | None = None
    port_low: int = 1
    port_high: int = 65535
    path: str | None = None  # exact, or a directory ending in "/*"
    udp: bool = False  # ``udp:``: UDP listeners only

    @classmethod
    def parse(cls, text: str) -> ListenRule:
        """Parse ``ip[/len][:port[-port]]`` (IPv6 in brackets) or ``unix:/path``.

        Raises:
            ValueError: with what was expected.
        """
        text = text.strip()
        if text.startswith(UNIX_RULE_PREFIX):
            return cls(path=parse_path_rule(text))  # (the same syntax as in ``allow``)
        rule = AllowRule.parse(text)
        if rule.kind is not RuleKind.NETWORK:
            raise ValueError(f"expected an IP address or CIDR with an optional port (the "
                             f"relay listens on addresses, not names), or unix:/path; got "
                             f"{text!r}")
        return cls(rule.network, rule.port_low, rule.port_high, udp=rule.udp)

    def __str__(self) -> str:
        if self.path is not None:
            return UNIX_RULE_PREFIX + self.path
        assert self.network is not None
        network = self.network
        host = str(network.network_address if network.num_addresses == 1 else network)
        prefix = "udp:" if self.udp else ""
        if self.port_low == 1 and self.port_high == 65535:
            return prefix + host
        ports = (str(self.port_low) if self.port_low == self.port_high
                 else f"{self.port_low}-{self.port_high}")
        return f"{prefix}{bracketed(host) if network.version == 6 else host}:{ports}"

    def allows_address(self, host: str, port: int, *, udp: bool = False) -> bool:
        address = parse_ip(host)
        return (self.network is not None and address is not None and self.udp is udp
                and address.version == self.network.version and address in self.network
                and self.port_low <= port <= self.port_high)

    def allows_path(self, path: str) -> bool:
        return self.path is not None and path_matches(self.path, path)


class ListenPolicy:
    """An agent's ``listen_allow`` rules; nothing is allowed without one."""

    def __init__(self, rules: Iterable[ListenRule | str] = ()) -> None:
        self.rules = tuple(r if isinstance(r, ListenRule) else ListenRule.parse(r)
                           for r in rules)

    def __repr__(self) -> str:
        return f"ListenPolicy({[str(r) for r in self.rules]!r})"

    def refusal(self, host: str, port: int, path: str | None = None, *,
                udp: bool = False) -> str | None:
        """Why listening on host:port (or ``path``; ``udp``: a UDP socket) is refused;
        None: allowed."""
        if path is not None:
            if not is_normal_path(path):  # (/run/w/x/../y could leave /run/w by a link)
                return f"unix:{path} is not a plain absolute path (no ., .. or //)"
            if any(rule.allows_path(path) for rule in self.rules):
                return None
            where = f"unix:{path}"
        else:
            if any(rule.allows_address(host, port, udp=udp) for rule in self.rules):
                return None
            where = f"{'udp:' if udp else ''}{bracketed(host)}:{port}"
        if not self.rules:
            return f"listening on {where} is not allowed: no listen_allow rules"
        return f"listening on {where} is not allowed by listen_allow"
