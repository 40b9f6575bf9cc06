"""``--stdio`` with several relays: the first that answers carries the channel.

ssh's ProxyCommand is the agent as a real child process (``--relay`` repeated,
as README shows for fallbacks); the relays run in-process. The first relay is
down (its port taken, then closed: nothing listens) or refuses every session
at the HTTP level (a relay that is shutting down answers 503): the agent must
go on to the next one, as the daemon agent does (agent/reconnect.py), not wait
out ``connect_wait_timeout`` on the first and exit 1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
import trio.testing

from wstunnel.addresses import HostPort
from wstunnel.agent.stdio import run_stdio
from wstunnel.config import AgentConfig
from wstunnel.protocol import TunnelProtocol
from wstunnel.relay import Relay

from ..real_peers import free_port
from ..tunnel_helpers import (
    LOOPBACK,
    echo_handler,
    pattern_block,
    receive_all,
    relay_config,
    serve_target,
    serving_relay,
    start_relay,
)

ROOT = Path(__file__).resolve().parents[3]


def _stdio_argv(relay_ports: list[int], target: int) -> list[str]:
    relays = [arg for port in relay_ports for arg in ("--relay", f"ws://{LOOPBACK}:{port}/tunnel")]
    return [sys.executable, "-m", "wstunnel", "agent", "--no-proxy", *relays,
            "--stdio", f"{LOOPBACK}:{target}"]


async def _run(argv: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(argv, stdin=stdin, capture_stdout=True,
                                      capture_stderr=True, check=False, cwd=ROOT)


async def test_stdio_goes_to_the_second_relay_when_the_first_is_not_listening() -> None:
    """Nothing listens at the first relay: the bytes go through the second, byte
    exact, exit 0 and not a word on stderr; and well before connect_wait_timeout
    (10 s), which the old agent spent retrying the first before exiting 1."""
    payload = pattern_block(b"fallback", 1 << 20)
    down = free_port()
    async with trio.open_nursery() as nursery:
        echo = await serve_target(nursery, echo_handler)
        second = await start_relay(nursery, relay_config())
        started = trio.current_time()
        result = await _run(_stdio_argv([down, second.ports[0]], echo), payload)
        nursery.cancel_scope.cancel()
    assert (result.returncode, result.stderr.decode()) == (0, "")
    assert result.stdout == payload
    assert trio.current_time() - started < 8


async def test_stdio_goes_to_the_second_relay_when_the_first_answers_503() -> None:
    """The first relay is shutting down (it answers every session 503): the channel
    goes through the second; exit 0, nothing on stderr."""
    stopping = Relay(relay_config())
    stopping.stopping = True
    async with trio.open_nursery() as nursery, serving_relay(stopping) as first:
        echo = await serve_target(nursery, echo_handler)
        second = await start_relay(nursery, relay_config())
        result = await _run(_stdio_argv([first, second.ports[0]], echo), b"through the second")
        nursery.cancel_scope.cancel()
    assert (result.returncode, result.stderr.decode()) == (0, "")
    assert result.stdout == b"through the second"


async def test_stdio_goes_on_to_the_next_relay_when_one_refuses_the_login() -> None:
    """The first relay wants a token we do not have (401): that is final for it, not
    for the run; the second carries the channel. Only when every relay refuses is the
    refusal the one line (tests/integration/agent/test_stdio.py)."""
    async with trio.open_nursery() as nursery:
        echo = await serve_target(nursery, echo_handler)
        first = await start_relay(nursery, relay_config(no_auth=False, allow=()))
        second = await start_relay(nursery, relay_config())
        result = await _run(_stdio_argv([first.ports[0], second.ports[0]], echo), b"no token")
        nursery.cancel_scope.cancel()
    assert (result.returncode, result.stderr.decode()) == (0, "")
    assert result.stdout == b"no token"


async def test_stdio_names_every_relay_when_none_answers(tmp_path: Path) -> None:
    """No relay answers (a `relay:` list in the file): exit 1 once connect_wait_timeout
    has passed, with one line naming the relay tried last and the other one too."""
    ports = [free_port(), free_port()]
    config = tmp_path / "agent.yaml"
    config.write_text("relay:\n" + "".join(f"  - ws://{LOOPBACK}:{port}/tunnel\n"
                                         for port in ports)
                      + "connect_wait_timeout: 0.5\nreconnect_min_interval: 0.1\n")
    argv = [sys.executable, "-m", "wstunnel", "agent", "--no-proxy", "-c", str(config),
            "--stdio", f"{LOOPBACK}:22"]
    result = await _run(argv, b"")
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1, lines
    assert "cannot reach relay ws://" in lines[0] and "connection refused" in lines[0]
    for port in ports:
        assert f"ws://{LOOPBACK}:{port}/tunnel" in lines[0]


class _GoneAtOnce(Relay):
    """A relay that sends GOAWAY as soon as a session starts (it began to stop just
    after it let the session in): the agent's OPEN crosses it and is refused."""

    async def _serve_session(self, stream: trio.abc.Stream, protocol: TunnelProtocol,
                             *args: Any, **kwargs: Any) -> None:
        protocol.go_away(0, "the relay is shutting down")
        await super()._serve_session(stream, protocol, *args, **kwargs)


async def test_stdio_opens_the_channel_again_on_the_next_relay_after_a_goaway() -> None:
    """The first relay lets the session in and goes away at once: the channel, with
    what stdin gave meanwhile, is opened on the second relay; the destination gets
    every byte once, and the run ends cleanly (in-process: stdin/stdout are a memory
    stream, written before the agent connects)."""
    payload = pattern_block(b"again", 64 << 10)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, serving_relay(
                _GoneAtOnce(relay_config())) as first:
            echo = await serve_target(nursery, echo_handler)
            second = await start_relay(nursery, relay_config())
            config = AgentConfig(relay=(f"ws://{LOOPBACK}:{first}/tunnel",
                                        f"ws://{LOOPBACK}:{second.ports[0]}/tunnel"),
                                 proxy="none", reconnect_min_interval=0.05,
                                 reconnect_max_interval=0.2)
            stdio, ssh = trio.testing.memory_stream_pair()
            await ssh.send_all(payload)
            await ssh.send_eof()
            nursery.start_soon(run_stdio, config, HostPort(LOOPBACK, echo), stdio)
            assert await receive_all(ssh) == payload
            nursery.cancel_scope.cancel()


async def test_a_stdio_session_on_a_fallback_relay_stays_when_the_first_comes_back() -> None:
    """The daemon agent moves an idle session back to the preferred relay once it
    answers again; a --stdio session is never idle in that sense (its one channel is
    the whole point): the channel goes on on the second relay after the first is back
    for several reconnect_max_interval checks."""
    first = free_port()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            second = await start_relay(nursery, relay_config())
            config = AgentConfig(relay=(f"ws://{LOOPBACK}:{first}/tunnel",
                                        f"ws://{LOOPBACK}:{second.ports[0]}/tunnel"),
                                 proxy="none", reconnect_min_interval=0.05,
                                 reconnect_max_interval=0.1)
            stdio, ssh = trio.testing.memory_stream_pair()
            nursery.start_soon(run_stdio, config, HostPort(LOOPBACK, echo), stdio)
            await ssh.send_all(b"before")
            assert await ssh.receive_some() == b"before"
            await start_relay(nursery, relay_config(listen=HostPort(LOOPBACK, first)))
            await trio.sleep(1.0)  # (ten checks: nothing to wait for when all goes well)
            await ssh.send_all(b"after")
            assert await ssh.receive_some() == b"after"
            await ssh.send_eof()
            assert await ssh.receive_some() == b""
            nursery.cancel_scope.cancel()
