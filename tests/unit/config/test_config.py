"""Configuration loading: types, defaults, text forms, and located error messages."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wstunnel.addresses import HostPort
from wstunnel.config import (
    AgentConfig,
    Forward,
    RelayConfig,
    demo_configs,
    load_agent_config,
    load_config,
    load_relay_config,
    parse_config,
    parse_forward,
    parse_host_port,
    parse_listen,
    parse_relay_url,
    parse_size,
)
from wstunnel.config._yaml import parse_document
from wstunnel.errors import ConfigError
from wstunnel.security.auth import load_token

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
AGENT_MIN = ("relay: ws://relay.example:8080/tunnel\n"
             "forwards:\n  - listen: 9000\n    target: db:5432\n")
RELAY_MIN = "listen: 127.0.0.1:8080\n"


def write(tmp_path: Path, text: str, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def agent_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_agent_config(write(tmp_path, text))
    return info.value


def relay_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_relay_config(write(tmp_path, text, "relay.yaml"))
    return info.value


# ------------------------------------------------------------- example files

@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    """Every file in configs/ is a valid config of the role its name says."""
    config = load_config(path)
    assert config.source == str(path)
    expected = AgentConfig if "agent" in path.name else RelayConfig
    assert isinstance(config, expected)


def test_example_configs_work_together() -> None:
    """The example agent dials the example relay, which allows every forward target."""
    agent = load_agent_config(CONFIGS / "agent.yaml")
    relay = load_relay_config(CONFIGS / "relay.yaml")
    url = agent.relay_url
    assert (url.host, url.port, url.path) == (relay.listen.host, relay.listen.port, relay.path)
    (account,) = relay.agents
    assert agent.token_file is not None
    assert load_token(token_file=agent.token_file).startswith(account.name + ".")
    for forward in agent.forwards:
        target = forward.target
        assert account.policy.allows(target.host, target.port,
                                     ipaddress.ip_address(target.host))


def test_demo_configs_allow_exactly_the_demo_targets() -> None:
    """demo_configs pairs a relay allowing the two targets with an agent forwarding to them."""
    relay, agent = demo_configs(20001, 20002, relay_port=20000)
    assert agent.relay == "ws://127.0.0.1:20000/tunnel"
    assert [f.target_port for f in agent.forwards] == [20001, 20002]
    loopback = ipaddress.ip_address("127.0.0.1")
    assert relay.policy.allows("127.0.0.1", 20001, loopback)
    assert not relay.policy.allows("127.0.0.1", 20003, loopback)


# ------------------------------------------------------------------ values

def test_defaults_fill_unset_keys(tmp_path: Path) -> None:
    """Keys left out take the documented defaults."""
    agent = load_agent_config(write(tmp_path, AGENT_MIN))
    assert agent == AgentConfig(relay="ws://relay.example:8080/tunnel",
                                forwards=(Forward("127.0.0.1", 9000, "db", 5432),))
    assert (agent.connect_wait_timeout, agent.ping_interval, agent.ping_timeout) == (10, 20, 10)
    assert (agent.reconnect_min_interval, agent.reconnect_max_interval) == (1.0, 30.0)
    assert (agent.initial_window, agent.max_chunk_size) == (262144, 16384)
    relay = load_relay_config(write(tmp_path, RELAY_MIN, "relay.yaml"))
    assert (relay.path, relay.allow, relay.max_channels) == ("/tunnel", (), 10240)
    assert relay.max_message_size == 1 << 20
    assert (relay.connect_timeout, relay.log_format) == (10, "text")


def test_values_are_typed(tmp_path: Path) -> None:
    """Sizes accept bytes or unit text, durations ints or floats, choices any case."""
    relay = load_relay_config(write(tmp_path, """\
        role: relay
        listen: "[::1]:0"
        no_auth: true
        allow: [db.internal, "10.0.0.0/8:22", "*.corp.example:443"]
        initial_window: 1MiB
        max_chunk_size: 65536
        connect_timeout: 3
        log_level: DEBUG
        """, "relay.yaml"))
    assert relay.listen == HostPort("::1", 0) and str(relay.listen) == "[::1]:0"
    assert [str(rule) for rule in relay.allow] == ["db.internal", "10.0.0.0/8:22",
                                                   "*.corp.example:443"]
    assert (relay.initial_window, relay.max_chunk_size) == (1 << 20, 65536)
    assert relay.connect_timeout == 3.0 and isinstance(relay.connect_timeout, float)
    assert relay.log_level == "debug"


def test_forwards_accept_the_short_form(tmp_path: Path) -> None:
    """A forward may be written as the -L text instead of a listen/target mapping."""
    agent = load_agent_config(write(tmp_path, """\
        relay: wss://relay.example/t?x=1
        forwards: ["0.0.0.0:9000:db:5432", {listen: "[::1]:9001", target: "[fd00::1]:22"}]
        """))
    assert [str(f) for f in agent.forwards] == ["0.0.0.0:9000 -> db:5432",
                                                "[::1]:9001 -> [fd00::1]:22"]
    assert tuple(agent.relay_url) == (True, "relay.example", 443, "/t?x=1")


# ------------------------------------------------------------------ errors

def test_error_names_file_line_key_path_and_expectation(tmp_path: Path) -> None:
    """A bad value's message is ``file:line: key.path: expected X, got Y``."""
    error = agent_error(tmp_path, """\
        relay: ws://relay.example:8080/tunnel
        forwards:
          - listen: 9000
            target: db.internal:5432
          - listen: 9001
            target: db.internal
        """)
    path = tmp_path / "agent.yaml"
    assert str(error) == f'{path}:6: forwards[1].target: expected host:port, got "db.internal"'
    assert (error.source, error.line, error.key_path) == (str(path), 6, "forwards[1].target")


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    """Unknown keys are errors that list the allowed keys and suggest the nearest."""
    error = agent_error(tmp_path, AGENT_MIN + "ping_intervall: 5\n")
    assert error.line == 5 and error.key_path == "ping_intervall"
    assert "did you mean 'ping_interval'" in str(error) and "allowed keys: relay" in str(error)


def test_unknown_key_inside_a_forward(tmp_path: Path) -> None:
    """Unknown keys are caught at every level, with the nested key path."""
    error = agent_error(tmp_path, AGENT_MIN + "    tagret: x:1\n")
    assert (error.line, error.key_path) == (5, "forwards[0].tagret")
    assert "did you mean 'target'" in str(error)


def test_an_inline_token_is_refused_with_where_to_put_it(tmp_path: Path) -> None:
    """`token:` in an agent file is an error that names the three places a token may live."""
    error = agent_error(tmp_path, AGENT_MIN + "token: x.y\n")
    assert error.key_path == "token" and "token_file" in str(error)


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    """A key given twice is an error naming both lines (safe_load would keep the last)."""
    error = relay_error(tmp_path, RELAY_MIN + "path: /a\npath: /b\n")
    assert error.line == 3 and "first set on line 2" in str(error)


@pytest.mark.parametrize(("extra", "key", "fragment"), [
    ("ping_interval: fast", "ping_interval", 'expected a number of seconds, got "fast"'),
    ("ping_interval: true", "ping_interval", "got true"),
    ("ping_interval: 0", "ping_interval", "greater than 0"),
    ("ping_interval: 20000000", "ping_interval", "at most 86400"),
    ("drain_timeout: -1", "drain_timeout", "at least 0"),
    ("initial_window: 1024", "initial_window", "from 16384 to 16777216"),
    ("initial_window: 32MiB", "initial_window", "got 33554432"),
    ("max_chunk_size: lots", "max_chunk_size", "expected a size"),
    ("max_chunk_size: [1]", "max_chunk_size", "got a list"),
    ("log_level: loud", "log_level", "expected one of debug, info, warning, error"),
    ("log_format: xml", "log_format", "expected one of text, json"),
    ("reconnect_min_interval: 60", "reconnect_min_interval", "at least reconnect_min"),
])
def test_bad_agent_values(tmp_path: Path, extra: str, key: str, fragment: str) -> None:
    """Wrong types and out-of-range values name the key, its line and the expectation."""
    error = agent_error(tmp_path, AGENT_MIN + extra + "\n")
    assert (error.key_path, error.line) == (key, 5)
    assert fragment in str(error)


@pytest.mark.parametrize(("relay", "fragment"), [
    ("ftp://relay/tunnel", "expected a ws:// or wss:// URL"),
    ("ws:///tunnel", "no host"),
    ("ws://relay:99999/tunnel", "bad port"),
    ("ws://user:pw@relay/tunnel", "user or password"),
    ("ws://relay/tunnel#x", "fragment"),
    ("ws://relay:8080", "no path"),
    ("8080", "expected a ws:// or wss:// URL"),
])
def test_bad_relay_urls(tmp_path: Path, relay: str, fragment: str) -> None:
    """The relay URL must be ws/wss with a host, a valid port and a path, no credentials."""
    error = agent_error(tmp_path, AGENT_MIN.replace("ws://relay.example:8080/tunnel", relay))
    assert error.key_path == "relay" and error.line == 1
    assert fragment in str(error)


@pytest.mark.parametrize(("text", "key", "line", "fragment"), [
    ("relay: ws://r/t\nforwards: []\n", "forwards", 2, "at least 1"),
    ("relay: ws://r/t\nforwards: {}\n", "forwards", 2, "expected a list"),
    ("relay: ws://r/t\nforwards:\n  - listen: 9000\n", "forwards[0].target", 3, "missing"),
    ("forwards:\n  - 9000:db:1\n", "relay", 1, "required key is missing from an agent config"),
    ("relay: ws://r/t\nforwards:\n  - listen: 70000\n    target: db:1\n",
     "forwards[0].listen", 3, "outside 0..65535"),
    ("relay: ws://r/t\nforwards:\n  - listen: 9000\n    target: 10:22\n",
     "forwards[0].target", 4, '"10"'),
    ("relay: ws://r/t\nforwards:\n  - 9000:db:1\n  - 127.0.0.1:9000:db:2\n",
     "forwards[1]", 4, "already used by forwards[0]"),
    ("- relay: ws://r/t\n", None, 1, "expected an agent config (a mapping of keys), got a list"),
    ("role: relay\nrelay: ws://r/t\n", "role", 1, "expected 'agent'"),
    ("relay: ws://r/t\nforwards: [1:2:3:4:5]\n", "forwards[0]", 2, "[bind:]port:host:port"),
])
def test_structural_errors(tmp_path: Path, text: str, key: str | None, line: int,
                           fragment: str) -> None:
    """Missing keys, wrong shapes, bad forwards and a wrong role are located errors."""
    error = agent_error(tmp_path, text)
    assert (error.key_path, error.line) == (key, line)
    assert fragment in str(error)


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ("listen: localhost\n", "listen", "expected a port number"),
    ("listen: 'localhost:80'\npath: tunnel\n", "path", "expected a URL path"),
    ("listen: 'localhost:80'\nallow: [10.0.0.1/8]\n", "allow[0]", "did you mean 10.0.0.0/8"),
    ("listen: 'localhost:80'\nallow: [443]\n", "allow[0]", "host name"),
    ("listen: 'localhost:80'\nallow: db\n", "allow", "expected a list"),
    ("listen: 'localhost:80'\nmax_chunk_size: 1MiB\n", "max_chunk_size", "must exceed"),
    ("listen: 'localhost:80'\nmax_channels: 0\n", "max_channels", "a count from 1"),
    ("path: /t\n", "listen", "required key is missing from a relay config"),
])
def test_bad_relay_values(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    """Relay-specific keys are checked with the same located messages."""
    error = relay_error(tmp_path, text)
    assert error.key_path == key and fragment in str(error)
    assert error.line is not None


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("", 1, "empty"),
    ("# only a comment\n", 1, "empty"),
    ("relay: ws://r/t\nforwards: [a\n", 3, "YAML syntax error"),
    ("relay: ws://r/t\n  bad indent: 1\n", 2, "YAML syntax error"),
    ("allow:\n  - *.example.com\n", 2, "need quotes"),
    ("a: &x [*x]\n", 1, "refers to itself"),
    ("---\na: 1\n---\nb: 2\n", 3, "YAML syntax error"),
])
def test_unparseable_files(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    """Empty files, syntax errors and odd YAML are errors with a line number."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.line == line and fragment in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the file, not an OSError."""
    with pytest.raises(ConfigError, match="missing.yaml: cannot read the file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("text", "kind"), [
    ("role: agent\n" + AGENT_MIN, AgentConfig),
    (AGENT_MIN, AgentConfig),
    ("role: relay\n" + RELAY_MIN, RelayConfig),
    (RELAY_MIN, RelayConfig),
])
def test_load_config_tells_the_role(tmp_path: Path, text: str, kind: type) -> None:
    """``role:`` decides; without it ``relay:`` means agent and ``listen:`` means relay."""
    assert isinstance(load_config(write(tmp_path, text)), kind)


@pytest.mark.parametrize(("text", "fragment"), [
    ("path: /x\n", "cannot tell"),
    (RELAY_MIN + "relay: ws://r/t\n", "cannot tell"),
    ("role: proxy\n", "expected agent or relay"),
])
def test_load_config_refuses_to_guess(tmp_path: Path, text: str, fragment: str) -> None:
    """An ambiguous or unknown role is an error asking for ``role:``."""
    with pytest.raises(ConfigError, match=fragment):
        load_config(write(tmp_path, text))


def test_parse_config_from_text_and_mapping() -> None:
    """parse_config takes YAML text (errors with lines) or a mapping (errors without)."""
    assert isinstance(parse_config(RELAY_MIN), RelayConfig)
    agent = parse_config({"relay": "ws://r/t", "forwards": ["9000:db:1"]}, "test")
    assert isinstance(agent, AgentConfig) and agent.source == "test"
    with pytest.raises(ConfigError) as info:
        parse_config({"listen": "127.0.0.1:1", "allow": ["*"]}, "dict")
    assert (info.value.line, info.value.key_path) == (None, "allow[0]")
    assert str(info.value).startswith("dict: allow[0]: ")


# -------------------------------------------------------------- text forms

@pytest.mark.parametrize(("text", "expected"), [
    ("9000:db.internal:5432", Forward("127.0.0.1", 9000, "db.internal", 5432)),
    ("0.0.0.0:9000:10.0.0.1:22", Forward("0.0.0.0", 9000, "10.0.0.1", 22)),
    ("[::1]:9000:[fd00::1]:22", Forward("::1", 9000, "fd00::1", 22)),
    ("localhost:0:intranet:80", Forward("localhost", 0, "intranet", 80)),
])
def test_parse_forward(text: str, expected: Forward) -> None:
    """``-L [bind:]port:host:port``: bind defaults to 127.0.0.1, IPv6 in brackets."""
    assert parse_forward(text) == expected


@pytest.mark.parametrize("text", ["9000:db", "9000", "a:b:c:d:e", "::1:9000:db:22",
                                  "9000:db:0", "9000:db:http", "[db]:9000:x:1", "9000:[x:1",
                                  "9000:bad host:1", "[::1]9000:db:1"])
def test_parse_forward_rejects(text: str) -> None:
    """Malformed -L values raise ValueError mentioning the expected form or the bad part."""
    with pytest.raises(ValueError):
        parse_forward(text)


def test_parse_host_port_and_listen() -> None:
    """host:port needs both parts; a listen address may omit the bind host."""
    assert parse_host_port("[2001:db8::1]:443") == HostPort("2001:db8::1", 443)
    assert parse_listen("8080") == HostPort("127.0.0.1", 8080)
    assert parse_listen("[::]:0") == HostPort("::", 0)
    for bad in ("db", "2001:db8::1:443", "db:0", ":80"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


@pytest.mark.parametrize(("text", "size"), [
    ("65536", 65536), ("64KiB", 65536), ("64k", 65536), ("1.5 MiB", 1572864),
    ("10MB", 10_000_000), ("1GiB", 1 << 30), ("2b", 2),
])
def test_parse_size(text: str, size: int) -> None:
    """Sizes are bytes, with binary (KiB, K) or decimal (KB) units."""
    assert parse_size(text) == size


def test_parse_relay_url_defaults_the_port() -> None:
    """ws:// defaults to port 80 and wss:// to 443; the query stays on the path."""
    assert tuple(parse_relay_url("ws://r/t")) == (False, "r", 80, "/t")
    assert tuple(parse_relay_url("wss://[::1]:8443/t?a=b")) == (True, "::1", 8443, "/t?a=b")


_hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9](\.[a-z]{2,6}){0,2}", fullmatch=True),
)
_ports = st.integers(1, 65535)


@given(_hosts, st.integers(0, 65535), _hosts, _ports)
def test_forward_text_round_trips(bind: str, listen: int, host: str, port: int) -> None:
    """Any valid forward printed as ``listen:target`` parses back to itself."""
    forward = Forward(bind, listen, host, port)
    assert parse_forward(f"{forward.listen}:{forward.target}") == forward


@given(st.text(max_size=200))
def test_garbage_yaml_only_raises_config_error(text: str) -> None:
    """Any text either loads or fails with a ConfigError, never another exception."""
    try:
        parse_document(text, "fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml")
