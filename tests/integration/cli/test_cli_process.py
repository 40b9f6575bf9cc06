"""The real programs: example configs run against each other; signals; exit codes."""

from __future__ import annotations

import signal
import sys
from functools import partial
from pathlib import Path

import trio

from ..process_helpers import ROOT, wstunnel
from ..tunnel_helpers import LOOPBACK, echo_handler

CONFIGS = ROOT / "configs"
EXAMPLE_TARGET = 18081  # configs/agent.yaml forwards 127.0.0.1:19000 -> 127.0.0.1:18081
EXAMPLE_LOCAL = 19000


async def test_example_configs_carry_traffic_and_exit_0_on_sigterm() -> None:
    """configs/relay.yaml + configs/agent.yaml tunnel bytes; SIGTERM drains and exits 0."""
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_tcp, echo_handler, EXAMPLE_TARGET, host=LOOPBACK))
        async with wstunnel("relay", "-c", str(CONFIGS / "relay.yaml")) as relay, \
                wstunnel("agent", "-c", str(CONFIGS / "agent.yaml")) as agent:
            with trio.fail_after(15):
                await relay.wait_for(rb"relay listening")
                await agent.wait_for(rb"session up")
                async with await trio.open_tcp_stream(LOOPBACK, EXAMPLE_LOCAL) as stream:
                    await stream.send_all(b"through the example configs")
                    assert await stream.receive_some() == b"through the example configs"
            with trio.fail_after(10 + 3):  # the configs' drain_timeout, plus start-up slack
                agent.process.send_signal(signal.SIGTERM)
                relay.process.send_signal(signal.SIGTERM)
                assert await agent.process.wait() == 0, agent.text()
                assert await relay.process.wait() == 0, relay.text()
        nursery.cancel_scope.cancel()


async def test_broken_config_exits_2_with_file_line_and_key(tmp_path: Path) -> None:
    """A bad value names file, line and key path; exit code 2; no traceback."""
    config = tmp_path / "agent.yaml"
    config.write_text(
        "relay: ws://127.0.0.1:1/tunnel\nforwards:\n"
        "  - listen: 127.0.0.1:0\n    target: db.internal\n"
    )
    with trio.fail_after(15):
        result = await trio.run_process(
            [sys.executable, "-m", "wstunnel", "agent", "-c", str(config)],
            capture_stderr=True,
            check=False,
            cwd=ROOT,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert 'agent.yaml:4: forwards[0].target: expected host:port, got "db.internal"' in stderr
    assert "Traceback" not in stderr
