"""The relay's max_pending_handshakes key, and its default from the open-files limit."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import pytest

from wstunnel.config import RelayConfig, load_relay_config, parse_config
from wstunnel.errors import ConfigError
from wstunnel.service.open_files import pending_handshakes_limit

RELAY = "listen: 127.0.0.1:8080\n"


def test_absent_or_null_means_derived_and_a_count_is_kept() -> None:
    """Absent or null: derived at start (None in the config); a count is taken as it is."""
    for text, expected in (("", None), ("max_pending_handshakes: null\n", None),
                           ("max_pending_handshakes: 64\n", 64)):
        config = parse_config(RELAY + text)
        assert isinstance(config, RelayConfig)
        assert config.max_pending_handshakes == expected


@pytest.mark.parametrize("value", ["0", "70000", "many", "true", "1.5"])
def test_a_bad_value_names_the_file_line_and_key(tmp_path: Path, value: str) -> None:
    """Not a count from 1 to 65536: an error naming file, line and key."""
    path = tmp_path / "relay.yaml"
    path.write_text(RELAY + f"max_pending_handshakes: {value}\n")
    with pytest.raises(ConfigError, match=r"relay.yaml:2: max_pending_handshakes: expected "
                                          r"a (count|size)") as info:
        load_relay_config(path)
    assert info.value.key_path == "max_pending_handshakes"


def test_the_default_is_a_quarter_of_the_open_files_limit_capped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A quarter of the soft limit, at least 1, at most 1024: the other three quarters stay
    for sessions and their channels."""
    for soft, expected in ((64, 16), (1024, 256), (65536, 1024), (2, 1)):
        monkeypatch.setattr(resource, "getrlimit", lambda _which, soft=soft: (soft, soft))
        assert pending_handshakes_limit(None) == expected


def test_a_configured_value_is_kept_and_one_above_half_the_limit_warned_about(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The operator's value wins; past half the descriptors the log says what it risks."""
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1000, 1000))
    with caplog.at_level(logging.WARNING, logger="wstunnel"):
        assert pending_handshakes_limit(500) == 500
        assert not caplog.records
        assert pending_handshakes_limit(501) == 501
    assert "max_pending_handshakes 501 is more than half the open-files limit (1000)" in (
        caplog.text)
