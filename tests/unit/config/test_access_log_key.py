"""The access_log key (both roles) and --access-log: off, on, or a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from wstunnel.cli.main import agent_config_from_args, relay_config_from_args
from wstunnel.cli.parser import build_parser
from wstunnel.config import load_relay_config, parse_config
from wstunnel.errors import ConfigError

RELAY = "listen: 127.0.0.1:8080\n"
AGENT = "relay: ws://r:1/tunnel\nforwards: ['9000:db:5432']\n"


@pytest.mark.parametrize("base", [RELAY, AGENT])
@pytest.mark.parametrize(("value", "expected"), [
    (None, "off"), ("off", "off"), ("false", "off"), ("on", "on"), ("true", "on"),
    ("stderr", "on"), ("'Off'", "off"), ("/var/log/wstunnel/access.log",
                                         "/var/log/wstunnel/access.log")])
def test_off_on_or_a_path_in_both_roles(base: str, value: str | None, expected: str) -> None:
    """Off by default; YAML's booleans and the words off/on/stderr; else a file path."""
    text = base if value is None else f"{base}access_log: {value}\n"
    assert parse_config(text).access_log == expected


def test_a_relative_file_is_beside_the_config_and_a_flags_in_the_working_directory(
        tmp_path: Path) -> None:
    """As for every file a config names: relative to the file; a flag's to the cwd."""
    path = tmp_path / "relay.yaml"
    path.write_text(RELAY + "access_log: logs/access.log\n")
    assert load_relay_config(path).access_log == str(tmp_path / "logs" / "access.log")
    args = build_parser().parse_args(["relay", "-c", str(path), "--access-log", "a.log"])
    assert relay_config_from_args(args).access_log == "a.log"
    args = build_parser().parse_args(["agent", "--relay", "ws://r:1/t", "-L", "9000:db:1",
                                      "--access-log", "on"])
    assert agent_config_from_args(args).access_log == "on"


def test_a_wrong_value_names_file_line_and_key(tmp_path: Path) -> None:
    """A number or an empty string is a located error listing what is accepted."""
    path = tmp_path / "relay.yaml"
    path.write_text(RELAY + "access_log: 3\n")
    with pytest.raises(ConfigError, match=r"relay.yaml:2: access_log: expected off, on .* "
                                          r"or a file path, got 3"):
        load_relay_config(path)
