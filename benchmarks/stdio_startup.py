"""Startup of ``wstunnel agent --stdio``: process start to the first byte back.

What ``ssh -o ProxyCommand='wstunnel agent ... --stdio %h:%p'`` waits for
before its handshake can even begin: the interpreter, our imports, the
WebSocket connection to the relay and the channel's OPEN. Each run starts the
agent against a running relay (a child process) and an echo target (a thread
here), writes one byte at once and times until it comes back; the figure is
the median of ``--runs`` (default 10). Beside it, the agent's CPU time to that
byte (``/proc/PID/schedstat``) and to its exit, which other jobs on a shared
machine move less than the wall clock. ``python -X importtime -m wstunnel
agent --relay ws://127.0.0.1:1/tunnel --no-proxy --stdio 127.0.0.1:1 </dev/null``
shows where the import part goes.

What a user starts is an installed wstunnel: ``--installed SOURCE`` builds a
wheel of the source tree SOURCE (``.``: this checkout), installs it in a
temporary venv and runs that venv's ``wstunnel`` script. The default, this
venv's ``python -m wstunnel``, runs the editable checkout, whose import hook
(``__editable___wstunnel_*_finder``, loaded by ``site``) no installed copy
pays. The fresh venv gets the wheel alone; its dependencies are this venv's,
named by a .pth line (as tests/packaging does), which adds their folder
without running its .pth files, so the editable hook stays out.

The children cache their bytecode, as an installed wstunnel does (pip compiles
it): where ``PYTHONDONTWRITEBYTECODE`` is set (a shared checkout), they write
it under a temporary ``PYTHONPYCACHEPREFIX`` instead, filled by the first,
untimed run; compiling every module at each start would add ~80 ms that no
user pays.

To compare commits, give several ``--wstunnel`` commands or ``--installed``
trees (e.g. one unpacked with ``git archive``): the runs take turns, one of
each in every round, so load from other jobs falls on all of them alike.

    python benchmarks/stdio_startup.py [--runs 10] [--wstunnel "python -m wstunnel"]...
                                       [--installed SOURCE]...
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import socket
import socketserver
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _children import LOOPBACK, PYTHON_M_WSTUNNEL, relay_argv  # noqa: E402

STARTUP_TIMEOUT = 20.0
#: What a wheel is not built from: the checkout's build leftovers and in-place C module.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                    "*.so", ".*_cache", ".hypothesis", "reports", "*.whl")


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """An echo server on LOOPBACK in a thread; yields its port."""
    server = socketserver.ThreadingTCPServer((LOOPBACK, 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def bytecode_cached() -> Iterator[dict[str, str]]:
    """The children's environment: bytecode cached, in a temporary prefix if this
    environment forbids writing it next to the sources."""
    env = dict(os.environ)
    if not env.pop("PYTHONDONTWRITEBYTECODE", None):
        yield env
        return
    with tempfile.TemporaryDirectory(prefix="stdio-startup-pyc-") as prefix:
        env["PYTHONPYCACHEPREFIX"] = prefix
        yield env


def _run_quietly(argv: Sequence[str | Path], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                            env=env | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(map(str, argv))} failed:\n{result.stderr}")
    return result.stdout


def installed(source: Path, work: Path) -> list[str]:
    """Build a wheel of the tree ``source`` in ``work``, install it in a fresh venv there
    (its dependencies this venv's, see the top), and return its ``wstunnel`` script."""
    tree, wheels, home = work / "src", work / "wheels", work / "venv"
    shutil.copytree(source, tree, ignore=NOT_COPIED)
    _run_quietly([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                  "--no-build-isolation", "--wheel-dir", wheels, tree], cwd=work)
    (wheel,) = wheels.glob("wstunnel-*.whl")
    _run_quietly([sys.executable, "-m", "venv", "--without-pip", home], cwd=work)
    python = home / "bin" / "python"
    _run_quietly([sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
                  "--no-deps", "--no-index", wheel], cwd=work)
    site = Path(_run_quietly([python, "-c", "import sysconfig; print(sysconfig.get_path("
                              "'purelib'))"], cwd=work).strip())
    ours = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    (site / "_borrowed_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    return [str(home / "bin" / "wstunnel")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def relay(command: Sequence[str], env: dict[str, str]) -> Iterator[int]:
    """A relay child on a free loopback port; yields the port once it accepts."""
    port = _free_port()
    proc = subprocess.Popen([*command, *relay_argv(port)], stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the relay did not start on {LOOPBACK}:{port}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1):
                break
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


class Run(NamedTuple):
    """One run's figures, in seconds. The CPU times (the agent's, user + system) are
    moved less than the wall clock by other jobs on a shared machine."""

    first_byte: float  # wall clock, process start to the echoed byte
    cpu_to_first_byte: float | None  # None: no /proc/PID/schedstat here
    cpu_to_exit: float


def _cpu_so_far(pid: int) -> float | None:
    """CPU time of ``pid``'s main thread so far (ns resolution; ``--stdio`` starts no
    other thread), or None where the kernel does not say."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def one_run(command: Sequence[str], relay_port: int, echo_port: int,
            env: dict[str, str]) -> Run:
    """One ``--stdio`` agent: write a byte, time it back, close stdin; checks a clean exit."""
    argv = [*command, "agent", "--relay", f"ws://{LOOPBACK}:{relay_port}/tunnel",
            "--no-proxy", "--stdio", f"{LOOPBACK}:{echo_port}"]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"x")
    proc.stdin.flush()
    got = proc.stdout.read(1)
    elapsed = time.perf_counter() - started
    cpu_to_first_byte = _cpu_so_far(proc.pid)
    proc.stdin.close()
    rest = proc.stdout.read()
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # (stdout is closed: it has exited)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if got != b"x" or rest or proc.returncode != 0:
        raise SystemExit(f"bad run: got {got!r}{rest!r}, exit {proc.returncode}: "
                         f"{err.decode(errors='replace')}")
    return Run(elapsed, cpu_to_first_byte, usage.ru_utime + usage.ru_stime)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each command")
    parser.add_argument("--wstunnel", action="append", default=[], metavar="COMMAND",
                        help="command that runs wstunnel (repeatable; default, when neither "
                             "this nor --installed is given: this python -m wstunnel)")
    parser.add_argument("--installed", action="append", default=[], type=Path,
                        metavar="SOURCE", help="run the wstunnel script of a wheel built "
                        "from the tree SOURCE, installed in a temporary venv (repeatable)")
    args = parser.parse_args(argv)
    labels = list(args.wstunnel) + [f"installed {source}" for source in args.installed]
    if not labels:
        labels = [shlex.join(PYTHON_M_WSTUNNEL)]
    with contextlib.ExitStack() as stack:
        commands = [shlex.split(command) for command in args.wstunnel] or (
            [] if args.installed else [list(PYTHON_M_WSTUNNEL)])
        for source in args.installed:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stdio-wheel-")))
            commands.append(installed(source.resolve(), work))
        env = stack.enter_context(bytecode_cached())
        echo_port = stack.enter_context(echo_server())
        relay_port = stack.enter_context(relay(commands[0], env))
        runs: list[list[Run]] = [[] for _ in commands]
        for round_ in range(args.runs + 1):  # round 0: page cache, bytecode; not timed
            for command, figures in zip(commands, runs, strict=True):
                run = one_run(command, relay_port, echo_port, env)
                if round_:
                    figures.append(run)
    print(f"stdio startup, {args.runs} runs each, taking turns: median (min-max), ms")
    for label, figures in zip(labels, runs, strict=True):
        print(f"to first byte {_summary([r.first_byte for r in figures])}, CPU to first byte "
              f"{_summary([r.cpu_to_first_byte for r in figures])}, CPU to exit "
              f"{_summary([r.cpu_to_exit for r in figures])}: {label}")
    return 0


def _summary(seconds: Sequence[float | None]) -> str:
    ms = sorted(s * 1000 for s in seconds if s is not None)
    if not ms:
        return "n/a"
    return f"{statistics.median(ms):.0f} ({ms[0]:.0f}-{ms[-1]:.0f})"


if __name__ == "__main__":
    sys.exit(main())
