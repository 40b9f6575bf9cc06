"""The relay lifts its open-files soft limit at start and says when it caps channels."""

from __future__ import annotations

import re
import resource
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from benchmarks._children import PYTHON_M_WSTUNNEL, relay_argv

from ..process_helpers import ROOT, Program, stop


def _limits(soft: int, hard: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@asynccontextmanager
async def _relay(soft: int, hard: int) -> AsyncIterator[Program]:
    """A relay started with RLIMIT_NOFILE (soft, hard), once it listens."""
    process = await trio.lowlevel.open_process(
        [*PYTHON_M_WSTUNNEL, *relay_argv(0)], stderr=subprocess.PIPE, cwd=ROOT,
        preexec_fn=_limits(soft, hard))
    program = Program(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(program.collect_log)
            with trio.fail_after(15):
                await program.wait_for(rb"relay listening on")
            yield program
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await stop(process)


def _soft_limit(pid: int) -> int:
    text = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"Max open files\s+(\d+)", text)
    assert match, text
    return int(match[1])


async def test_the_soft_limit_is_raised_to_the_hard_one_and_a_low_hard_limit_is_named() -> None:
    """Started with a soft limit of 256 and a hard one of 2000 (below max_channels), the
    relay runs with 2000 and logs that it caps channels, and what to do about it."""
    async with _relay(256, 2000) as relay:
        assert _soft_limit(relay.process.pid) == 2000
        await relay.wait_for(rb"open-files limit \(2000, hard 2000\) caps this relay at about "
                             rb"1936 channels .* below the 10240 .*ulimit -n")


async def test_a_hard_limit_that_covers_max_channels_brings_no_warning() -> None:
    """With a hard limit above max_channels the soft one is raised silently."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 10_240 + 64:
        pytest.skip(f"the hard open-files limit here is {hard}")
    async with _relay(256, hard) as relay:
        assert _soft_limit(relay.process.pid) >= 10_240 + 64
        assert b"open-files" not in relay.log, relay.text()
