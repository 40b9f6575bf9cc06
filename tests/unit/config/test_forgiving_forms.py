"""Forms people type on their first try: a bare relay port, an http(s):// relay URL."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from wstunnel.addresses import HostPort
from wstunnel.cli.main import agent_config_from_args, relay_config_from_args
from wstunnel.cli.parser import build_parser
from wstunnel.config import AgentConfig, RelayConfig, parse_config
from wstunnel.errors import ConfigError

_FORWARDS = "forwards: ['2222:127.0.0.1:22']\n"


@pytest.fixture
def notes(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The config logger's records, whatever an earlier setup_logging did to propagation."""
    logger = logging.getLogger("wstunnel.config")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="wstunnel.config")
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


@pytest.mark.parametrize(("written", "expected"), [
    ("8080", HostPort("127.0.0.1", 8080)),
    ("'8080'", HostPort("127.0.0.1", 8080)),
    ("0.0.0.0:8080", HostPort("0.0.0.0", 8080)),
    ("'[::]:0'", HostPort("::", 0)),
])
def test_relay_listen_takes_a_bare_port_as_loopback(written: str, expected: HostPort) -> None:
    """A relay ``listen`` without a host binds 127.0.0.1, like ``-L``; a host is kept."""
    relay = parse_config(f"listen: {written}\nno_auth: true\n")
    assert isinstance(relay, RelayConfig) and relay.listen == expected


def test_relay_listen_flag_takes_a_bare_port() -> None:
    """``wstunnel relay --listen 9000`` serves 127.0.0.1:9000."""
    args = build_parser().parse_args(["relay", "--listen", "9000", "--no-auth"])
    assert relay_config_from_args(args).listen == HostPort("127.0.0.1", 9000)


def test_relay_listen_still_refuses_garbage() -> None:
    """A bare word is not a port: the error names the key and the form expected."""
    with pytest.raises(ConfigError, match=r"listen: expected a port number"):
        parse_config("listen: eighty\nno_auth: true\n")


@pytest.mark.parametrize(("written", "expected"), [
    ("http://relay.example.com/tunnel", "ws://relay.example.com/tunnel"),
    ("HTTPS://relay.example.com:8443/t", "wss://relay.example.com:8443/t"),
])
def test_http_relay_urls_are_taken_as_websocket_urls(
        written: str, expected: str, notes: pytest.LogCaptureFixture) -> None:
    """An http(s):// relay URL is used as ws(s):// and an info line says so."""
    agent = parse_config(f"relay: {written}\n{_FORWARDS}")
    assert isinstance(agent, AgentConfig) and agent.relay == expected
    assert agent.relay_url.secure is expected.startswith("wss")
    infos = [r.getMessage() for r in notes.records if r.levelno == logging.INFO]
    assert any(f"relay: {written} taken as {expected}" in line for line in infos)


def test_http_relay_url_flag(notes: pytest.LogCaptureFixture) -> None:
    """``--relay https://...`` is ``wss://`` too, and the note names the flag."""
    args = build_parser().parse_args(["agent", "--relay", "https://r.example/tunnel",
                                      "-L", "2222:127.0.0.1:22"])
    assert agent_config_from_args(args).relay == "wss://r.example/tunnel"
    assert any("--relay" in r.getMessage() and "taken as wss://r.example/tunnel"
               in r.getMessage() for r in notes.records)


def test_ws_urls_and_other_schemes_are_unchanged(notes: pytest.LogCaptureFixture) -> None:
    """ws:// passes silently; ftp:// is still refused."""
    agent = parse_config(f"relay: ws://r/t\n{_FORWARDS}")
    assert isinstance(agent, AgentConfig) and agent.relay == "ws://r/t" and not notes.records
    with pytest.raises(ConfigError, match="ws:// or wss://"):
        parse_config(f"relay: ftp://r/t\n{_FORWARDS}")
