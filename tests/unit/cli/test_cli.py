"""The command line: parsing, ``check``, config building, exit codes, logging, signals.

The roles are replaced by fakes (no networking): a fake ``wstunnel.relay`` or
``wstunnel.agent`` module whose ``run_*`` records its config or raises.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wstunnel import __version__
from wstunnel.cli import main
from wstunnel.errors import HandshakeError
from wstunnel.service.logs import setup_logging

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """main() installs a handler on the 'wstunnel' logger; restore it after each test."""
    logger = logging.getLogger("wstunnel")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def fake_role(monkeypatch: pytest.MonkeyPatch, role: str,
              body: Callable[[Any, Any], Any] | None = None) -> list[Any]:
    """Install a fake ``wstunnel.<role>`` whose runner records its config, then runs ``body``."""
    seen: list[Any] = []

    async def run(config: Any, *, shutdown: Any, task_status: Any, **service: Any) -> None:
        seen.append(config)
        task_status.started([])
        if body is not None:
            await body(config, shutdown)

    module = types.ModuleType(f"wstunnel.{role}")
    setattr(module, f"run_{role}", run)
    monkeypatch.setitem(sys.modules, f"wstunnel.{role}", module)
    return seen


# ------------------------------------------------------------ parse / check

def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the version and exits 0."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"wstunnel {__version__}"


@pytest.mark.parametrize("argv", [[], ["bogus"], ["check"], ["relay", "--nope"],
                                  ["--log-level", "loud", "check", "-c", "x"],
                                  ["demo", "--size", "lots"], ["demo", "--seconds", "-1"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Bad arguments give exit code 2 and a usage message, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["agent.yaml", "relay.yaml"])
def test_check_accepts_the_examples(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """check -c FILE prints a one-line OK summary and exits 0."""
    assert main(["check", "-c", str(CONFIGS / name)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"{CONFIGS / name}: OK \N{EM DASH} ")
    assert name.split(".")[0] in out


def test_check_reports_a_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid file: the located message on stderr, exit 2, no traceback."""
    path = tmp_path / "agent.yaml"
    path.write_text("relay: ws://r/t\nforwards:\n  - listen: 1\n    target: db.internal\n")
    assert main(["check", "-c", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert f'{path}:4: forwards[0].target: expected host:port, got "db.internal"' in captured.err


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file is a config error (exit 2), not a crash."""
    assert main(["check", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read the file" in capsys.readouterr().err


def test_global_options_work_after_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    """--log-level/--log-format are accepted before or after the subcommand."""
    config = str(CONFIGS / "relay.yaml")
    assert main(["--log-level", "debug", "check", "-c", config]) == 0
    assert main(["check", "--log-format", "json", "-c", config]) == 0


def test_python_dash_m_exit_code_on_a_broken_config(tmp_path: Path) -> None:
    """``python -m wstunnel`` really exits 2 with one message and no traceback."""
    path = tmp_path / "relay.yaml"
    path.write_text("listen: 127.0.0.1:1\nallow: [10.0.0.1/8]\n")
    proc = subprocess.run([sys.executable, "-m", "wstunnel", "check", "-c", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{path}:2: allow[0]:" in proc.stderr


# ------------------------------------------------------- building configs

def test_relay_from_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """relay --listen/--allow/--path build the config without a file."""
    seen = fake_role(monkeypatch, "relay")
    argv = ["relay", "--listen", "127.0.0.1:0", "--allow", "127.0.0.1:22",
            "--allow", "*.corp.example", "--path", "/t", "--no-auth"]
    assert main(argv) == 0
    (config,) = seen
    assert (str(config.listen), config.path) == ("127.0.0.1:0", "/t")
    assert [str(rule) for rule in config.allow] == ["127.0.0.1/32:22", "*.corp.example"]


def test_flags_override_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags given with -c replace the file's values; the rest comes from the file."""
    seen = fake_role(monkeypatch, "relay")
    argv = ["relay", "-c", str(CONFIGS / "relay.yaml"), "--listen", "127.0.0.1:0",
            "--path", "/tunnel", "--log-level", "warning"]
    assert main(argv) == 0
    (config,) = seen
    assert str(config.listen) == "127.0.0.1:0" and config.path == "/tunnel"
    assert config.log_level == "warning" and [a.name for a in config.agents] == ["example"]
    assert config.log_level == "warning"


def test_agent_from_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """agent --relay and repeated -L build the forwards in order."""
    seen = fake_role(monkeypatch, "agent")
    argv = ["agent", "--relay", "ws://127.0.0.1:8080/tunnel",
            "-L", "127.0.0.1:0:db.internal:5432", "-L", "0:intranet:80"]
    assert main(argv) == 0
    (config,) = seen
    assert [str(f) for f in config.forwards] == ["127.0.0.1:0 -> db.internal:5432",
                                                 "127.0.0.1:0 -> intranet:80"]


def test_agent_file_with_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """agent -c FILE -L ... replaces the file's forwards and keeps its relay."""
    seen = fake_role(monkeypatch, "agent")
    assert main(["agent", "-c", str(CONFIGS / "agent.yaml"), "-L", "0:db:1"]) == 0
    (config,) = seen
    assert config.relay == "ws://127.0.0.1:18080/tunnel"
    assert [str(f) for f in config.forwards] == ["127.0.0.1:0 -> db:1"]


@pytest.mark.parametrize(("argv", "fragment"), [
    (["relay"], "give --listen"),
    (["relay", "--listen", "localhost"], "--listen: expected a port number"),
    (["relay", "--listen", "127.0.0.1:1", "--allow", "*"], "--allow:"),
    (["relay", "--listen", "127.0.0.1:1", "--path", "x"], "--path: expected a URL path"),
    (["agent", "-L", "1:db:2"], "give --relay"),
    (["agent", "--relay", "ws://r/t"], "give at least one -L"),
    (["agent", "--relay", "ftp://r/t", "-L", "1:db:2"], "--relay: expected a ws://"),
    (["agent", "--relay", "ws://r/t", "-L", "1:db"], "-L: expected [bind:]port:host:port"),
])
def test_bad_flags_exit_2(argv: list[str], fragment: str, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """Missing or invalid role flags are config errors naming the flag; nothing runs."""
    seen = fake_role(monkeypatch, argv[0])
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err and seen == []


def test_two_forwards_on_one_address_are_refused_from_flags_and_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two forwards listening on one address: exit 2 naming both, whether they were
    given as -L flags or in a file; nothing runs (one would silently shadow the other)."""
    seen = fake_role(monkeypatch, "agent")
    relay = "ws://127.0.0.1:1/tunnel"
    assert main(["agent", "--relay", relay, "-L", "9000:a.example:1",
                 "-L", "9000:b.example:2"]) == 2
    assert capsys.readouterr().err == ("wstunnel: error: -L: listen address 127.0.0.1:9000 "
                                       "is already used by -L 9000:a.example:1\n")
    path = tmp_path / "agent.yaml"
    path.write_text(f"relay: {relay}\nforwards:\n  - 9000:a.example:1\n  - 9000:b.example:2\n")
    assert main(["agent", "-c", str(path)]) == 2
    assert capsys.readouterr().err == (f"wstunnel: error: {path}:4: forwards[1]: listen "
                                       "address 127.0.0.1:9000 is already used by "
                                       "forwards[0]\n")
    assert seen == []


def test_listen_given_twice_is_an_error_not_the_last_one_silently(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The relay serves one address: a second --listen is refused, saying what to give."""
    seen = fake_role(monkeypatch, "relay")
    assert main(["relay", "--no-auth", "--listen", "127.0.0.1:8080", "--listen",
                 "[::1]:8080"]) == 2
    assert seen == []
    assert ("--listen given twice (127.0.0.1:8080 and [::1]:8080): the relay serves one "
            "address; [::]:PORT") in capsys.readouterr().err


# ---------------------------------------------------- running and failing

def test_listen_port_in_use_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """EADDRINUSE from the role becomes one actionable log line and exit code 1."""
    async def fail(config: Any, shutdown: Any) -> None:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    fake_role(monkeypatch, "relay", fail)
    assert main(["relay", "--listen", "127.0.0.1:8080"]) == 1
    err = capsys.readouterr().err
    assert ("cannot listen on 127.0.0.1:8080: address already in use \N{EM DASH} "
            "pick another --listen port") in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_expected_tunnel_errors_have_no_traceback(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A TunnelError from the role is logged as its message, exit 1, no traceback."""
    async def fail(config: Any, shutdown: Any) -> None:
        raise HandshakeError("the relay answered 403 Forbidden", status=403)

    fake_role(monkeypatch, "agent", fail)
    assert main(["agent", "--relay", "ws://r/t", "-L", "0:db:1"]) == 1
    err = capsys.readouterr().err
    assert "the relay answered 403 Forbidden" in err and "Traceback" not in err


def test_bugs_get_a_traceback(monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """An unexpected exception is a bug: logged with its traceback, exit 1."""
    async def fail(config: Any, shutdown: Any) -> None:
        raise ZeroDivisionError("oops")

    fake_role(monkeypatch, "agent", fail)
    assert main(["agent", "--relay", "ws://r/t", "-L", "0:db:1"]) == 1
    err = capsys.readouterr().err
    assert "a bug" in err and "Traceback" in err and "ZeroDivisionError" in err


def test_sigterm_drains_and_exits_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first SIGTERM sets the shutdown event; a role that then returns exits 0."""
    async def wait_for_signal(config: Any, shutdown: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await shutdown.wait()

    fake_role(monkeypatch, "relay", wait_for_signal)
    assert main(["relay", "--listen", "127.0.0.1:0", "--allow", "10.0.0.0/8", "--no-auth"]) == 0


def test_second_signal_exits_1_at_once(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A second SIGINT/SIGTERM while draining aborts with exit code 1."""
    async def hang(config: Any, shutdown: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await shutdown.wait()
        os.kill(os.getpid(), signal.SIGINT)
        await type(shutdown)().wait()  # a fresh event nobody sets: drain "forever"

    fake_role(monkeypatch, "agent", hang)
    assert main(["agent", "--relay", "ws://r/t", "-L", "0:db:1"]) == 1
    assert "second signal" in capsys.readouterr().err


def test_demo_passes_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """demo --size reaches run_demo in bytes, and its int result is the exit code."""
    calls: list[dict[str, Any]] = []

    async def run_demo(size: int = 1) -> int:
        calls.append({"size": size})
        return 3

    module = types.ModuleType("wstunnel.cli.demo")
    module.run_demo = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wstunnel.cli.demo", module)
    assert main(["demo", "--size", "2MiB"]) == 3
    assert calls == [{"size": 2 * 1024 * 1024}]


# ------------------------------------------------------------------ logs

def test_json_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """--log-format json: one object per line with ts, level, logger, msg and extras."""
    setup_logging("debug", "json")
    logging.getLogger("wstunnel.test").info("session up %s", "now", extra={"peer": "1.2.3.4"})
    record = json.loads(capsys.readouterr().err)
    assert record["level"] == "info" and record["logger"] == "wstunnel.test"
    assert record["msg"] == "session up now" and record["peer"] == "1.2.3.4"
    assert record["ts"].endswith("Z")


def test_text_log_lines_and_levels(capsys: pytest.CaptureFixture[str]) -> None:
    """Text lines are single lines with key=value extras; lower levels are filtered."""
    setup_logging("warning", "text")
    log = logging.getLogger("wstunnel.test")
    log.info("hidden")
    log.warning("channel refused", extra={"target": "db:5432", "why": "not allowed"})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hidden" not in err
    assert 'WARNING wstunnel.test: channel refused target=db:5432 why="not allowed"' in err
