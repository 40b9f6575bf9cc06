"""Command-line flags are config keys: the same parsers, the same rules, the same config.

The tables below hold, for every flag of ``wstunnel agent`` and ``wstunnel relay``
that writes a config key, the flag and the same setting as a YAML key. Each row
must give equal configs both ways, and every flag must have a row, so the two
ways of writing a setting cannot drift apart again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from wstunnel.cli.main import agent_config_from_args, relay_config_from_args
from wstunnel.cli.parser import build_parser
from wstunnel.config import AgentConfig, RelayConfig, load_agent_config, load_relay_config
from wstunnel.config.flags import AGENT_FLAGS, RELAY_FLAGS
from wstunnel.errors import ConfigError

PIN = "sha256:" + "ab" * 32
READABLE = "READABLE"  # replaced by a file the test writes (the key needs a readable file)
NOT_CONFIG = {"command", "handler", "config"}

AGENT_BASE = {"relay": (["--relay", "wss://relay.example/t"], "wss://relay.example/t"),
              "forwards": (["-L", "9000:db:5432"], ["9000:db:5432"])}
# (flags, the same settings as YAML keys); file names absolute, since a file's
# relative names are relative to the file and a flag's to the working directory.
AGENT_ROWS: list[tuple[list[str], dict[str, Any]]] = [
    (["--relay", "ws://other.example:8080/x?k=1"], {"relay": "ws://other.example:8080/x?k=1"}),
    (["-L", "0.0.0.0:9001:a:1", "-L", "[::1]:9002:[fd00::1]:22", "-L", "0:c:3"],
     {"forwards": ["0.0.0.0:9001:a:1", "[::1]:9002:[fd00::1]:22", "0:c:3"]}),
    (["-L", "0:a:1", "-L", "0:b:2"], {"forwards": ["0:a:1", "0:b:2"]}),  # port 0: no clash
    (["-D", "1080", "-D", "0.0.0.0:1081"],
     {"forwards": [{"dynamic": "1080"}, {"dynamic": "0.0.0.0:1081"}]}),
    (["-L", "0:a:1", "-D", "[::1]:0"], {"forwards": ["0:a:1", {"dynamic": "[::1]:0"}]}),
    (["-R", "2222:localhost:22", "-L", "/tmp/a.sock:unix:/run/b.sock"],
     {"forwards": ["/tmp/a.sock:unix:/run/b.sock", {"reverse": "2222:localhost:22"}]}),
    (["--proxy", "http://agent@proxy.example:3128"], {"proxy": "http://agent@proxy.example:3128"}),
    (["--no-proxy"], {"proxy": "none"}),
    (["--proxy", "http://agent@p:3128", "--proxy-password-file", READABLE],
     {"proxy": "http://agent@p:3128", "proxy_password_file": READABLE}),
    (["--header", "X-Route: a", "--headers", "X-Key: 2"], {"headers": ["X-Route: a", "X-Key: 2"]}),
    (["--host-header", "front.example:8443"], {"host_header": "front.example:8443"}),
    (["--transport", "polling"], {"transport": "polling"}),
    (["--user-agent", "Mozilla/5.0 (X11)"], {"user_agent": "Mozilla/5.0 (X11)"}),
    (["--token-file", "/etc/wstunnel/agent.token"], {"token_file": "/etc/wstunnel/agent.token"}),
    (["--token-env", "WSTUNNEL_TOKEN"], {"token_env": "WSTUNNEL_TOKEN"}),
    (["--token-credential", "agent-token"], {"token_credential": "agent-token"}),
    (["--ca-file", "/etc/wstunnel/ca.pem"], {"ca_file": "/etc/wstunnel/ca.pem"}),
    (["--relay-fingerprint", PIN.upper()], {"relay_fingerprint": PIN.upper()}),
    (["--insecure-skip-verify"], {"insecure_skip_verify": True}),
    (["--server-name", "relay.internal"], {"server_name": "relay.internal"}),
    (["--client-cert-file", "/etc/a.crt", "--client-key-file", "/etc/a.key"],
     {"client_cert_file": "/etc/a.crt", "client_key_file": "/etc/a.key"}),
    (["--metrics", "127.0.0.1:9108"], {"metrics": "127.0.0.1:9108"}),
    (["--metrics-auth-file", READABLE], {"metrics_auth_file": READABLE}),
    (["--admin-socket", "/run/wstunnel/agent.sock"], {"admin_socket": "/run/wstunnel/agent.sock"}),
    (["--access-log", "/var/log/wstunnel/a.log"], {"access_log": "/var/log/wstunnel/a.log"}),
    (["--log-level", "debug"], {"log_level": "debug"}),
    (["--log-format", "json"], {"log_format": "json"}),
    (["--stdio", "db.internal:22"], {"stdio": "db.internal:22"}),
    (["--stdio", "fd00::1:22"], {"stdio": "[fd00::1]:22"}),  # ssh's %h:%p for an IPv6 host
]

RELAY_BASE = {"listen": (["--listen", "127.0.0.1:8080"], "127.0.0.1:8080")}
RELAY_ROWS: list[tuple[list[str], dict[str, Any]]] = [
    (["--listen", "[::1]:0"], {"listen": "[::1]:0"}),
    (["--no-auth"], {"no_auth": True}),
    (["--resume-grace", "2.5"], {"resume_grace": 2.5}),
    (["--no-auth", "--allow", "db.internal:5432", "--allow", "10.0.0.0/8"],
     {"no_auth": True, "allow": ["db.internal:5432", "10.0.0.0/8"]}),
    (["--no-auth", "--listen-allow", "127.0.0.1:2222", "--listen-allow", "unix:/run/w/*"],
     {"no_auth": True, "listen_allow": ["127.0.0.1:2222", "unix:/run/w/*"]}),
    (["--path", "/t"], {"path": "/t"}),
    (["--trusted-proxy", "10.0.0.0/8", "--trusted-proxies", "192.0.2.1"],
     {"trusted_proxies": ["10.0.0.0/8", "192.0.2.1"]}),
    (["--tls-cert-file", "/etc/r.crt", "--tls-key-file", "/etc/r.key",
      "--tls-client-ca-file", "/etc/ca.pem"],
     {"tls": {"cert_file": "/etc/r.crt", "key_file": "/etc/r.key",
              "client_ca_file": "/etc/ca.pem"}}),
    (["--metrics", "[::1]:9108"], {"metrics": "[::1]:9108"}),
    (["--metrics-auth-file", READABLE], {"metrics_auth_file": READABLE}),
    (["--admin-socket", "/run/wstunnel/relay.sock"], {"admin_socket": "/run/wstunnel/relay.sock"}),
    (["--access-log", "on"], {"access_log": "on"}),
    (["--log-level", "warning"], {"log_level": "warning"}),
    (["--log-format", "json"], {"log_format": "json"}),
]


def _with_base(base: dict[str, tuple[list[str], Any]], flags: list[str],
               keys: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The row plus the required settings it does not give itself, both ways."""
    missing = [key for key in base if key not in keys]
    argv = [arg for key in missing for arg in base[key][0]] + flags
    return argv, {**{key: base[key][1] for key in missing}, **keys}


def _readable(tmp_path: Path, flags: list[str], keys: dict[str, Any]) -> tuple[list[str], str]:
    password = tmp_path / "proxy.password"
    password.write_text("secret\n")
    text = json.dumps(keys).replace(json.dumps(READABLE), json.dumps(str(password)))
    return [str(password) if arg == READABLE else arg for arg in flags], text


def agent_from_flags(argv: list[str]) -> AgentConfig:
    return agent_config_from_args(build_parser().parse_args(["agent", *argv]))


def relay_from_flags(argv: list[str]) -> RelayConfig:
    return relay_config_from_args(build_parser().parse_args(["relay", *argv]))


def _row_id(row: tuple[list[str], dict[str, Any]]) -> str:
    return " ".join(arg for arg in row[0] if arg.startswith("-"))


@pytest.mark.parametrize("row", AGENT_ROWS, ids=_row_id)
def test_each_agent_flag_gives_what_its_key_gives(
        row: tuple[list[str], dict[str, Any]], tmp_path: Path) -> None:
    """An agent flag and its YAML key (JSON is YAML) give equal configs, unlike the default."""
    argv, keys = _with_base(AGENT_BASE, *row)
    argv, text = _readable(tmp_path, argv, keys)
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    from_flags = agent_from_flags(argv)
    assert from_flags == load_agent_config(path)
    assert from_flags != agent_from_flags(_with_base(AGENT_BASE, [], {})[0])


@pytest.mark.parametrize("row", RELAY_ROWS, ids=_row_id)
def test_each_relay_flag_gives_what_its_key_gives(
        row: tuple[list[str], dict[str, Any]], tmp_path: Path) -> None:
    """A relay flag and its YAML key give equal configs, unlike the default."""
    argv, keys = _with_base(RELAY_BASE, *row)
    argv, text = _readable(tmp_path, argv, keys)
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    from_flags = relay_from_flags(argv)
    assert from_flags == load_relay_config(path)
    assert from_flags != relay_from_flags(_with_base(RELAY_BASE, [], {})[0])


@pytest.mark.parametrize(("role", "table", "rows"), [
    ("agent", AGENT_FLAGS, AGENT_ROWS), ("relay", RELAY_FLAGS, RELAY_ROWS)])
def test_every_flag_maps_to_a_key_and_has_a_row(role: str, table: Any,
                                                 rows: list[tuple[list[str], Any]]) -> None:
    """Each option of the subcommand writes a config key, and each is in a row above
    under the name its messages use."""
    parser = build_parser()
    options = vars(parser.parse_args([role, "--log-level", "info", "--log-format", "text"]))
    assert set(options) - NOT_CONFIG == set(table)
    exercised = set()
    for flags, _ in rows:
        given = vars(parser.parse_args([role, *flags]))
        exercised |= {dest for dest, value in given.items()
                      if value is not None and dest not in NOT_CONFIG}
    assert exercised == set(table)
    written = {arg for flags, _ in rows for arg in flags}
    assert {flag.name for flag in table.values()} <= written


@pytest.mark.parametrize(("argv", "message"), [
    (["-L", "9000:a.example:1", "-L", "9000:b.example:2"],
     "-L: listen address 127.0.0.1:9000 is already used by -L 9000:a.example:1"),
    (["-L", "1:db"], "-L: expected [bind:]port:host:port (IPv6 in brackets; a /path or "
                     "unix:/path for a unix socket), got \"1:db\""),
    (["-R", "localhost:2222:db:1"], "-R: the relay listens on IP addresses"),
    (["-R", "2222:db:1", "-R", "127.0.0.1:2222:db:2"],
     "-R: the relay's listen address 127.0.0.1:2222 is already used by -R 2222:db:1"),
    (["-L", "1:db:2", "--token-file", "t", "--token-env", "T"],
     "--token-env: give one token source, not both token_file and token_env"),
    (["-L", "1:db:2", "--proxy", "http://p:3128", "--proxy-password-file", "/"],
     "--proxy-password-file: cannot read \"/\": no such file, or no permission"),
    (["-L", "1:db:2", "--admin-socket", "/" + "x" * 120], "--admin-socket: a unix socket path"),
])
def test_agent_flag_errors_name_the_flag(argv: list[str], message: str) -> None:
    """A bad flag value, or a rule two flags break, is an error naming the flag, with the
    message the same value gets in a file."""
    with pytest.raises(ConfigError) as info:
        agent_from_flags(["--relay", "wss://r/t", *argv])
    assert str(info.value).startswith(message)


def test_flags_replace_only_their_key_and_paths_stay_where_written(tmp_path: Path) -> None:
    """With -c, a flag replaces one key (one key of ``tls``); a relative name in the file
    is beside the file, one in a flag is where it was typed."""
    path = tmp_path / "relay.yaml"
    path.write_text("listen: 127.0.0.1:8080\npath: /a\n"
                    "tls: {cert_file: relay.crt, key_file: relay.key}\n")
    config = relay_from_flags(["-c", str(path), "--tls-key-file", "other.key", "--path", "/b"])
    assert config.tls is not None
    assert (config.tls.cert_file, config.tls.key_file) == (str(tmp_path / "relay.crt"),
                                                           "other.key")
    assert (str(config.listen), config.path, config.source) == ("127.0.0.1:8080", "/b",
                                                                str(path))


def test_the_file_is_checked_with_the_flags_over_it(tmp_path: Path) -> None:
    """Rules hold for the config that runs: -L over a file's forwards is checked like
    forwards in the file, and an error in a key the flags left alone names its line."""
    path = tmp_path / "agent.yaml"
    path.write_text("relay: ws://r/t\nforwards: ['9000:db:1']\nping_interval: 0\n")
    with pytest.raises(ConfigError) as info:
        agent_from_flags(["-c", str(path), "-L", "9001:db:1"])
    assert str(info.value).startswith(f"{path}:3: ping_interval: expected seconds")
    path.write_text("relay: ws://r/t\nforwards: ['9000:db:1', '9001:db:2']\n")
    with pytest.raises(ConfigError, match="^-L: listen address 127.0.0.1:9001 is already "
                                          "used by -L 9001:a:1$"):
        agent_from_flags(["-c", str(path), "-L", "9001:a:1", "-L", "9001:b:2"])
