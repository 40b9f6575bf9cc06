"""The real programs as child processes: started, their log collected, stopped.

Their command lines come from ``benchmarks/_children.py``, shared with the
benchmarks so that both start wstunnel the same way.

Why collect the log all the time: a child that logs into a pipe nobody reads
blocks once the pipe is full (64 KiB), and a relay that stops logging mid-test
looks like a relay that hangs.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from benchmarks._children import PYTHON_M_WSTUNNEL, agent_argv, relay_argv

ROOT = Path(__file__).resolve().parents[2]


class Program:
    """A running ``wstunnel`` child and everything it has logged so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.log = bytearray()
        self.log_closed = False
        self._grew = trio.Event()

    async def collect_log(self) -> None:
        """Read stderr until the child closes it (see the module docstring)."""
        assert self.process.stderr is not None
        async for data in self.process.stderr:
            self.log.extend(data)
            self._wake()
        self.log_closed = True
        self._wake()

    def _wake(self) -> None:
        self._grew.set()
        self._grew = trio.Event()

    async def wait_for(self, pattern: bytes) -> re.Match[bytes]:
        """The first match of the regex ``pattern`` in the log, once it is there."""
        while (match := re.search(pattern, self.log)) is None:
            assert not self.log_closed, f"exited before logging {pattern!r}:\n{self.text()}"
            await self._grew.wait()
        return match

    def kill(self) -> None:
        """SIGKILL: the process vanishes; the kernel closes its sockets."""
        self.process.kill()

    def text(self, lines: int = 30) -> str:
        """The last ``lines`` of the log, for an assertion message."""
        return "\n".join(self.log.decode(errors="replace").splitlines()[-lines:])


@asynccontextmanager
async def wstunnel(*args: str) -> AsyncIterator[Program]:
    """``python -m wstunnel ARGS``, killed (if still running) on the way out."""
    process = await trio.lowlevel.open_process(
        [*PYTHON_M_WSTUNNEL, *args], stderr=subprocess.PIPE, cwd=ROOT)
    program = Program(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(program.collect_log)
            yield program
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await stop(process)


async def stop(process: trio.Process) -> None:
    """Kill ``process`` if it still runs, reap it and close its pipes."""
    if process.returncode is None:
        process.kill()
    await process.wait()
    if process.stderr is not None:
        await process.stderr.aclose()


@asynccontextmanager
async def relay_process(*extra: str) -> AsyncIterator[tuple[Program, int]]:
    """A ``wstunnel relay`` on a free loopback port that lets agents reach loopback."""
    async with wstunnel(*relay_argv(0, *extra)) as relay:
        with trio.fail_after(15):
            match = await relay.wait_for(rb"relay listening on 127\.0\.0\.1:(\d+)")
        yield relay, int(match[1])


@asynccontextmanager
async def agent_process(relay_port: int, target: int) -> AsyncIterator[tuple[Program, int]]:
    """A ``wstunnel agent`` forwarding a free loopback port to ``target`` via the
    relay on ``relay_port``; yields once its session is up."""
    async with wstunnel(*agent_argv(relay_port, [(0, target)])) as agent:
        with trio.fail_after(15):
            match = await agent.wait_for(rb"forwarding 127\.0\.0\.1:(\d+) -> ")
            await agent.wait_for(rb"session up")
        yield agent, int(match[1])
