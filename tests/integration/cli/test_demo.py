"""`wstunnel demo`, the README's first command, really carries traffic."""

from __future__ import annotations

import io

import trio

from wstunnel.cli.demo import run_demo


async def test_demo_moves_bytes_intact_and_reports() -> None:
    """The demo uploads through the tunnel, checks the sha256, and prints its report."""
    out = io.StringIO()
    with trio.fail_after(60):
        assert await run_demo(size=4 * 2**20, out=out) == 0
    report = out.getvalue()
    assert "sha256 matches" in report
    for line in ("throughput", "echo idle", "echo under load", "channels used"):
        assert line in report, report
