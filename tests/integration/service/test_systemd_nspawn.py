"""The relay unit under real systemd (PID 1 in systemd-nspawn): it becomes active
after READY=1 and is restarted after kill -9 and after a watchdog timeout.

Runs only where the machine allows it: as root, with systemd-nspawn, and with a
Debian root built by ``.ci/build-nspawn-root`` (about 90 s, once; ``.ci/run``
builds it). Otherwise it is skipped with the reason. The container gets a
private network; the worktree's ``wstunnel`` package is bind-mounted read-only,
so the code under test is the code in this checkout. About 15 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

REPO = Path(__file__).resolve().parents[3]
NSPAWN_ROOT = Path(os.environ.get("WSTUNNEL_NSPAWN_ROOT",
                                  "~/.cache/wstunnel-nspawn/root")).expanduser()
UNIT = "wstunnel-relay.service"
WATCHDOG_SEC = 2
LAUNCHER = """#!/usr/bin/python3
import sys
sys.path[:0] = ["/opt/wstunnel/lib", "/opt/deps"]
from wstunnel.cli import main_entry
main_entry()
"""


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install systemd-container util-linux)"
    if not (NSPAWN_ROOT / ".wstunnel-ready").exists():
        return f"no container root at {NSPAWN_ROOT}: build it with .ci/build-nspawn-root (~90 s)"
    return None


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


def _prepare_root(root: Path) -> None:
    """The launcher at the unit's ExecStart path, a config, a credentials directory,
    the unit as shipped plus a short-watchdog drop-in, enabled."""
    launcher = root / "opt/wstunnel/bin/wstunnel"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)
    (root / "opt/wstunnel/lib/wstunnel").mkdir(parents=True, exist_ok=True)
    (root / "etc/wstunnel/credentials/relay").mkdir(parents=True, exist_ok=True)
    (root / "etc/wstunnel/credentials/relay/token").write_text("not used yet\n")
    (root / "etc/wstunnel/relay.yaml").write_text("listen: 127.0.0.1:18080\n")
    units = root / "etc/systemd/system"
    shutil.copy(REPO / "systemd" / UNIT, units / UNIT)
    dropin = units / f"{UNIT}.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "test.conf").write_text(f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\nRestartSec=0.5s\n")
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    link = wants / UNIT
    if not link.is_symlink():
        link.symlink_to(f"/etc/systemd/system/{UNIT}")


@pytest.fixture
def container() -> Iterator[Callable[..., str]]:
    """Boot the root; yield ``run(*args)`` running a command inside it."""
    _prepare_root(NSPAWN_ROOT)
    Path("/run/systemd/nspawn").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as log:
        yield from _boot(log)


def _boot(log: IO[bytes]) -> Iterator[Callable[..., str]]:
    # /run is not a tmpfs here and there is no host D-Bus: hence the private tmpfs,
    # --register=no and --keep-unit.
    nspawn = subprocess.Popen(
        ["unshare", "-m", "sh", "-c",
         'mount -t tmpfs tmpfs /run/systemd/nspawn && exec systemd-nspawn "$@"', "nspawn",
         "-D", str(NSPAWN_ROOT), "-b", "--register=no", "--keep-unit", "--console=pipe",
         "--private-network", f"--bind-ro={REPO / 'wstunnel'}:/opt/wstunnel/lib/wstunnel"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def booted() -> str | None:
            if nspawn.poll() is not None:  # e.g. another suite's container holds the root
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
                raise AssertionError(f"systemd-nspawn exited {nspawn.returncode}: "
                                     + " | ".join(tail))
            return _child_named(nspawn.pid, "systemd")

        init = _wait(booted, 20, "systemd to boot")

        def run(*args: str, check: bool = True) -> str:
            result = subprocess.run(["nsenter", "-t", init, "-a", *args], capture_output=True,
                                    text=True, timeout=20)
            if check:
                assert result.returncode == 0, result.stderr
            return result.stdout

        yield run
    finally:
        nspawn.send_signal(signal.SIGTERM)
        try:
            nspawn.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(nspawn.pid, signal.SIGKILL)
            nspawn.wait()


def _child_named(parent: int, name: str) -> str | None:
    result = subprocess.run(["pgrep", "-P", str(parent), "-x", name], capture_output=True,
                            text=True)
    return result.stdout.split()[0] if result.stdout.split() else None


def _wait(probe: Callable[[], str | None], timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _state(run: Callable[..., str]) -> dict[str, str]:
    out = run("systemctl", "show", UNIT, "-p", "ActiveState", "-p", "SubState", "-p",
              "NRestarts", "-p", "MainPID", "-p", "StatusText", check=False)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _wait_running(run: Callable[..., str], restarts: int, timeout: float) -> dict[str, str]:
    def probe() -> str | None:
        state = _state(run)
        ok = (state.get("ActiveState") == "active" and state.get("NRestarts") == str(restarts)
              and state.get("StatusText", "").startswith("listening on"))
        return state["MainPID"] if ok else None

    _wait(probe, timeout, f"{UNIT} active with {restarts} restarts")
    return _state(run)


def test_relay_unit_ready_restarted_after_kill_9_and_watchdog(
        container: Callable[..., str]) -> None:
    """Type=notify: active (with our STATUS=) only after READY=1; SIGKILL and a hung
    loop (SIGSTOP, so no WATCHDOG=1) each lead to a restart; reload keeps the pid."""
    run = container
    first = _wait_running(run, 0, 30)
    run("systemctl", "kill", "--kill-whom=main", "-s", "KILL", UNIT)
    second = _wait_running(run, 1, 15)
    assert second["MainPID"] != first["MainPID"]
    run("systemctl", "kill", "--kill-whom=main", "-s", "STOP", UNIT)
    third = _wait_running(run, 2, WATCHDOG_SEC + 15)
    assert third["MainPID"] != second["MainPID"]
    journal = run("journalctl", "-u", UNIT, "--no-pager")
    assert "Failed with result 'signal'" in journal
    assert "Failed with result 'watchdog'" in journal
    run("systemctl", "reload", UNIT)  # ExecReload: SIGHUP, RELOADING=1 ... READY=1
    assert _wait_running(run, 2, 10)["MainPID"] == third["MainPID"]
