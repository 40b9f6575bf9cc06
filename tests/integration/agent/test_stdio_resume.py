"""``--stdio`` and resumption: exit 0 only once the relay can have what stdin gave.

ssh reads the ProxyCommand's exit status and stdout; the last bytes it wrote and
its EOF may still wait in the session's replay log while the path is down. The
agent must wait for the resume (within the relay's grace) before it closes the
session, or those bytes are lost and the exit status says all went well.
In-process relay and ``run_stdio`` (stdin/stdout are a memory stream here); the
path is a forwarder the test cuts (benchmarks/_cutter.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from benchmarks._cutter import PathCutter
from wstunnel.addresses import HostPort
from wstunnel.agent.stdio import run_stdio
from wstunnel.config import AgentConfig

from ..log_watch import LogWatch
from ..tunnel_helpers import LOOPBACK, relay_config, serve_target, start_relay


def answer_then_read(received: bytearray, done: trio.Event
                     ) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A target that answers "hello" at once and half-closes, then reads the client's
    last words into ``received``, ending with " <EOF>" or " <RESET>"."""
    async def target(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(b"hello")
            await stream.send_eof()
            async for data in stream:
                received.extend(data)
            received.extend(b" <EOF>")
        except trio.BrokenResourceError:
            received.extend(b" <RESET>")
        finally:
            done.set()
            await trio.aclose_forcefully(stream)
    return target


async def start_path(nursery: trio.Nursery, grace: float,
                     target: Callable[[trio.SocketStream], Awaitable[None]]
                     ) -> tuple[PathCutter, int]:
    """A relay with ``grace``, a cuttable path to it, and ``target``'s port."""
    relay = await start_relay(nursery, relay_config(resume_grace=grace))
    cutter = PathCutter(relay.ports[0])
    await nursery.start(cutter.serve)
    return cutter, await serve_target(nursery, target)


async def run_agent(config: AgentConfig, port: int, stdio: trio.abc.HalfCloseableStream,
                    failed: list[str], exited: trio.Event) -> None:
    """``run_stdio`` to the target at ``port``: returning is exit 0; what it raises (exit
    1: a StdioFailed, in run_stdio's group) goes into ``failed``."""
    try:
        await run_stdio(config, HostPort(LOOPBACK, port), stdio)
    except Exception as exc:
        failed.append(repr(exc))
    exited.set()


@pytest.mark.parametrize("down", [0.5, 3.0], ids=["resumed", "past-grace"])
async def test_the_last_bytes_written_while_the_path_is_down_arrive_before_exit(
        logs: LogWatch, down: float) -> None:
    """Resumed: the target gets them, then EOF, and the agent exits 0. The path down
    past the relay's grace (1 s): the target is reset and the agent fails (exit 1)."""
    received = bytearray()
    target_done = trio.Event()
    target = answer_then_read(received, target_done)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            cutter, port = await start_path(nursery, 1.0, target)
            config = AgentConfig(relay=f"ws://{LOOPBACK}:{cutter.port}/tunnel", proxy="none",
                                 reconnect_min_interval=0.05, reconnect_max_interval=0.2)
            stdio, ssh = trio.testing.memory_stream_pair()
            exited = trio.Event()
            failed: list[str] = []
            nursery.start_soon(run_agent, config, port, stdio, failed, exited)
            got = b""
            while data := await ssh.receive_some():
                got += data
            assert got == b"hello"  # (and stdout's EOF: the target's half-close)
            cutter.cut(down=down)
            await logs.wait_for("open to resume")  # the agent knows the path is down
            await ssh.send_all(b"bye")
            await ssh.send_eof()
            await target_done.wait()
            await exited.wait()
            if down < 1.0:
                assert (bytes(received), failed) == (b"bye <EOF>", [])
            else:
                assert bytes(received) == b" <RESET>"
                assert "StdioFailed" in failed[0] and "lost the session" in failed[0]
            nursery.cancel_scope.cancel()


async def test_a_fin_the_relay_never_read_fails_the_agent_instead_of_exit_0(
        logs: LogWatch) -> None:
    """The path stops passing what the agent sends just as stdin ends: the FIN and the
    close go out but never reach the relay, so no answer to the close comes. The
    agent exits 1 within ping_timeout; the relay's grace then resets the target."""
    received = bytearray()
    target_done = trio.Event()
    target = answer_then_read(received, target_done)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            cutter, port = await start_path(nursery, 0.5, target)
            config = AgentConfig(relay=f"ws://{LOOPBACK}:{cutter.port}/tunnel", proxy="none",
                                 ping_timeout=0.5)
            stdio, ssh = trio.testing.memory_stream_pair()
            exited = trio.Event()
            failed: list[str] = []
            async with trio.open_nursery() as agent_nursery:
                agent_nursery.start_soon(run_agent, config, port, stdio, failed, exited)
                got = b""
                while data := await ssh.receive_some():
                    got += data
                assert got == b"hello"
                cutter.stall_upstream()
                await ssh.send_all(b"bye")
                await ssh.send_eof()
            assert len(failed) == 1, failed
            assert "did not confirm that it had the last bytes" in failed[0]
            cutter.cut()  # (the relay sees the path break: its grace runs out)
            await target_done.wait()
            assert bytes(received) == b" <RESET>"
            nursery.cancel_scope.cancel()
