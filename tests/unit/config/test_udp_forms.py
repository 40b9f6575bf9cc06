"""UDP forwards (-L udp:, -R udp:, protocol: udp, udp_idle_timeout) and the relay's
udp: allow and listen_allow rules: a TCP rule never allows UDP, nor the reverse."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from wstunnel.config import load_agent_config
from wstunnel.config.textforms import REVERSE, TCP, UDP, Forward, parse_forward
from wstunnel.errors import ConfigError
from wstunnel.security.allow_rule import AllowRule
from wstunnel.security.listen_policy import ListenPolicy, ListenRule
from wstunnel.security.policy import HostSelf, Policy

HEAD = "relay: ws://relay.example:8080/tunnel\nforwards:\n"


def agent(tmp_path: Path, forwards: str) -> tuple[Forward, ...]:
    path = tmp_path / "agent.yaml"
    path.write_text(HEAD + textwrap.indent(textwrap.dedent(forwards), "  "))
    return load_agent_config(path).forwards


def agent_error(tmp_path: Path, forwards: str) -> str:
    with pytest.raises(ConfigError) as info:
        agent(tmp_path, forwards)
    return str(info.value)


def test_udp_text_forms() -> None:
    """-L udp:[bind:]port:host:port and -R udp:...; bind defaults to 127.0.0.1."""
    local = parse_forward("udp:5353:10.0.0.53:53")
    assert (local.protocol, local.listen_host, local.listen_port) == (UDP, "127.0.0.1", 5353)
    assert (local.target_host, local.target_port) == ("10.0.0.53", 53)
    assert local.label == "-L udp:127.0.0.1:5353:10.0.0.53:53"
    reverse = parse_forward("udp:0.0.0.0:5353:[::1]:53", kind=REVERSE)
    assert (reverse.protocol, reverse.kind, reverse.target_host) == (UDP, REVERSE, "::1")
    assert parse_forward("5353:h:53").protocol == TCP


@pytest.mark.parametrize("text", ["udp:/run/x.sock:h:53", "udp:53:unix:/run/x.sock",
                                  "udp:h:53", "udp:"])
def test_udp_text_forms_refuse_paths_and_bad_shapes(text: str) -> None:
    """A UDP forward needs host:port at both ends; the message shows the form."""
    with pytest.raises(ValueError, match="udp:"):
        parse_forward(text)


def test_yaml_protocol_and_idle_timeout(tmp_path: Path) -> None:
    """protocol: udp in a listen or reverse mapping; udp_idle_timeout per forward."""
    forwards = agent(tmp_path, """\
        - {listen: 5353, target: "10.0.0.53:53", protocol: udp, udp_idle_timeout: 5}
        - {reverse: 5354, target: "127.0.0.1:53", protocol: udp}
        - "udp:5355:10.0.0.53:53"
        - "5353:db:5432"
        """)
    assert [(f.protocol, f.udp_idle_timeout) for f in forwards] == [
        (UDP, 5.0), (UDP, 60.0), (UDP, 60.0), (TCP, 60.0)]
    assert forwards[1].kind == REVERSE


def test_yaml_udp_mistakes_name_the_key(tmp_path: Path) -> None:
    """udp_idle_timeout without protocol: udp, a unix end, an unknown protocol."""
    assert "udp_idle_timeout" in agent_error(
        tmp_path, '- {listen: 1, target: "h:2", udp_idle_timeout: 5}')
    assert "unix sockets are streams" in agent_error(
        tmp_path, '- {listen: /run/a.sock, target: "h:2", protocol: udp}')
    assert "tcp, udp" in agent_error(tmp_path, '- {listen: 1, target: "h:2", protocol: sctp}')


def test_the_same_port_for_tcp_and_udp_is_two_listeners(tmp_path: Path) -> None:
    """TCP and UDP on one address are different sockets; two UDP ones clash."""
    assert len(agent(tmp_path, '- "5353:h:53"\n- "udp:5353:h:53"')) == 2
    assert "already used" in agent_error(tmp_path, '- "udp:5353:h:53"\n- "udp:5353:h:54"')


def test_allow_rules_name_the_protocol() -> None:
    """udp:10.0.0.53:53 allows that UDP flow only; the TCP rule only TCP."""
    policy = Policy(["udp:10.0.0.53:53", "10.0.0.80:80"], host=HostSelf())
    dns = ipaddress.ip_address("10.0.0.53")
    web = ipaddress.ip_address("10.0.0.80")
    assert policy.allows("10.0.0.53", 53, dns, udp=True)
    assert not policy.allows("10.0.0.53", 53, dns)
    assert policy.allows("10.0.0.80", 80, web)
    refusal = policy.refusal("10.0.0.80", 80, web, udp=True)
    assert refusal is not None and "udp: rule" in refusal


def test_udp_rules_for_names_and_networks_after_dns() -> None:
    """A udp: name rule matches the name; a udp: CIDR the address it resolves to; the
    dangerous blocks still need an explicit rule."""
    policy = Policy(["udp:*.example.com:53", "udp:[fd00::/8]", "udp:10.0.0.0/8"],
                    host=HostSelf())
    assert policy.allows("ns.example.com", 53, ipaddress.ip_address("192.0.2.1"), udp=True)
    assert policy.allows("x", 9, ipaddress.ip_address("fd00::1"), udp=True)
    assert not policy.allows("ns.example.com", 54, ipaddress.ip_address("192.0.2.1"), udp=True)
    assert not Policy(["udp:0.0.0.0/0"], host=HostSelf()).allows(
        "127.0.0.1", 53, ipaddress.ip_address("127.0.0.1"), udp=True)


@pytest.mark.parametrize("text", ["udp:10.0.0.0/8:53", "udp:*.example.com", "udp:[fd00::/8]:53"])
def test_udp_rules_print_as_written(text: str) -> None:
    assert str(AllowRule.parse(text)) == text


@pytest.mark.parametrize("text", ["udp:unix:/run/x.sock", "udp:", "udp:udp:1.2.3.4"])
def test_bad_udp_rules_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="udp"):
        AllowRule.parse(text)


def test_listen_allow_rules_name_the_protocol() -> None:
    """-R udp: needs a udp: listen_allow rule; a TCP one does not do."""
    policy = ListenPolicy([ListenRule.parse("udp:127.0.0.1:5353"), "127.0.0.1:2222"])
    assert policy.refusal("127.0.0.1", 5353, udp=True) is None
    assert policy.refusal("127.0.0.1", 5353) is not None
    refusal = policy.refusal("127.0.0.1", 2222, udp=True)
    assert refusal is not None and "udp:127.0.0.1:2222" in refusal
    assert str(ListenRule.parse("udp:127.0.0.1:5353")) == "udp:127.0.0.1:5353"
