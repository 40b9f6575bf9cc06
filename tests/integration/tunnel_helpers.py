"""In-process relay + agent + targets on 127.0.0.1 port 0, for end-to-end tests."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from wstunnel.addresses import HostPort
from wstunnel.agent import run_agent
from wstunnel.config import AgentConfig, Forward, RelayConfig
from wstunnel.relay import Relay, run_relay
from wstunnel.security.allow_rule import AllowRule

LOOPBACK = "127.0.0.1"


def relay_config(**overrides: Any) -> RelayConfig:
    base = RelayConfig(
        listen=HostPort(LOOPBACK, 0),
        allow=(AllowRule.parse(LOOPBACK),),
        drain_timeout=2.0,
        no_auth=True,
    )
    return replace(base, **overrides)


def agent_config(relay_port: int, targets: list[int], **overrides: Any) -> AgentConfig:
    forwards = tuple(Forward(LOOPBACK, 0, LOOPBACK, port) for port in targets)
    base = AgentConfig(
        relay=f"ws://{LOOPBACK}:{relay_port}/tunnel",
        forwards=forwards,
        reconnect_min_interval=0.05,
        reconnect_max_interval=0.2,
        connect_wait_timeout=5.0,
        drain_timeout=2.0,
        proxy="none",  # HTTPS_PROXY in the test environment must not reroute loopback tests
    )
    return replace(base, **overrides)


@dataclass
class Running:
    """A started role: its bound ports and how to stop it."""

    ports: list[int]
    stop: trio.Event
    scope: trio.CancelScope
    finished: trio.Event = field(default_factory=trio.Event)

    def kill(self) -> None:
        """Vanish without a goodbye (connections dropped by cancellation)."""
        self.scope.cancel()


async def start_relay(nursery: trio.Nursery, config: RelayConfig) -> Running:
    return await _start(nursery, run_relay, config, lambda bound: [bound[0][1]])


async def start_agent(nursery: trio.Nursery, config: AgentConfig) -> Running:
    return await _start(nursery, run_agent, config, lambda bound: [b[0][1] for b in bound])


async def _start(
    nursery: trio.Nursery,
    runner: Callable[..., Awaitable[None]],
    config: Any,
    ports_of: Callable[[Any], list[int]],
) -> Running:
    stop = trio.Event()
    scope = trio.CancelScope()
    finished = trio.Event()

    async def body(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await runner(config, shutdown=stop, task_status=task_status)
        finally:
            finished.set()

    bound = await nursery.start(body)
    return Running(ports_of(bound), stop, scope, finished)


@asynccontextmanager
async def serving_relay(relay: Relay) -> AsyncIterator[int]:
    """``relay``'s connection handler on a loopback port (yielded), for the duration."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        await nursery.start(trio.serve_listeners, relay.handle_connection, listeners)
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


async def serve_target(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=LOOPBACK))
    return int(listeners[0].socket.getsockname()[1])


async def echo_handler(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close back."""
    async with stream:
        try:
            async for data in stream:
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


def digest_handler(
    reply_size: int, seed: bytes = b"x"
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """Hash everything until EOF, then send `reply_size` bytes and the hash of what came in."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            digest = hashlib.sha256()
            async for data in stream:
                digest.update(data)
            await send_pattern(stream, reply_size, seed)
            await stream.send_all(digest.digest())

    return handler


def pattern_block(seed: bytes, size: int = 1 << 20) -> bytes:
    block = hashlib.sha256(seed).digest() * (size // 32 + 1)
    return block[:size]


async def send_pattern(stream: trio.abc.SendStream, size: int, seed: bytes) -> str:
    """Send `size` pseudo-random bytes; return their sha256 hex."""
    digest = hashlib.sha256()
    block = pattern_block(seed)
    sent = 0
    while sent < size:
        piece = block[: min(len(block), size - sent)]
        await stream.send_all(piece)
        digest.update(piece)
        sent += len(piece)
    return digest.hexdigest()


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    async for data in stream:
        chunks.append(data)
    return b"".join(chunks)


async def receive_until_reset(stream: trio.SocketStream) -> bytes:
    """What arrives before the connection is reset; fails if it ends cleanly instead."""
    chunks = []
    try:
        async for data in stream:
            chunks.append(data)
    except trio.BrokenResourceError as exc:
        assert isinstance(exc.__cause__, ConnectionResetError), exc
        return b"".join(chunks)
    raise AssertionError(f"clean end of stream after {sum(map(len, chunks))} bytes, not a reset")


async def http_status(port: int, request: bytes) -> int:
    """The HTTP status the server on ``port`` answers ``request`` with."""
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(request)
        head = b""
        while b"\r\n" not in head:
            chunk = await stream.receive_some()
            assert chunk, f"the server closed without answering (got {head!r})"
            head += chunk
    return int(head.split()[1])


async def expect_reset(stream: trio.SocketStream, payload: bytes = b"") -> None:
    """Send ``payload`` (if any) and see the connection reset with nothing received:
    how a refused or lost channel must end for its application."""
    try:
        if payload:
            await stream.send_all(payload)
        received = await receive_until_reset(stream)
    except trio.BrokenResourceError as exc:  # the reset came while sending
        assert isinstance(exc.__cause__, ConnectionResetError), exc
        return
    assert received == b"", received


@asynccontextmanager
async def tunnel(
    targets: list[Callable[[trio.SocketStream], Awaitable[None]]],
    relay_overrides: dict[str, Any] | None = None,
    agent_overrides: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[list[int], Running, Running]]:
    """Targets, a relay and an agent; yields (agent local ports, relay, agent)."""
    async with trio.open_nursery() as nursery:
        target_ports = [await serve_target(nursery, handler) for handler in targets]
        relay = await start_relay(nursery, relay_config(**(relay_overrides or {})))
        agent = await start_agent(
            nursery, agent_config(relay.ports[0], target_ports, **(agent_overrides or {}))
        )
        try:
            yield agent.ports, relay, agent
        finally:
            nursery.cancel_scope.cancel()


async def upload_and_download(port: int, up: int, down: int) -> None:
    """Send ``up`` bytes and half-close; expect ``down`` bytes + the sha256 of ours.

    Pairs with ``digest_handler(down, b"down")`` as the target.
    """
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await exchange(stream, up, down)


async def exchange(stream: trio.abc.HalfCloseableStream, up: int, down: int) -> None:
    """``upload_and_download`` over a stream already open (a unix socket, say)."""
    got = bytearray()

    async def reader() -> None:
        async for data in stream:
            got.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        sent_hash = await send_pattern(stream, up, b"up")
        await stream.send_eof()
    block = pattern_block(b"down")
    expected = (block * (down // len(block) + 1))[:down]
    assert len(got) == down + 32
    assert hashlib.sha256(got[:down]).digest() == hashlib.sha256(expected).digest()
    assert got[down:].hex() == sent_hash


async def assert_parts_arrive_joined(sender: Any, receiver: trio.abc.Stream,
                                     parts: list[bytes], timeout: float = 10) -> None:
    """``sender.send_parts(parts)`` delivers exactly their concatenation."""
    expected = b"".join(parts)
    received = bytearray()
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send_parts, parts)
            while len(received) < len(expected):
                data = await receiver.receive_some(1 << 20)
                assert data, "closed early"
                received += data
    assert received == expected


async def assert_receive_into_fills_views(sender: Any, receiver: Any, timeout: float = 10) -> None:
    """``receiver.receive_into`` waits for data, writes only inside the view it is
    given, returns the count, and 0 once the sender has closed."""
    payload = os.urandom(300_000)
    received = bytearray()
    buffer = bytearray(b"\xee" * 100_001)
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            async def send_later() -> None:
                await trio.testing.wait_all_tasks_blocked()  # the reader waits first
                await sender.send_all(payload)
                await sender.aclose()

            nursery.start_soon(send_later)
            with pytest.raises(ValueError):
                await receiver.receive_into(memoryview(buffer)[:0])
            while True:
                with memoryview(buffer) as view:
                    got = await receiver.receive_into(view[:100_000])
                assert buffer[100_000] == 0xEE  # nothing past the view
                if not got:
                    break
                received += buffer[:got]
    assert received == payload


async def echo_exact(stream: trio.abc.Stream, payload: bytes) -> bytes:
    """Send ``payload`` and read back as many bytes; fail if the stream closes first."""
    await stream.send_all(payload)
    got = b""
    while len(got) < len(payload):
        data = await stream.receive_some()
        assert data, "closed early"
        got += data
    return got


class FailedReads(socket.socket):
    """A socket that counts the reads the kernel had nothing for (a failed ``recv``:
    a system call and an exception that a reader waiting first would not pay)."""

    failed = 0

    def recv(self, *args: int) -> bytes:
        try:
            return super().recv(*args)
        except BlockingIOError:
            self.failed += 1
            raise
