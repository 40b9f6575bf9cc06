"""Unix sockets on either end of a -L forward, on loopback with real sockets.

The agent listens on a path (``-L /tmp/app.sock:host:port``) or the relay
connects to one (``-L 8080:unix:/run/db.sock``), checked against the relay's
``unix:`` allow rules.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from wstunnel.config import Forward
from wstunnel.security.allow_rule import AllowRule

from .log_watch import LogWatch
from .tunnel_helpers import (
    LOOPBACK,
    agent_config,
    digest_handler,
    exchange,
    expect_reset,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
    upload_and_download,
)

MiB = 1 << 20
Handler = Callable[[trio.SocketStream], Awaitable[None]]

# Each test runs twice: sockets carried by the session's socket pump, and by splice.
pytestmark = pytest.mark.usefixtures("carrier")


async def serve_unix(nursery: trio.Nursery, handler: Handler, path: str) -> None:
    """A unix stream server at ``path`` running ``handler`` per connection."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    await nursery.start(trio.serve_listeners, handler, [trio.SocketListener(sock)])


@asynccontextmanager
async def unix_tunnel(forward: Forward, relay_allow: list[str],
                      target: Handler | None = None) -> AsyncIterator[list[int]]:
    """A relay allowing ``relay_allow`` and an agent serving ``forward``; yields the
    agent's bound ports (0 for a path). ``target`` serves ``forward``'s TCP target
    port when the forward's target port is 0 and it has no target path."""
    async with trio.open_nursery() as nursery:
        if target is not None:
            port = await serve_target(nursery, target)
            forward = Forward(forward.listen_host, forward.listen_port, LOOPBACK, port,
                              listen_path=forward.listen_path)
        relay = await start_relay(nursery, relay_config(
            allow=tuple(AllowRule.parse(rule) for rule in relay_allow)))
        agent = await start_agent(nursery, agent_config(relay.ports[0], [],
                                                        forwards=(forward,)))
        try:
            yield agent.ports
        finally:
            nursery.cancel_scope.cancel()


async def test_agent_listening_on_a_path_carries_64_mib_each_way(tmp_path: Path) -> None:
    """-L /path:host:port: a unix socket client's 64 MiB reach a TCP server and its
    64 MiB come back, sha256 equal; the socket file is 0660 less the umask."""
    path = str(tmp_path / "app.sock")
    forward = Forward("", 0, "", 0, listen_path=path)
    with trio.fail_after(60):
        async with unix_tunnel(forward, [LOOPBACK], digest_handler(64 * MiB, b"down")):
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            assert os.lstat(path).st_mode & 0o777 == 0o660 & ~_umask()
            async with await trio.open_unix_socket(path) as stream:
                await exchange(stream, 64 * MiB, 64 * MiB)


async def test_unix_target_on_the_relay_carries_64_mib_each_way(tmp_path: Path) -> None:
    """-L port:unix:/path: a TCP client's 64 MiB reach a unix socket server on the
    relay's side (allowed by a unix: rule) and 64 MiB come back, sha256 equal."""
    path = str(tmp_path / "db.sock")
    forward = Forward(LOOPBACK, 0, "", 0, target_path=path)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await serve_unix(nursery, digest_handler(64 * MiB, b"down"), path)
            async with unix_tunnel(forward, [f"unix:{path}"]) as ports:
                await upload_and_download(ports[0], 64 * MiB, 64 * MiB)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("rule", ["unix:/run/other.sock", LOOPBACK, "0.0.0.0/0"])
async def test_unix_target_outside_the_allow_rules_is_refused(
        tmp_path: Path, logs: LogWatch, rule: str) -> None:
    """A unix path no unix: rule names (host:port rules never allow one) is never
    connected: the client's connection is reset and the relay logs why."""
    path = str(tmp_path / "db.sock")
    accepted: list[trio.SocketStream] = []

    async def server(stream: trio.SocketStream) -> None:
        accepted.append(stream)

    forward = Forward(LOOPBACK, 0, "", 0, target_path=path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await serve_unix(nursery, server, path)
            async with unix_tunnel(forward, [rule]) as ports:
                async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as stream:
                    await expect_reset(stream, b"startup packet")
                assert accepted == []
                line = await logs.wait_for(f"refused channel to unix:{path}: ")  # the relay's
            nursery.cancel_scope.cancel()
    assert f"not allowed by the relay's policy: no allow rule matches unix:{path}" in line


async def test_missing_unix_target_resets_the_client(tmp_path: Path, logs: LogWatch) -> None:
    """An allowed path where nothing listens (a stale socket file) is refused by the
    server's kernel: the client is reset and the relay says nothing listens there."""
    path = str(tmp_path / "gone.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    forward = Forward(LOOPBACK, 0, "", 0, target_path=path)
    with trio.fail_after(10):
        async with unix_tunnel(forward, [f"unix:{tmp_path}/*"]) as ports:
            async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as stream:
                await expect_reset(stream)
            line = await logs.wait_for(f"refused channel to unix:{path}: ")  # the relay's
    assert f"nothing listens on unix:{path}" in line


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
