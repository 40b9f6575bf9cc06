"""Run Autobahn|Testsuite against wstunnel.ws in both roles and judge the verdicts.

Theory of operation: Autobahn only runs on Python 2.7, so this script keeps a
Python 2.7 virtualenv with ``autobahntestsuite`` in a per-machine cache (made
once with pyenv, reused after; a lock keeps two runs from building it at
once). Then:

1. ``fuzzingclient`` (Autobahn as client) against ``echo_server.py``, one
   wstest run per case group, each under ``timeout``: a killed wstest writes
   no report, so a hang costs one group, not the whole run.
2. ``fuzzingserver`` (Autobahn as server) with ``client.py`` driving it.

Each mode's ``index.json`` is read back; verdict counts and every FAILED case
are printed. Exit 1 if any case FAILED or a group left no report; exit 0 with
``skipped: <reason>`` when Python 2.7 or the install is not available.

    .venv/bin/python tests/conformance/run.py [--groups 1 2 9]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[2]
HERE: Final = Path(__file__).resolve().parent
REPORTS: Final = ROOT / "reports" / "autobahn"
CACHE: Final = Path(os.environ.get("WSTUNNEL_AUTOBAHN_CACHE",
                                   "~/.cache/wstunnel-autobahn")).expanduser()
AUTOBAHN_VERSION: Final = "25.10.1"
PY27: Final = "2.7.18"
AGENT: Final = "wstunnel"
GROUPS: Final = ("1", "2", "3", "4", "5", "6", "7", "9", "10")
#: Per-group wall-clock limit; group 9 moves 16 MiB messages.
GROUP_TIMEOUTS: Final = {"9": 120}
DEFAULT_GROUP_TIMEOUT: Final = 60
SERVER_MODE_TIMEOUT: Final = 180
VERDICTS: Final = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")


class Skip(Exception):
    """Autobahn cannot run on this machine; the reason is printed."""


# -- installing Autobahn -------------------------------------------------------------

def _pyenv() -> str:
    found = shutil.which("pyenv") or str(Path("~/.pyenv/bin/pyenv").expanduser())
    if not os.access(found, os.X_OK):
        raise Skip("pyenv not found")
    probe = subprocess.run([found, "prefix", PY27], capture_output=True, text=True)
    if probe.returncode != 0:
        raise Skip(f"pyenv has no Python {PY27}")
    return found


def _install_step(cmd: list[str], env: dict[str, str], log: Any) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    try:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise Skip(f"autobahn install timed out: {' '.join(cmd)}") from exc
    if done.returncode != 0:
        raise Skip(f"autobahn install failed (see {log.name})")


def _build_venv(venv: Path) -> None:
    pyenv = _pyenv()
    env = dict(os.environ, PYENV_VERSION=PY27, PYTHONUSERBASE=str(CACHE / "userbase"))
    shutil.rmtree(venv, ignore_errors=True)
    print(f"installing autobahntestsuite {AUTOBAHN_VERSION} into {venv} ...", flush=True)
    with open(CACHE / "install.log", "w") as log:
        py = [pyenv, "exec", "python", "-m"]
        _install_step([*py, "pip", "install", "--user", "-q", "virtualenv<20.22"], env, log)
        _install_step([*py, "virtualenv", "-q", str(venv)], env, log)
        _install_step([str(venv / "bin" / "pip"), "install", "-q",
                       f"autobahntestsuite=={AUTOBAHN_VERSION}"], env, log)


def ensure_autobahn() -> Path:
    """Return the cached ``wstest``, building the virtualenv on first use."""
    CACHE.mkdir(parents=True, exist_ok=True)
    venv = CACHE / "venv"
    wstest = venv / "bin" / "wstest"
    marker = venv / f".installed-{AUTOBAHN_VERSION}"
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            _build_venv(venv)
            marker.touch()
    if not os.access(wstest, os.X_OK):
        raise Skip(f"{wstest} missing after install")
    return wstest


# -- processes ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[Any], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def echo_server(log_path: Path) -> Iterator[int]:
    """Run ``echo_server.py`` on a free port; yield the port; stop it after."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(HERE / "echo_server.py"), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("listening on "):
                raise RuntimeError(f"echo server did not start (see {log_path})")
            yield int(line.split()[-1])
        finally:
            _stop(proc)


def _write_spec(path: Path, spec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2))


# -- the two modes ------------------------------------------------------------------

def run_fuzzingclient(wstest: Path, groups: list[str], out: Path) -> dict[str, Any]:
    """Autobahn as client against our echo server; return merged results."""
    results: dict[str, Any] = {}
    out.mkdir(parents=True, exist_ok=True)
    with echo_server(out / "echo_server.log") as port:
        for group in groups:
            gdir = out / f"group-{group}"
            shutil.rmtree(gdir, ignore_errors=True)
            spec = {"outdir": str(gdir), "cases": [f"{group}.*"], "exclude-cases": [],
                    "exclude-agent-cases": {},
                    "servers": [{"agent": AGENT, "url": f"ws://127.0.0.1:{port}"}]}
            _write_spec(gdir / "spec.json", spec)
            limit = GROUP_TIMEOUTS.get(group, DEFAULT_GROUP_TIMEOUT)
            started = time.monotonic()
            with open(gdir / "wstest.log", "w") as log:
                done = subprocess.run(["timeout", "-k", "5", str(limit), str(wstest), "-m",
                                       "fuzzingclient", "-s", "spec.json"],
                                      cwd=gdir, stdout=log, stderr=subprocess.STDOUT)
            note = f" (killed after {limit} s)" if done.returncode in (124, 137) else ""
            print(f"  fuzzingclient group {group}: {time.monotonic() - started:.1f} s{note}",
                  flush=True)
            results[group] = _read_index(gdir)
    return results


def run_fuzzingserver(wstest: Path, groups: list[str], out: Path) -> dict[str, Any]:
    """Autobahn as server, our client driving it; return results by group."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = _free_port()
    spec = {"url": f"ws://127.0.0.1:{port}", "outdir": str(out / "reports"),
            "cases": [f"{g}.*" for g in groups], "exclude-cases": [], "exclude-agent-cases": {}}
    _write_spec(out / "spec.json", spec)
    with open(out / "wstest.log", "w") as log:
        server = subprocess.Popen([str(wstest), "-m", "fuzzingserver", "-s", "spec.json",
                                   "--webport", "0"],
                                  cwd=out, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_listening(port, server, time.monotonic() + 30)
            started = time.monotonic()
            with open(out / "client.log", "w") as clog:
                done = subprocess.run(["timeout", "-k", "5", str(SERVER_MODE_TIMEOUT),
                                       sys.executable, str(HERE / "client.py"),
                                       "--url", f"ws://127.0.0.1:{port}", "--agent", AGENT],
                                      stdout=clog, stderr=subprocess.STDOUT)
            note = f" (client exited {done.returncode}, see client.log)" if done.returncode else ""
            print(f"  fuzzingserver: {time.monotonic() - started:.1f} s{note}", flush=True)
        finally:
            _stop(server)
    return _split_by_group(_read_index(out / "reports"), groups)


def _split_by_group(index: dict[str, Any] | None, groups: list[str]) -> dict[str, Any]:
    """One report covers all groups: split it so a missing group shows up."""
    if index is None:
        return dict.fromkeys(groups)
    return {group: {case: verdict for case, verdict in index.items()
                    if case.split(".")[0] == group} or None
            for group in groups}


def _read_index(outdir: Path) -> dict[str, Any] | None:
    """Return ``{case_id: result}`` for our agent, or None if no report."""
    try:
        index = json.loads((outdir / "index.json").read_text())
    except (OSError, ValueError):
        return None
    result = index.get(AGENT)
    return result if isinstance(result, dict) else None


# -- judging ------------------------------------------------------------------------

def _case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


def judge(mode: str, results: dict[str, Any], outdir: Path) -> int:
    """Print verdict counts and failures for one mode; return the failure count."""
    counts: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    lenient: list[str] = []
    for group, cases in results.items():
        if not cases:
            failures.append(f"group {group}: no report (timed out or crashed)")
            continue
        for case_id in sorted(cases, key=_case_key):
            verdict = cases[case_id]
            behavior = verdict.get("behavior", "?")
            close = verdict.get("behaviorClose", "?")
            counts[behavior] += 1
            if behavior in ("NON-STRICT", "INFORMATIONAL"):
                lenient.append(case_id)
            if behavior == "FAILED" or close == "FAILED":
                failures.append(f"{case_id}: behavior={behavior} close={close}"
                                f" ({_result_text(verdict, outdir)})")
    shown = " ".join(f"{v}={counts.get(v, 0)}" for v in VERDICTS)
    extra = " ".join(f"{k}={n}" for k, n in counts.items() if k not in VERDICTS)
    print(f"{mode}: {shown} {extra}".rstrip())
    if lenient:
        print(f"  non-strict/informational: {' '.join(lenient)}")
    for line in failures:
        print(f"  FAILED {line}")
    return len(failures)


def _result_text(verdict: dict[str, Any], outdir: Path) -> str:
    """The case report's one-line ``result`` text, if it can be found."""
    name = verdict.get("reportfile")
    if not isinstance(name, str):
        return "no report file"
    for path in outdir.rglob(name):
        with contextlib.suppress(OSError, ValueError):
            return str(json.loads(path.read_text()).get("result", ""))[:200]
    return "report file missing"


def main(argv: list[str] | None = None) -> int:
    """Install (once), run both modes, print verdicts; 1 if anything FAILED."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="*", default=list(GROUPS))
    parser.add_argument("--mode", choices=("both", "client", "server"), default="both")
    args = parser.parse_args(argv)
    try:
        wstest = ensure_autobahn()
    except Skip as exc:
        print(f"skipped: {exc}")
        return 0
    failed = 0
    if args.mode in ("both", "client"):
        out = REPORTS / "fuzzingclient"
        failed += judge("fuzzingclient (our echo server)",
                        run_fuzzingclient(wstest, args.groups, out), out)
    if args.mode in ("both", "server"):
        out = REPORTS / "fuzzingserver"
        failed += judge("fuzzingserver (our client)",
                        run_fuzzingserver(wstest, args.groups, out), out)
    print(f"autobahn: {'FAILED' if failed else 'passed'} (reports in {REPORTS})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
