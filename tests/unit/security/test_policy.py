"""Destination policy: rule syntax, matching, and the dangerous-address guard."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wstunnel.addresses import IPAddress, IPNetwork, is_hostname
from wstunnel.security.allow_rule import AllowRule, RuleKind
from wstunnel.security.policy import (
    HostSelf,
    Listener,
    Policy,
    special_block,
    this_host,
)

ip = ipaddress.ip_address


def test_empty_policy_allows_nothing() -> None:
    """Default deny: a policy without rules refuses every destination."""
    policy = Policy([])
    assert not policy.allows("example.com", 443)
    assert not policy.allows("93.184.216.34", 80)
    assert not policy.allows("example.com", 443, ip("93.184.216.34"))
    assert "no allow rule" in (policy.refusal("example.com", 443) or "")


@pytest.mark.parametrize("host", ["db.internal", "DB.Internal", "db.internal.", "DB.INTERNAL."])
def test_name_rule_is_case_insensitive_and_ignores_trailing_dot(host: str) -> None:
    """Name rules compare host names case-insensitively, ignoring one trailing dot."""
    assert Policy(["db.internal."]).allows(host, 5432, ip("10.1.2.3"))


@pytest.mark.parametrize("host", ["x.db.internal", "db.internal.evil.com", "xdb.internal"])
def test_name_rule_matches_only_that_name(host: str) -> None:
    """A name rule does not extend to subdomains or look-alikes."""
    assert not Policy(["db.internal"]).allows(host, 5432, ip("10.1.2.3"))


@pytest.mark.parametrize(("host", "allowed"), [
    ("a.example.com", True),
    ("a.b.example.com", True),
    ("A.Example.COM.", True),
    ("example.com", False),
    ("evilexample.com", False),
    ("example.com.evil.net", False),
])
def test_pattern_matches_names_below_the_suffix(host: str, allowed: bool) -> None:
    """``*.example.com`` covers names below example.com at any depth, not the apex."""
    assert Policy(["*.example.com"]).allows(host, 443, ip("93.184.216.34")) is allowed


@pytest.mark.parametrize(("rule", "port", "allowed"), [
    ("db.internal", 1, True),
    ("db.internal", 65535, True),
    ("db.internal:5432", 5432, True),
    ("db.internal:5432", 5433, False),
    ("db.internal:8000-8010", 8000, True),
    ("db.internal:8000-8010", 8010, True),
    ("db.internal:8000-8010", 7999, False),
    ("db.internal:8000-8010", 8011, False),
])
def test_ports_and_port_ranges(rule: str, port: int, allowed: bool) -> None:
    """No port means any port; ``:p`` one port; ``:lo-hi`` an inclusive range."""
    assert Policy([rule]).allows("db.internal", port, ip("10.0.0.1")) is allowed


def test_network_rules_match_the_address_connected_to() -> None:
    """IP/CIDR rules judge the resolved address, whatever name was requested."""
    policy = Policy(["10.0.0.0/8:22"])
    assert policy.allows("build.internal", 22, ip("10.9.8.7"))
    assert not policy.allows("build.internal", 22, ip("192.168.1.1"))
    assert not policy.allows("build.internal", 22)  # unresolved: cannot match yet
    assert policy.allows("10.1.1.1", 22)  # a literal IP is its own address


def test_name_rules_do_not_match_literal_ips() -> None:
    """Asking for an IP literal is judged by IP rules only, never by name rules."""
    assert not Policy(["db.internal"]).allows("10.0.0.5", 80)


def test_ipv6_rules() -> None:
    """IPv6 addresses and networks work bare (no port) and in brackets (with a port)."""
    policy = Policy(["[2001:db8::/32]:443", "2001:db9::1"])
    assert policy.allows("2001:db8::5", 443)
    assert policy.allows("[2001:db8::5]", 443)
    assert not policy.allows("2001:db8::5", 80)
    assert policy.allows("v6.example", 22, ip("2001:db9::1"))


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "0.0.0.0", "::",
                                     "169.254.1.1", "fe80::1", "169.254.169.254",
                                     "fd00:ec2::254", "::ffff:127.0.0.1"])
def test_broad_rules_do_not_reach_dangerous_addresses(address: str) -> None:
    """Loopback, unspecified, link-local and metadata addresses need an explicit rule."""
    policy = Policy(["0.0.0.0/0", "::/0", "*.example.com", "evil.example.net"])
    assert not policy.allows("evil.example.net", 80, ip(address))
    assert not policy.allows("x.example.com", 80, ip(address))
    assert not policy.allows(address, 80)
    assert "explicitly" in (policy.refusal(address, 80) or "")


@pytest.mark.parametrize(("rule", "address", "allowed"), [
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.0/8", "127.0.0.2", True),
    ("126.0.0.0/7", "127.0.0.2", False),  # wider than loopback: not explicit
    ("::1", "::1", True),
    ("fe80::/64", "fe80::1", True),
    ("169.254.0.0/16", "169.254.1.1", True),
    ("169.254.0.0/16", "169.254.169.254", False),  # metadata needs its own rule
    ("169.254.169.254", "169.254.169.254", True),
    ("169.254.0.0/16", "169.254.170.2", False),  # AWS ECS task credentials
    ("169.254.0.0/16", "169.254.170.23", False),  # AWS EKS pod identity
    ("fd00::/8", "fd00:ec2::23", False),
    ("169.254.170.2", "169.254.170.2", True),
    ("fd00::/8", "fd00:ec2::254", False),
    ("fd00:ec2::254", "fd00:ec2::254", True),
    ("fd00::/8", "fd00::5", True),  # ordinary unique-local address
])
def test_explicit_network_rules_unlock_dangerous_addresses(
        rule: str, address: str, allowed: bool) -> None:
    """Only a rule lying inside an address's dangerous block unlocks it."""
    assert Policy([rule]).allows("target.example", 80, ip(address)) is allowed


def test_localhost_name_rule_unlocks_loopback_only() -> None:
    """``localhost`` is an explicit loopback rule; it never unlocks metadata."""
    policy = Policy(["localhost:8080", "db.localhost"])
    assert policy.allows("localhost", 8080, ip("127.0.0.1"))
    assert policy.allows("LOCALHOST.", 8080, ip("::1"))
    assert policy.allows("db.localhost", 5432, ip("127.0.0.1"))
    assert not policy.allows("localhost", 8080, ip("169.254.169.254"))
    assert not policy.allows("localhost", 8081, ip("127.0.0.1"))


def test_name_resolving_to_loopback_is_refused() -> None:
    """A permitted name that resolves to a loopback address is still refused."""
    policy = Policy(["evil.example.com"])
    assert policy.allows("evil.example.com", 80, ip("93.184.216.34"))
    assert not policy.allows("evil.example.com", 80, ip("127.0.0.1"))


@pytest.mark.parametrize(("text", "kind", "canonical"), [
    ("db.internal", RuleKind.NAME, "db.internal"),
    ("DB.Internal.:5432", RuleKind.NAME, "db.internal:5432"),
    ("*.Example.com:1-1024", RuleKind.PATTERN, "*.example.com:1-1024"),
    ("10.0.0.0/8", RuleKind.NETWORK, "10.0.0.0/8"),
    ("10.0.0.5:22", RuleKind.NETWORK, "10.0.0.5/32:22"),
    ("[fd00::/8]:22", RuleKind.NETWORK, "[fd00::/8]:22"),
    ("::1", RuleKind.NETWORK, "::1/128"),
    ("[::ffff:127.0.0.1]:80", RuleKind.NETWORK, "127.0.0.1/32:80"),
    ("  host_name-1.lan  ", RuleKind.NAME, "host_name-1.lan"),
])
def test_rule_parsing(text: str, kind: RuleKind, canonical: str) -> None:
    """Rules parse into their kind and print canonically (and re-parse to themselves)."""
    rule = AllowRule.parse(text)
    assert rule.kind is kind
    assert str(rule) == canonical
    assert AllowRule.parse(str(rule)) == rule


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "empty"),
    ("*", "'*'"),
    ("db.*.internal", "'*'"),
    ("*.", "pattern"),
    ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
    ("10.0.0.300", "host name"),
    ("host:0", "outside"),
    ("host:65536", "outside"),
    ("host:http", "port number"),
    ("host:90-80", "backwards"),
    ("[db.internal]:80", "brackets"),
    ("[::1", "expected"),
    ("[::1]x", "expected"),
    ("bad host", "host name"),
    ("-bad.example", "host name"),
])
def test_bad_rules_are_rejected_with_a_reason(text: str, fragment: str) -> None:
    """Malformed rules raise ValueError saying what is wrong."""
    with pytest.raises(ValueError) as info:
        AllowRule.parse(text)
    assert fragment in str(info.value)


def test_policy_accepts_rule_text_and_objects() -> None:
    """``Policy`` takes parsed rules or their text, in any mix."""
    policy = Policy([AllowRule.parse("a.example"), "b.example"])
    assert [str(rule) for rule in policy.rules] == ["a.example", "b.example"]


def test_hostname_syntax() -> None:
    """Host names: labels of letters, digits, '-' and '_', not an all-digit last label."""
    assert is_hostname("db.internal") and is_hostname("x_y.example.") and is_hostname("a" * 63)
    assert not is_hostname("a" * 64)
    assert not is_hostname("1.2.3.4") and not is_hostname("") and not is_hostname("a..b")
    assert not is_hostname("a-.b") and not is_hostname(("a." * 127) + "bc")


def test_special_block_labels() -> None:
    """Every dangerous address reports the block and kind it belongs to."""
    assert special_block(ip("169.254.169.254")) == (
        ipaddress.ip_network("169.254.169.254/32"), "cloud metadata")
    assert special_block(ip("::ffff:127.0.0.1")) == (
        ipaddress.ip_network("127.0.0.0/8"), "loopback")
    assert special_block(ip("93.184.216.34")) is None


_networks = st.one_of(
    st.ip_addresses(v=4).flatmap(lambda a: st.integers(8, 32).map(
        lambda n: ipaddress.ip_network(f"{a}/{n}", strict=False))),
    st.ip_addresses(v=6).flatmap(lambda a: st.integers(16, 128).map(
        lambda n: ipaddress.ip_network(f"{a}/{n}", strict=False))),
)
_ports = st.integers(1, 65535).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo, 65535)))


@given(_networks, _ports)
def test_network_rule_text_round_trips(network: IPNetwork, ports: tuple[int, int]) -> None:
    """Printing a network rule and parsing it back gives the same rule and matches."""
    low, high = ports
    host = f"[{network}]" if ":" in str(network) else str(network)
    rule = AllowRule.parse(f"{host}:{low}-{high}")
    assert AllowRule.parse(str(rule)) == rule
    assert rule.network is not None
    first = rule.network.network_address
    assert rule.matches(None, low, first) and rule.matches(None, high, first)
    assert high == 65535 or not rule.matches(None, high + 1, first)


def test_remembered_verdicts_stay_right_past_the_cache_size() -> None:
    """Verdicts are remembered, but every answer, first or repeated, and past the
    number remembered, is the one a fresh policy gives."""
    rules = ["10.0.0.0/8:22", "db.internal", "127.0.0.1"]
    policy = Policy(rules)
    queries: list[tuple[str, int, IPAddress | None]] = [
        (f"10.{i % 256}.0.{i % 7}", 20 + i % 5, None) for i in range(3000)]
    queries += [("db.internal", 5432, ipaddress.ip_address("127.0.0.1")),
                ("db.internal", 5432, ipaddress.ip_address("10.1.2.3")),
                ("127.0.0.1", 80, ipaddress.ip_address("127.0.0.1"))]
    for _ in range(2):
        for host, port, address in queries:
            assert policy.refusal(host, port, address) == Policy(rules).refusal(host, port, address)


# -- the relay host itself ---------------------------------------------------------

OWN_V4, OWN_V6 = ip("192.0.2.2"), ip("fd00::2")
HOST = HostSelf(frozenset({ip("127.0.0.1"), OWN_V4, OWN_V6, ip("::1")}),
                (Listener(None, 8080, "tunnel port"), Listener(ip("127.0.0.1"), 9108,
                                                               "metrics port")))


@pytest.mark.parametrize("rules", [["0.0.0.0/0", "::/0"], ["192.0.2.0/24", "fd00::/64"],
                                   ["192.0.2.2/31", "fd00::2/127"]])
@pytest.mark.parametrize("own", [OWN_V4, OWN_V6])
def test_own_address_is_refused_under_any_network(rules: list[str], own: IPAddress) -> None:
    """An address of the relay host is refused under broad and narrow networks alike;
    the refusal says which rule would allow it. Without it in HostSelf, allowed."""
    why = Policy(rules, host=HOST).refusal(str(own), 22, own)
    assert why is not None and "address of the relay host itself" in why
    assert f"only a rule for exactly that address (e.g. {own}" in why
    assert Policy(rules, host=HostSelf()).allows(str(own), 22, own)


def test_own_address_is_refused_under_a_name_that_resolves_to_it() -> None:
    """A name rule is not a rule for the address: DNS decides where a name goes."""
    for rules in (["relay.example.com"], ["*.example.com"]):
        assert not Policy(rules, host=HOST).allows("relay.example.com", 22, OWN_V4)
        assert Policy(rules, host=HostSelf()).allows("relay.example.com", 22, OWN_V4)


@pytest.mark.parametrize("rule", ["192.0.2.2", "192.0.2.2/32", "192.0.2.2:22",
                                  "192.0.2.2:20-30", "[::ffff:192.0.2.2]:22"])
def test_an_exact_rule_allows_an_own_address(rule: str) -> None:
    """A rule for exactly that address (any port, or a port range) allows it."""
    assert Policy([rule, "0.0.0.0/0"], host=HOST).allows("192.0.2.2", 22, OWN_V4)
    assert Policy([rule], host=HOST).allows("192.0.2.2", 22, OWN_V4)


def test_an_exact_v6_rule_allows_an_own_v6_address() -> None:
    """The same for IPv6: [fd00::2]:22 allows it, ::/0 does not."""
    assert Policy(["[fd00::2]:22"], host=HOST).allows("fd00::2", 22, OWN_V6)
    assert not Policy(["::/0"], host=HOST).allows("fd00::2", 22, OWN_V6)


def test_other_addresses_are_not_affected() -> None:
    """Broad rules keep working for every address that is not the relay host's."""
    policy = Policy(["0.0.0.0/0"], host=HOST)
    assert policy.allows("192.0.2.3", 22, ip("192.0.2.3"))
    assert policy.allows("example.com", 443, ip("93.184.216.34"))


def test_loopback_keeps_its_own_rule() -> None:
    """Loopback is listed among the host's addresses, but a loopback network still
    unlocks it (only its listeners need an exact address and port)."""
    assert Policy(["127.0.0.0/8"], host=HOST).allows("127.0.0.1", 5432, ip("127.0.0.1"))
    assert not Policy(["0.0.0.0/0"], host=HOST).allows("127.0.0.1", 5432, ip("127.0.0.1"))


@pytest.mark.parametrize(("rules", "host", "port"), [
    (["127.0.0.1"], "127.0.0.1", 9108),  # metrics on loopback
    (["127.0.0.0/8"], "127.0.0.1", 9108),
    (["127.0.0.1"], "127.0.0.1", 8080),  # the tunnel port on every address
    (["127.0.0.0/8"], "127.0.0.5", 8080),
    (["192.0.2.2"], "192.0.2.2", 8080),  # the exact address, but not the port
    (["[fd00::2]"], "fd00::2", 8080),
    (["0.0.0.0"], "0.0.0.0", 9108),
])
def test_own_listeners_need_a_rule_for_exactly_that_address_and_port(
    rules: list[str], host: str, port: int
) -> None:
    """The relay's own ports (tunnel, metrics) are refused unless a rule names that
    address and that one port; the refusal says what it is."""
    why = Policy(rules, host=HOST).refusal(host, port, ip(host))
    assert why is not None and "this relay's own" in why, why


@pytest.mark.parametrize(("rule", "host", "port"), [
    ("127.0.0.1:9108", "127.0.0.1", 9108), ("192.0.2.2:8080", "192.0.2.2", 8080),
    ("[fd00::2]:8080", "fd00::2", 8080),
])
def test_an_exact_address_and_port_rule_allows_an_own_listener(
    rule: str, host: str, port: int
) -> None:
    """A rule for exactly that address and port is the deliberate opt-in."""
    assert Policy([rule], host=HOST).allows(host, port, ip(host))


@pytest.mark.parametrize(("rules", "host", "port"), [
    (["::/0"], "fd00::2%1", 22),  # an own address, with a zone
    (["::/0"], "fd00::2%eth0", 8080),
    (["::1"], "::1%1", 8080),  # loopback allowed, the tunnel port is not
])
def test_a_zone_id_does_not_hide_the_relay_host(rules: list[str], host: str, port: int) -> None:
    """``fd00::2%1`` is the same host as ``fd00::2`` (the kernel ignores the zone of a
    global address and loops ``::1%1`` back): it is refused the same way, and the
    exact rule allows it."""
    why = Policy(rules, host=HOST).refusal(host, port, ip(host))
    assert why is not None and ("relay host itself" in why or "this relay's own" in why), why
    exact = f"[{host.split('%')[0]}]:{port}"
    assert Policy([exact], host=HOST).allows(host, port, ip(host))


def test_a_listener_on_one_address_does_not_cover_others() -> None:
    """Metrics bound to 127.0.0.1 do not make port 9108 of another address special."""
    assert Policy(["192.0.2.2"], host=HOST).allows("192.0.2.2", 9108, OWN_V4)


def test_this_host_is_the_default_and_changes_apply_at_once() -> None:
    """Without ``host=``, the policy asks ``this_host`` on every check: an address or
    listener registered later is refused from then on, and allowed again once
    removed, even for verdicts remembered before."""
    policy = Policy(["0.0.0.0/0"])
    spare = ip("198.51.100.77")
    saved = this_host.current.addresses
    listener = Listener.bound("0.0.0.0", 61000, "tunnel port")
    try:
        assert policy.allows("198.51.100.77", 22, spare)
        this_host.set_addresses({*saved, spare})
        assert not policy.allows("198.51.100.77", 22, spare)
        this_host.set_addresses(saved)
        assert policy.allows("198.51.100.77", 61000, spare)
        this_host.add_listeners([listener])
        this_host.add_listeners([listener])  # two servers on one port: counted
        this_host.remove_listeners([listener])
        assert "tunnel port" in (Policy(["127.0.0.1"]).refusal("127.0.0.1", 61000) or "")
        this_host.remove_listeners([listener])
        assert Policy(["127.0.0.1"]).allows("127.0.0.1", 61000)
    finally:
        this_host.set_addresses(saved)


# -- unix socket paths ------------------------------------------------------------

PG = "/run/postgresql/.s.PGSQL.5432"


@pytest.mark.parametrize(("rules", "path", "allowed"), [
    ([f"unix:{PG}"], PG, True),
    ([f"unix:{PG}"], "/run/postgresql/.s.PGSQL.5433", False),
    ([f"unix:{PG}"], PG + "x", False),
    (["unix:/run/app/*"], "/run/app/api.sock", True),
    (["unix:/run/app/*"], "/run/app/.hidden.sock", True),
    (["unix:/run/app/*"], "/run/app/sub/api.sock", False),  # one level only
    (["unix:/run/app/*"], "/run/app", False),
    (["unix:/run/app/*"], "/run/application.sock", False),
    (["unix:/run/app/*"], "/run/app/../secret.sock", False),  # not a normal path
    (["unix:/run/app/*"], "/run/app/./api.sock", False),
    (["unix:/run/app/*"], "/run/app//api.sock", False),
    (["unix:/*"], "/x.sock", True),
    ([f"unix:{PG}"], "run/postgresql/.s.PGSQL.5432", False),  # relative
    ([f"unix:{PG}"], PG + "\0", False),
])
def test_unix_path_rules_match_the_path_exactly_or_directly_in_a_directory(
        rules: list[str], path: str, allowed: bool) -> None:
    """unix:/path allows that path; unix:/dir/* any socket directly in dir; a path
    with ., .. or // (which the kernel might resolve elsewhere) is never allowed."""
    assert Policy(rules).allows_path(path) is allowed


@pytest.mark.parametrize("rules", [
    ["0.0.0.0/0", "::/0"], ["*.example.com", "localhost"], ["127.0.0.1", "run"], [],
])
def test_host_port_rules_never_allow_a_unix_path(rules: list[str]) -> None:
    """However broad, TCP rules do not allow a unix socket; the refusal says what would."""
    refusal = Policy(rules).path_refusal(PG) or ""
    assert f"no allow rule matches unix:{PG}" in refusal
    assert "unix:/path rule" in refusal


@pytest.mark.parametrize("host", [PG, "/run/app/x.sock", "unix", "run"])
def test_unix_path_rules_never_allow_a_host_port(host: str) -> None:
    """A unix: rule is for paths only: no host name, pattern or address matches it."""
    policy = Policy([f"unix:{PG}", "unix:/run/app/*", "unix:/*"])
    assert not policy.allows(host, 5432, ip("127.0.0.1"))
    assert not policy.allows(host, 5432)


@pytest.mark.parametrize(("text", "canonical"), [
    (f"unix:{PG}", f"unix:{PG}"),
    ("  unix:/run/app/*  ", "unix:/run/app/*"),
    ("unix:/*", "unix:/*"),
])
def test_unix_rule_parsing(text: str, canonical: str) -> None:
    """unix: rules parse to PATH rules and print as written."""
    rule = AllowRule.parse(text)
    assert rule.kind is RuleKind.PATH
    assert str(rule) == canonical


@pytest.mark.parametrize("text", [
    "unix:", "unix:run/app.sock", "unix:/run/*/app.sock", "unix:/run/app*",
    "unix:/run/../etc/x.sock", "unix:/run/../x/", "unix:/run/app//*", "unix://run/app.sock",
    "unix:/run/a\0b", "unix:/run/app/**",
])
def test_bad_unix_rules_are_rejected_with_a_reason(text: str) -> None:
    """A unix: rule is an absolute normal path, or a directory followed by /*."""
    with pytest.raises(ValueError, match="expected unix:/absolute/path or unix:/directory/"):
        AllowRule.parse(text)


@pytest.mark.parametrize(("text", "write"), [
    ("unix:/run/app/", "unix:/run/app/*"),
    ("unix:/run/app//", "unix:/run/app/*"),
    ("unix:/", "unix:/*"),
])
def test_a_unix_rule_ending_in_a_slash_is_refused_saying_what_to_write(
        text: str, write: str) -> None:
    """``unix:/dir/`` names a directory, which no socket path equals: it would
    never match, so it is refused, and the error says how to allow sockets in it."""
    with pytest.raises(ValueError, match="names a directory") as refused:
        AllowRule.parse(text)
    assert f"write {write} for any socket directly in" in str(refused.value)


@pytest.mark.parametrize(("rules", "host", "port", "udp", "needs_dns"), [
    (["db.internal:5432"], "db.internal", 5432, False, True),  # a name rule matches
    (["*.corp.example"], "a.corp.example", 443, False, True),  # a pattern matches
    (["10.0.0.0/8:22"], "anything.example", 22, False, True),  # may resolve into it
    (["0.0.0.0/0"], "anything.example", 1, False, True),
    (["udp:10.0.0.53:53"], "anything.example", 53, True, True),
    ([], "anything.example", 443, False, False),  # no rule at all
    (["db.internal:5432"], "db.internal", 80, False, False),  # no rule for the port
    (["db.internal", "*.corp.example"], "evil.example", 443, False, False),  # names only
    (["10.0.0.0/8:22"], "anything.example", 80, False, False),  # CIDR on another port
    (["10.0.0.0/8"], "anything.example", 53, True, False),  # a TCP CIDR for UDP
    (["udp:10.0.0.0/8"], "anything.example", 53, False, False),  # a UDP CIDR for TCP
])
def test_refusal_before_dns_only_when_no_rule_could_allow_the_name(
    rules: list[str], host: str, port: int, udp: bool, needs_dns: bool
) -> None:
    """Before DNS a name is refused when no rule could allow it, whatever it resolves
    to: no name or pattern rule matches it and no IP/CIDR rule covers its port and
    protocol; the reason is the one ``refusal`` gives for the name."""
    policy = Policy(rules)
    why = policy.refusal_before_dns(host, port, udp=udp)
    if needs_dns:
        assert why is None
    else:
        assert why == policy.refusal(host, port, udp=udp)
        assert why is not None and why.startswith("no allow rule matches")


def test_refusal_before_dns_of_an_ip_literal_is_the_final_verdict() -> None:
    """An IP literal needs no DNS: before DNS it gets its final verdict, a dangerous
    block included."""
    policy = Policy(["0.0.0.0/0"])
    assert policy.refusal_before_dns("10.1.2.3", 80) is None
    assert "loopback" in (policy.refusal_before_dns("127.0.0.1", 80) or "")
    assert policy.refusal_before_dns("10.1.2.3", 80, udp=True) is not None
