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


async def test_demo_report_ends_with_meaning_and_next_steps() -> None:
    """After the figures: what they mean, then the relay/agent/ssh/curl commands to try by hand."""
    out = io.StringIO()
    with trio.fail_after(60):
        assert await run_demo(size=2**20, out=out) == 0
    report = out.getvalue()
    tail = report[report.index("channels used"):]
    assert "What the figures mean:" in tail and "echo under load" in tail
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    commands = [line for line in lines if line.startswith(("wstunnel ", "ssh ", "python3 "))]
    assert [c.split()[:2] for c in commands[:3]] == [
        ["wstunnel", "relay"], ["wstunnel", "agent"], ["ssh", "-p"]]
    assert any("curl http://127.0.0.1:8081/" in line for line in lines)
    assert lines[-1].startswith("Next:")
