"""The forms of -R, unix-socket ends and forward names, in YAML and on the command line,
and the relay's listen_allow rules."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from wstunnel.config import load_agent_config, load_relay_config
from wstunnel.config.textforms import LOCAL, REVERSE, Forward, parse_forward
from wstunnel.errors import ConfigError
from wstunnel.security.auth import hash_token, new_token
from wstunnel.security.listen_policy import ListenPolicy, ListenRule

HEAD = "relay: ws://relay.example:8080/tunnel\nforwards:\n"


def agent(tmp_path: Path, forwards: str) -> tuple[Forward, ...]:
    path = tmp_path / "agent.yaml"
    path.write_text(HEAD + textwrap.indent(textwrap.dedent(forwards), "  "))
    return load_agent_config(path).forwards


def agent_error(tmp_path: Path, forwards: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        agent(tmp_path, forwards)
    return info.value


def test_reverse_in_yaml_both_ways_with_names(tmp_path: Path) -> None:
    """``reverse`` holds the listen address with a ``target``, or the whole -R text;
    every mapping form takes a ``name``, which becomes the forward's label."""
    split, whole, local = agent(tmp_path, """\
        - reverse: "0.0.0.0:2222"
          target: 127.0.0.1:22
          name: ssh-in
        - reverse: "8080:unix:/run/app.sock"
        - listen: /tmp/w/db.sock
          target: "unix:/run/postgresql/.s.PGSQL.5432"
          name: pg
        """)
    assert (split.kind, split.listen_text, split.target_text, split.label) == (
        REVERSE, "0.0.0.0:2222", "127.0.0.1:22", "ssh-in")
    assert (whole.kind, whole.listen_text, whole.target_path) == (
        REVERSE, "127.0.0.1:8080", "/run/app.sock")
    assert whole.label == "-R 127.0.0.1:8080:unix:/run/app.sock"
    assert (local.kind, local.listen_path, local.target_path, local.label) == (
        LOCAL, "/tmp/w/db.sock", "/run/postgresql/.s.PGSQL.5432", "pg")


@pytest.mark.parametrize(("forwards", "key", "fragment"), [
    ('- reverse: "db.example:2222"\n  target: h:1\n', "forwards[0].reverse",
     "the relay listens on IP addresses, not names"),
    ("- reverse: 0\n  target: h:1\n", "forwards[0].reverse", "needs a fixed port"),
    ('- reverse: "2222"\n', "forwards[0].reverse", "[bind:]port:host:port"),
    ("- listen: 1\n  target: h:1\n  name: 'no spaces'\n", "forwards[0].name",
     "expected a forward name"),
    ("- reverse: 2222\n  target: h:1\n- reverse: 127.0.0.1:2222\n  target: h:2\n",
     "forwards[1]", "the relay's listen address 127.0.0.1:2222 is already used"),
    ("- listen: relative.sock\n  target: h:1\n", "forwards[0].listen", "port number"),
    ("- listen: 1\n  target: unix:relative\n", "forwards[0].target", "absolute"),
])
def test_bad_forms_are_located(tmp_path: Path, forwards: str, key: str, fragment: str) -> None:
    error = agent_error(tmp_path, forwards)
    assert error.key_path == key
    assert fragment in str(error)


def test_the_same_port_may_be_local_and_reverse(tmp_path: Path) -> None:
    """A -L port and a -R port are on different hosts: both may be 2222."""
    local, far = agent(tmp_path, "- 2222:h:1\n- reverse: 2222\n  target: h:2\n")
    assert (local.kind, far.kind) == (LOCAL, REVERSE)


def test_parse_forward_unix_ends() -> None:
    both = parse_forward("/a/in.sock:unix:/b/out.sock")
    assert (both.listen_path, both.target_path, str(both)) == (
        "/a/in.sock", "/b/out.sock", "/a/in.sock -> unix:/b/out.sock")
    with pytest.raises(ValueError, match="at most 107 bytes"):
        parse_forward("/" + "x" * 120 + ":h:1")


def test_listen_allow_in_relay_yaml(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("listen: 127.0.0.1:8080\nagents:\n  - name: a1\n"
                    f"    token_hash: {hash_token(new_token('a1'))}\n"
                    "    listen_allow: ['127.0.0.1:2222', 'unix:/run/w/*']\n")
    (account,) = load_relay_config(path).agents
    assert account.listen_policy.refusal("127.0.0.1", 2222) is None
    assert account.listen_policy.refusal("", 1, "/run/w/a.sock") is None
    path.write_text("listen: 127.0.0.1:8080\nno_auth: true\nlisten_allow: [db.example]\n")
    with pytest.raises(ConfigError) as info:
        load_relay_config(path)
    assert info.value.key_path == "listen_allow[0]" and info.value.line == 3
    assert "addresses, not names" in str(info.value)


@pytest.mark.parametrize(("rules", "host", "port", "path", "allowed"), [
    ([], "127.0.0.1", 2222, None, False),
    (["127.0.0.1:2222"], "127.0.0.1", 2222, None, True),
    (["127.0.0.1:2222"], "127.0.0.1", 2223, None, False),
    (["127.0.0.0/8:8000-8099"], "127.0.0.9", 8050, None, True),
    (["10.0.0.0/8"], "0.0.0.0", 80, None, False),  # every interface: not inside 10/8
    (["0.0.0.0:8080"], "0.0.0.0", 8080, None, True),
    (["0.0.0.0/0:8080"], "0.0.0.0", 8080, None, True),
    (["0.0.0.0/0"], "::", 8080, None, False),  # IPv6 needs its own rule
    (["[::1]:2222"], "::1", 2222, None, True),
    (["127.0.0.1"], "", 1, "/run/x.sock", False),  # an address rule never allows a path
    (["unix:/run/x.sock"], "", 1, "/run/x.sock", True),
    (["unix:/run/x.sock"], "", 1, "/run/y.sock", False),
    (["unix:/run/w/*"], "", 1, "/run/w/a.sock", True),
    (["unix:/run/w/*"], "", 1, "/run/w/sub/a.sock", False),
    (["unix:/run/w/*"], "", 1, "/run/w/../x.sock", False),
    (["unix:/*"], "", 1, "/x.sock", True),
    (["unix:/*"], "", 1, "/run/x.sock", False),
    (["unix:/run/x.sock"], "127.0.0.1", 2222, None, False),
])
def test_listen_policy(rules: list[str], host: str, port: int, path: str | None,
                       allowed: bool) -> None:
    refusal = ListenPolicy(rules).refusal(host, port, path)
    assert (refusal is None) == allowed, refusal


@pytest.mark.parametrize("text", ["db.example", "*.example.com", "unix:relative",
                                  "unix:/a/*/b", "127.0.0.1:0", "10.0.0.1/8",
                                  "unix:/run/w/../*", "unix:/run//w/*", "unix:/run/./x.sock"])
def test_bad_listen_rules(text: str) -> None:
    with pytest.raises(ValueError):
        ListenRule.parse(text)


@pytest.mark.parametrize(("key", "rule", "write"), [
    ("listen_allow", "unix:/run/w/", "unix:/run/w/*"),
    ("listen_allow", "unix:/", "unix:/*"),
    ("allow", "unix:/run/app/", "unix:/run/app/*"),
])
def test_a_unix_rule_ending_in_a_slash_is_a_located_error(
        tmp_path: Path, key: str, rule: str, write: str) -> None:
    """``unix:/dir/`` would match no socket path (it names the directory): loading
    the config fails at that rule's line, saying what to write instead."""
    path = tmp_path / "relay.yaml"
    path.write_text(f"listen: 127.0.0.1:8080\nno_auth: true\n{key}:\n  - '{rule}'\n")
    with pytest.raises(ConfigError) as info:
        load_relay_config(path)
    assert (info.value.key_path, info.value.line) == (f"{key}[0]", 4)
    assert f"write {write} for any socket directly in" in str(info.value)


def test_listen_rules_print_as_written() -> None:
    for text in ("127.0.0.1:2222", "0.0.0.0/0:8000-8099", "[::1]:22", "unix:/run/w/*",
                 "10.0.0.0/8"):
        assert str(ListenRule.parse(text)) == text
