"""Proxy URLs, NO_PROXY, X-Forwarded-For with trusted proxies, extra headers, messages."""

from __future__ import annotations

import ipaddress

import pytest

from wstunnel import ws
from wstunnel.agent.explain import brief, explain_rejection
from wstunnel.agent.proxy import choose_proxy
from wstunnel.config import parse_config
from wstunnel.config.headers import parse_header_line, parse_host_header
from wstunnel.config.proxy_url import bypasses_proxy, parse_proxy_url, proxy_from_environment
from wstunnel.errors import ConfigError
from wstunnel.security.forwarded import client_address, parse_trusted_proxy

TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")]


def test_proxy_url_parts_and_the_password_never_shows() -> None:
    """user, percent-decoded password, host, port; str/repr/errors hide the password."""
    proxy = parse_proxy_url("http://agent:p%40ss@proxy.corp:3128")
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == (
        "proxy.corp", 3128, "agent", "p@ss")
    assert "p@ss" not in str(proxy) + repr(proxy)
    assert parse_proxy_url("proxy.corp:8080").port == 8080  # bare host:port = http://
    with pytest.raises(ValueError, match="http://") as caught:
        parse_proxy_url("socks5://u:hunter2@proxy:1080")
    assert "hunter2" not in str(caught.value)


def test_environment_proxy_by_scheme_and_no_proxy() -> None:
    """wss:// uses https_proxy, ws:// http_proxy (lower case first); NO_PROXY bypasses."""
    env = {"HTTPS_PROXY": "http://a:3128", "https_proxy": "http://b:3128",
           "HTTP_PROXY": "http://c:3128", "NO_PROXY": ".internal, 10.0.0.0/8, relay.x:8443"}
    found = proxy_from_environment(env, "relay.example.com", 443, True)
    assert found is not None and (found.host, found.source) == ("b", "https_proxy")
    found = proxy_from_environment(env, "relay.example.com", 80, False)
    assert found is not None and found.host == "c"
    assert proxy_from_environment(env, "r.corp.internal", 443, True) is None
    assert proxy_from_environment(env, "10.1.2.3", 443, True) is None
    assert proxy_from_environment(env, "relay.x", 8443, True) is None
    assert proxy_from_environment(env, "relay.x", 443, True) is not None
    assert bypasses_proxy("*", "anything", 1)
    assert not bypasses_proxy("example.com", "notexample.com", 443)


def test_proxy_none_ignores_the_environment_and_bad_values_name_the_variable() -> None:
    """`proxy: none` connects directly; a bad HTTPS_PROXY is a ConfigError naming it."""
    env = {"HTTPS_PROXY": "http://a:3128"}
    assert choose_proxy("none", "relay", 443, True, env) is None
    with pytest.raises(ConfigError, match="HTTPS_PROXY"):
        choose_proxy(None, "relay", 443, True, {"HTTPS_PROXY": "ftp://x"})


@pytest.mark.parametrize(("peer", "header", "expected"), [
    ("127.0.0.1", "203.0.113.5", "203.0.113.5"),            # trusted proxy: believe it
    ("192.0.2.1", "203.0.113.5", "192.0.2.1"),              # untrusted peer: ignore it
    ("127.0.0.1", "198.51.100.7, 203.0.113.5", "203.0.113.5"),  # spoofed left part ignored
    ("127.0.0.1", "203.0.113.5, 10.1.1.1", "203.0.113.5"),  # chain of trusted hops
    ("127.0.0.1", "garbage, 10.1.1.1", "10.1.1.1"),          # nothing left of garbage
    ("127.0.0.1", "[2001:db8::1]:443", "2001:db8::1"),
    ("127.0.0.1", None, "127.0.0.1"),
])
def test_client_address_walks_x_forwarded_for_from_the_right(
    peer: str, header: str | None, expected: str
) -> None:
    """Only trusted hops may vouch for the address to their left."""
    assert client_address(peer, header, TRUSTED) == expected


def test_trusted_proxy_parsing() -> None:
    """Addresses and CIDRs; host bits set get a suggestion."""
    assert str(parse_trusted_proxy("[fd00::/8]")) == "fd00::/8"
    with pytest.raises(ValueError, match="did you mean 10.0.0.0/8"):
        parse_trusted_proxy("10.0.0.1/8")


def test_headers_and_host_header_are_checked_with_file_line_and_key() -> None:
    """Reserved and malformed headers are config errors naming the key."""
    assert parse_header_line("X-Route: blue ") == ("X-Route", "blue")
    assert parse_host_header("[::1]:8443") == "[::1]:8443"
    with pytest.raises(ValueError, match="host_header"):
        parse_header_line("Host: other")
    text = "relay: wss://r:443/t\nforwards: ['1:a:2']\nheaders:\n  Upgrade: h2c\n"
    with pytest.raises(ConfigError, match="headers.Upgrade"):
        parse_config(text, "agent.yaml")
    with pytest.raises(ConfigError, match="agent.yaml:3: trusted_proxies"):
        parse_config("listen: 127.0.0.1:1\npath: /t\ntrusted_proxies: [nope]\n", "agent.yaml")


def test_proxy_keys_load() -> None:
    """proxy, headers (mapping or list) and host_header load into the agent config."""
    config = parse_config({"relay": "wss://r:443/t", "forwards": ["1:a:2"],
                           "proxy": "http://u@p:3128", "headers": ["X-A: 1"],
                           "host_header": "front.example"})
    assert config.headers == (("X-A", "1"),) and config.host_header == "front.example"
    with pytest.raises(ConfigError, match="proxy: expected"):
        parse_config({"relay": "wss://r:443/t", "forwards": ["1:a:2"], "proxy": None})


@pytest.mark.parametrize(("status", "fragment"), [
    (426, "does not pass WebSocket upgrades: got 426 Upgrade Required from nginx/1.22 at "),
    (505, "does not pass WebSocket upgrades: got 505"),
    (404, "this is a web server, not a wstunnel relay: check the relay URL's host, port and path"),
])
def test_rejections_are_explained_in_one_line(status: int, fragment: str) -> None:
    """The line says what came back, from which server, and what it means."""
    event = ws.HandshakeRejected(status, {426: "Upgrade Required"}.get(status, "X"),
                                 [("server", "nginx/1.22")], b"body\ntext", "answered")
    line = explain_rejection("wss://r:443/t", event)
    assert fragment in line and "\n" not in line and '"body text"' in line


def test_cli_flags_for_proxies_headers_and_trusted_proxies(tmp_path: object) -> None:
    """--proxy/--no-proxy, --header, --host-header and --trusted-proxy reach the configs."""
    from wstunnel.cli.main import agent_config_from_args, relay_config_from_args
    from wstunnel.cli.parser import build_parser

    base = ["agent", "--relay", "wss://r:443/t", "-L", "1:a:2"]
    args = build_parser().parse_args([*base, "--proxy", "http://u@p:3128", "--header",
                                      "X-A: 1", "--host-header", "front"])
    config = agent_config_from_args(args)
    assert (config.proxy, config.headers, config.host_header) == (
        "http://u@p:3128", (("X-A", "1"),), "front")
    assert agent_config_from_args(build_parser().parse_args([*base, "--no-proxy"])).proxy == "none"
    with pytest.raises(ConfigError, match="--proxy"):
        agent_config_from_args(build_parser().parse_args([*base, "--proxy", "ftp://x"]))
    relay = relay_config_from_args(build_parser().parse_args(
        ["relay", "--listen", "127.0.0.1:1", "--trusted-proxy", "10.0.0.0/8"]))
    assert relay.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(("status", "reason", "server", "expected"), [
    (200, "OK", "squid/5.7",
     "WebSocket upgrade stripped by squid/5.7 (got 200 OK without Upgrade)"),
    (426, "Upgrade Required", "nginx/1.22.1",
     "WebSocket upgrade stripped by nginx/1.22.1 (got 426 Upgrade Required without Upgrade)"),
    (0, "", None, "WebSocket upgrade cut on the way (closed the connection)"),
])
def test_brief_names_what_broke_the_upgrade(status: int, reason: str, server: str | None,
                                            expected: str) -> None:
    """The short form the agent logs before it uses an HTTP transport instead."""
    headers = [("server", server)] if server else []
    event = ws.HandshakeRejected(status, reason, headers, b"", "closed the connection")
    assert brief(event) == expected
