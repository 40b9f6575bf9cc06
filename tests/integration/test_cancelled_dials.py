"""A connect to a destination that is interrupted (the session ended meanwhile) after
the destination's kernel had accepted it: the destination sees a reset, never a
connection that ended cleanly with nothing in it. The client behind the tunnel had
sent bytes the destination never got; a clean empty close would pass for "it
connected and had nothing to say". (benchmarks/chaos_paths.py --shape R-tcp
--resume-grace 0 found it: the agent's dial for a reverse forward, cancelled when
the session was lost, ended its fresh connection with FIN.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from wstunnel.agent import reverse
from wstunnel.config.textforms import REVERSE, parse_forward
from wstunnel.relay import dial

from .tunnel_helpers import LOOPBACK

Dial = Callable[[int], Awaitable[trio.SocketStream]]


async def _interrupted_once_connected(dial_port: Dial) -> str:
    """How the destination sees a dial cancelled as soon as its kernel completed the
    handshake (the listening socket turns readable): "reset", "clean close", or
    "not interrupted" if the dial returned first."""
    listener = trio.socket.socket()
    with listener:
        await listener.bind((LOOPBACK, 0))
        listener.listen(8)
        dialling = trio.CancelScope()

        async def cancel_once_connected() -> None:
            await trio.lowlevel.wait_readable(listener)
            dialling.cancel()

        outcome = "interrupted"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_once_connected)
            with dialling:
                stream = await dial_port(listener.getsockname()[1])
                outcome = "not interrupted"
                await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()
        conn, _ = await listener.accept()
        with conn:
            try:
                data = await conn.recv(1)
            except ConnectionResetError:
                return "reset" if outcome == "interrupted" else outcome
            return ("clean close" if data == b"" else "data") if outcome == "interrupted" \
                else outcome


async def _agent_reverse_dial(port: int) -> trio.SocketStream:
    forward = parse_forward(f"2222:{LOOPBACK}:{port}", kind=REVERSE)
    return await reverse.dial_target(forward)


async def _relay_dial(port: int) -> trio.SocketStream:
    return await dial.dial(LOOPBACK, port, allows=lambda address: True, timeout=5.0)


async def test_an_agent_dial_for_a_reverse_forward_cut_short_is_a_reset() -> None:
    """The agent dials a -R target; the session ends just as the target accepts."""
    with trio.fail_after(10):
        seen = [await _interrupted_once_connected(_agent_reverse_dial) for _ in range(5)]
    assert seen == ["reset"] * 5


async def test_a_relay_dial_cut_short_is_a_reset() -> None:
    """The relay dials a destination (raced addresses); the session ends just as the
    destination accepts: a reset, and no socket left open."""
    with trio.fail_after(10):
        seen = [await _interrupted_once_connected(_relay_dial) for _ in range(5)]
    assert seen == ["reset"] * 5
