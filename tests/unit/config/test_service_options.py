"""The service settings (metrics, admin_socket) in files and flags, and `wstunnel status`."""

from __future__ import annotations

from pathlib import Path

import pytest

from wstunnel.addresses import HostPort
from wstunnel.cli import main
from wstunnel.config import load_relay_config, parse_config
from wstunnel.errors import ConfigError
from wstunnel.service.admin import format_status


def test_metrics_and_admin_socket_keys_parse_in_both_roles() -> None:
    """metrics is host:port, admin_socket a path; both default to off (None)."""
    relay = parse_config("listen: 127.0.0.1:8080\nmetrics: 127.0.0.1:9108\n"
                         "admin_socket: /run/x/admin.sock\n")
    assert relay.metrics == HostPort("127.0.0.1", 9108)
    assert relay.admin_socket == "/run/x/admin.sock"
    agent = parse_config("relay: ws://r:1/tunnel\nforwards: ['9000:db:5432']\nmetrics: null\n")
    assert agent.metrics is None and agent.admin_socket is None


def test_bad_service_keys_name_file_line_and_key(tmp_path: Path) -> None:
    """A bad metrics address or an over-long socket path is a located ConfigError."""
    path = tmp_path / "relay.yaml"
    path.write_text("listen: 127.0.0.1:8080\nmetrics: 9108\n")
    with pytest.raises(ConfigError, match=r"relay.yaml:2: metrics: expected host:port"):
        load_relay_config(path)
    path.write_text("listen: 127.0.0.1:8080\nadmin_socket: /" + "x" * 120 + "\n")
    with pytest.raises(ConfigError, match=r"relay.yaml:2: admin_socket: .* at most 107 bytes"):
        load_relay_config(path)


def test_status_without_a_running_process_says_what_to_check(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`status --socket` to a missing socket exits 1 naming the socket and the key."""
    assert main(["status", "--socket", str(tmp_path / "none.sock")]) == 1
    err = capsys.readouterr().err
    assert "no admin socket at" in err and "admin_socket" in err


def test_status_with_a_config_lacking_admin_socket_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`status -c` on a config without admin_socket exits 2 and says what to add."""
    path = tmp_path / "relay.yaml"
    path.write_text("listen: 127.0.0.1:8080\n")
    assert main(["status", "-c", str(path)]) == 2
    assert "add `admin_socket:" in capsys.readouterr().err


def test_format_status_shows_each_channel() -> None:
    """The status view has a summary line and one row per channel with its rate."""
    status = {
        "role": "agent", "version": "0.1.0", "pid": 42, "uptime": 3725.0,
        "channels_total": 7, "reconnects": 1, "bytes_sent": 2048, "bytes_received": 1 << 20,
        "open_failures": {"forbidden": 2},
        "sessions": [{"name": "ws://relay:8080/tunnel", "age": 61.0, "channels_total": 3,
                      "channels": [{"id": 1, "destination": "db.internal:5432", "age": 5.0,
                                    "bytes_sent": 100, "bytes_received": 3 << 20,
                                    "rate_sent": 0.0, "rate_received": 1.5 * (1 << 20)}]}],
    }
    text = format_status(status)
    assert text.splitlines()[0].startswith("wstunnel agent 0.1.0, pid 42, up 1h02m: 1 session")
    assert "refused opens: forbidden 2" in text
    row = next(line for line in text.splitlines() if "db.internal:5432" in line)
    assert row.split()[:5] == ["1", "db.internal:5432", "5s", "100", "B"]
    assert "1.5 MiB/s" in row and "3.0 MiB" in row


def test_buffer_thresholds_are_set_where_libc_is_glibc() -> None:
    """The agent and relay keep read buffers in the heap (malloc_tuning.py)."""
    import platform

    from wstunnel.service.malloc_tuning import keep_buffers_in_heap

    assert keep_buffers_in_heap() is (platform.libc_ver()[0] == "glibc")


def test_status_on_a_path_that_is_no_socket_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`status --socket` naming a regular file or a directory (a typo, or the config's
    directory) says it is not a socket, instead of blaming a process that exited."""
    (tmp_path / "relay.yaml").write_text("listen: 127.0.0.1:8080\n")
    for path in (tmp_path / "relay.yaml", tmp_path):
        assert main(["status", "--socket", str(path)]) == 1
        err = capsys.readouterr().err
        assert f"{path} is not a socket" in err and "admin_socket" in err, err
