"""``--stdio HOST:PORT`` (and the ``stdio`` key): a config that needs no forwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from wstunnel.addresses import HostPort
from wstunnel.config.flags import agent_config
from wstunnel.errors import ConfigError

RELAY = "ws://relay.example/tunnel"


def test_stdio_needs_no_forwards() -> None:
    """--stdio replaces the forwards, so none need be given."""
    config = agent_config(None, {"relay": RELAY, "stdio": "db:22"})
    assert config.stdio == HostPort("db", 22) and config.forwards == ()


def test_stdio_takes_what_ssh_writes_for_an_ipv6_host() -> None:
    """ssh's %h:%p gives an IPv6 address without brackets: ``::1:22``."""
    assert agent_config(None, {"relay": RELAY, "stdio": "::1:22"}).stdio == HostPort("::1", 22)


def test_a_file_without_forwards_works_with_stdio(tmp_path: Path) -> None:
    """-c agent.yaml supplies relay, token and TLS; --stdio the destination."""
    path = tmp_path / "agent.yaml"
    path.write_text(f"relay: {RELAY}\nconnect_wait_timeout: 3\n")
    config = agent_config(path, {"stdio": "db:22"})
    assert (config.stdio, config.connect_wait_timeout) == (HostPort("db", 22), 3.0)


def test_without_stdio_a_forward_is_still_required(tmp_path: Path) -> None:
    """Neither a forward nor --stdio: the message says what to give, flags or file."""
    with pytest.raises(ConfigError, match="-L .* or --stdio host:port"):
        agent_config(None, {"relay": RELAY})
    path = tmp_path / "agent.yaml"
    path.write_text(f"relay: {RELAY}\n")
    with pytest.raises(ConfigError, match="forwards: required key is missing"):
        agent_config(path, {})


def test_a_bad_stdio_target_names_the_flag() -> None:
    """A destination without a port is refused, naming --stdio."""
    with pytest.raises(ConfigError, match="--stdio: expected host:port"):
        agent_config(None, {"relay": RELAY, "stdio": "db"})
