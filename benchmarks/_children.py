"""wstunnel as a child process: the command lines of a loopback relay and agent.

One place for both users, so that a flag that changes is changed once: the
benchmarks (``_procs.py``, started with ``subprocess``) and the integration
tests (``tests/integration/process_helpers.py``, started from trio, imported
as ``benchmarks._children``). Standard library only and no imports from the
other benchmark modules: benchmarks run without pytest, and the tests must
not need the benchmarks' extra programs (sshd, socat).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Final

LOOPBACK: Final = "127.0.0.1"
#: This interpreter running the wstunnel CLI (the benchmarks' default ``--wstunnel``).
PYTHON_M_WSTUNNEL: Final = (sys.executable, "-m", "wstunnel")


def relay_argv(port: int, *extra: str) -> list[str]:
    """``relay`` on LOOPBACK:``port`` (0: the kernel picks), without logins, that lets
    agents reach LOOPBACK and nothing else; ``extra`` arguments go last."""
    return ["relay", "--listen", f"{LOOPBACK}:{port}", "--allow", LOOPBACK, "--no-auth", *extra]


def agent_argv(relay_port: int, forwards: Iterable[tuple[int, int]], *extra: str,
               scheme: str = "ws") -> list[str]:
    """``agent`` to the relay on LOOPBACK:``relay_port``, straight (a proxy set in the
    environment is ignored), forwarding each ``(local port, target port)`` pair on
    LOOPBACK (local port 0: the kernel picks); ``extra`` arguments go last."""
    argv = ["agent", "--relay", f"{scheme}://{LOOPBACK}:{relay_port}/tunnel", "--no-proxy"]
    for local, target in forwards:
        argv += ["-L", f"{LOOPBACK}:{local}:{LOOPBACK}:{target}"]
    return [*argv, *extra]
