"""``wstunnel agent --stdio HOST:PORT``: one channel over stdin/stdout, as ssh's ProxyCommand.

The agent runs as a real child process (stdin/stdout are what is under test)
against an in-process relay; the ssh tests start their own sshd (key-only, its
own host key and config in a temporary directory) and run the real ssh and
scp through ``ProxyCommand``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from ..real_peers import free_port, sshd
from ..tunnel_helpers import (
    LOOPBACK,
    echo_handler,
    pattern_block,
    receive_all,
    relay_config,
    serve_target,
    start_relay,
)

ROOT = Path(__file__).resolve().parents[3]
AGENT = [sys.executable, "-m", "wstunnel", "agent", "--no-proxy"]


def stdio_argv(relay_port: int, target: str, *extra: str) -> list[str]:
    return [*AGENT, "--relay", f"ws://{LOOPBACK}:{relay_port}/tunnel", "--stdio", target,
            *extra]


@asynccontextmanager
async def relay() -> AsyncIterator[tuple[trio.Nursery, int]]:
    async with trio.open_nursery() as nursery:
        running = await start_relay(nursery, relay_config())
        yield nursery, running.ports[0]
        nursery.cancel_scope.cancel()


async def half_close_target(stream: trio.SocketStream) -> None:
    """Read to EOF, then answer with the digest of what came: only a half-close
    (FIN, not a close) of our direction lets that answer back."""
    async with stream:
        digest = hashlib.sha256(await receive_all(stream)).hexdigest().encode()
        await stream.send_all(b"digest " + digest)


async def run_agent(argv: list[str], stdin: bytes = b"",
                    env_token: str | None = None) -> subprocess.CompletedProcess[bytes]:
    env = None if env_token is None else {**os.environ, "STDIO_TEST_TOKEN": env_token}
    with trio.fail_after(30):
        return await trio.run_process(argv, stdin=stdin, capture_stdout=True,
                                      capture_stderr=True, check=False, cwd=ROOT, env=env)


@pytest.mark.parametrize("transport", ["websocket", "streaming", "polling"])
async def test_echo_is_byte_exact_and_stdout_carries_only_channel_bytes(transport: str) -> None:
    """What goes into stdin comes back on stdout byte for byte, with nothing else there
    even at --log-level debug (logs go to stderr); exit 0 when both ways ended and the
    relay answered the close, on every transport."""
    payload = pattern_block(b"stdio", 3 << 20)
    async with relay() as (nursery, relay_port):
        echo = await serve_target(nursery, echo_handler)
        result = await run_agent(stdio_argv(relay_port, f"{LOOPBACK}:{echo}",
                                            "--log-level", "debug", "--transport", transport),
                                 payload)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == payload
    assert b"session up" in result.stderr


async def test_eof_on_stdin_half_closes_the_channel() -> None:
    """EOF on stdin is a FIN: the destination sees the end and can still answer;
    its FIN then closes our stdout and the agent exits 0, logging nothing."""
    payload = pattern_block(b"half", 1 << 20)
    async with relay() as (nursery, relay_port):
        target = await serve_target(nursery, half_close_target)
        result = await run_agent(stdio_argv(relay_port, f"{LOOPBACK}:{target}"), payload)
    assert result.stdout == b"digest " + hashlib.sha256(payload).hexdigest().encode()
    assert (result.returncode, result.stderr) == (0, b"")


async def test_refused_destination_exits_1_with_one_line() -> None:
    """A destination that refuses: exit 1, one stderr line saying so, nothing on stdout."""
    closed = free_port()
    async with relay() as (_, relay_port):
        result = await run_agent(stdio_argv(relay_port, f"{LOOPBACK}:{closed}"), b"hello")
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1, lines
    assert f"could not connect to {LOOPBACK}:{closed}" in lines[0]
    assert result.stdout == b""


@pytest.mark.parametrize("resume_grace", [0.0, 0.5])
async def test_relay_gone_mid_channel_exits_1_with_one_line(resume_grace: float) -> None:
    """The relay vanishes while the channel is up (with and without a resume to try
    first): exit 1 and exactly one stderr line, naming the relay and the destination,
    saying the session was lost and what to check; no separate warnings before it."""
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    try:
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            running = await start_relay(nursery, relay_config(resume_grace=resume_grace))
            with trio.fail_after(30):
                process = await trio.lowlevel.open_process(
                    stdio_argv(running.ports[0], f"{LOOPBACK}:{echo}"), stdin=stdin_read,
                    stdout=stdout_write, stderr=subprocess.PIPE, cwd=ROOT)
                os.write(stdin_write, b"ping")
                async with trio.lowlevel.FdStream(os.dup(stdout_read)) as stdout:
                    assert await stdout.receive_some(4) == b"ping"
                running.kill()
                assert await process.wait() == 1
                assert process.stderr is not None
                lines = (await receive_all(process.stderr)).decode().splitlines()
            nursery.cancel_scope.cancel()
    finally:
        for fd in (stdin_read, stdin_write, stdout_read, stdout_write):
            os.close(fd)
    assert len(lines) == 1, lines
    assert f"lost the session to relay ws://{LOOPBACK}:{running.ports[0]}/tunnel" in lines[0]
    assert f"while connected to {LOOPBACK}:{echo}" in lines[0]
    assert "check the relay's log and the network to it" in lines[0]


async def test_unreachable_relay_gives_up_within_connect_wait_timeout(tmp_path: Path) -> None:
    """No relay: the agent does not retry forever; exit 1 once connect_wait_timeout
    has passed, naming the relay and the reason. (-c without forwards works with --stdio.)"""
    relay_port = free_port()
    config = tmp_path / "agent.yaml"
    config.write_text(f"relay: ws://{LOOPBACK}:{relay_port}/tunnel\n"
                      "connect_wait_timeout: 0.5\nreconnect_min_interval: 0.1\n")
    started = trio.current_time()
    result = await run_agent([*AGENT, "-c", str(config), "--stdio", f"{LOOPBACK}:22"])
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1, lines
    assert f"cannot reach relay ws://{LOOPBACK}:{relay_port}/tunnel" in lines[0]
    assert "connection refused" in lines[0]
    assert trio.current_time() - started < 10


async def test_refused_token_exits_1_at_once_with_one_line() -> None:
    """A refused token is final: exit 1 at once, one line saying the relay refused it
    and what to check, not that the relay could not be reached or a timeout expired."""
    async with trio.open_nursery() as nursery:
        running = await start_relay(nursery, relay_config(no_auth=False, allow=()))
        relay_port = running.ports[0]
        result = await run_agent([*stdio_argv(relay_port, f"{LOOPBACK}:22"), "--token-env",
                                  "STDIO_TEST_TOKEN"], env_token="laptop.not-the-right-one")
        nursery.cancel_scope.cancel()
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1, lines
    assert "rejected the token for agent laptop" in lines[0]
    assert "cannot reach" not in lines[0] and "connect_wait_timeout" not in lines[0]


async def test_stdin_and_stdout_are_left_blocking() -> None:
    """stdin/stdout are shared with the parent (ssh, a shell): the non-blocking mode
    the agent sets while it runs is undone when it exits."""
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    try:
        async with relay() as (nursery, relay_port):
            echo = await serve_target(nursery, echo_handler)
            with trio.fail_after(30):
                process = await trio.lowlevel.open_process(
                    stdio_argv(relay_port, f"{LOOPBACK}:{echo}"), stdin=stdin_read,
                    stdout=stdout_write, cwd=ROOT)
                os.write(stdin_write, b"ping")
                os.close(stdin_write)
                stdin_write = -1
                async with trio.lowlevel.FdStream(os.dup(stdout_read)) as stdout:
                    assert await stdout.receive_some(4) == b"ping"
                assert await process.wait() == 0
        assert os.get_blocking(stdin_read) and os.get_blocking(stdout_write)
    finally:
        for fd in (stdin_read, stdin_write, stdout_read, stdout_write):
            if fd >= 0:
                os.close(fd)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
async def test_sighup_and_sigterm_close_the_session_and_restore_blocking(
        signum: signal.Signals) -> None:
    """ssh sends its ProxyCommand SIGHUP when it exits: the agent ends the channel
    (the destination sees it at once, not after the relay's resume grace), closes the
    session, restores stdin/stdout's blocking mode, and exits 1 without a word."""
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    ended = trio.Event()

    async def echo_until_end(stream: trio.SocketStream) -> None:
        try:
            await echo_handler(stream)
        finally:
            ended.set()
    try:
        async with relay() as (nursery, relay_port):
            echo = await serve_target(nursery, echo_until_end)
            with trio.fail_after(30):
                process = await trio.lowlevel.open_process(
                    stdio_argv(relay_port, f"{LOOPBACK}:{echo}"), stdin=stdin_read,
                    stdout=stdout_write, stderr=subprocess.PIPE, cwd=ROOT)
                os.write(stdin_write, b"ping")
                async with trio.lowlevel.FdStream(os.dup(stdout_read)) as stdout:
                    assert await stdout.receive_some(4) == b"ping"
                process.send_signal(signum)
                assert await process.wait() == 1
                assert process.stderr is not None
                assert await receive_all(process.stderr) == b""
            with trio.fail_after(5):
                await ended.wait()
        assert os.get_blocking(stdin_read) and os.get_blocking(stdout_write)
    finally:
        for fd in (stdin_read, stdin_write, stdout_read, stdout_write):
            os.close(fd)


# ---------------------------------------------------------------- real ssh and scp

def ssh_options(relay_port: int, key: Path, tmp: Path) -> list[str]:
    proxy = " ".join([*AGENT, "--relay", f"ws://{LOOPBACK}:{relay_port}/tunnel",
                      "--stdio", "%h:%p"])
    return ["-o", f"ProxyCommand={proxy}", "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={tmp / 'known_hosts'}", "-o", "BatchMode=yes",
            "-i", str(key)]


async def test_ssh_and_scp_through_proxy_command(tmp_path: Path) -> None:
    """ssh -o ProxyCommand='wstunnel agent ... --stdio %h:%p' runs a command on a real
    sshd, and scp copies 64 MiB through it, sha256 equal."""
    user = os.environ.get("USER") or "root"
    source = tmp_path / "big"
    source.write_bytes(os.urandom(64 << 20))
    with sshd(tmp_path) as (ssh_port, key):
        async with relay() as (_, relay_port):
            options = ssh_options(relay_port, key, tmp_path)
            with trio.fail_after(60):
                ran = await trio.run_process(
                    ["ssh", *options, "-p", str(ssh_port), f"{user}@{LOOPBACK}", "echo", "ok"],
                    capture_stdout=True, capture_stderr=True, check=False)
                assert (ran.returncode, ran.stdout) == (0, b"ok\n"), ran.stderr.decode()
                copied = await trio.run_process(
                    ["scp", "-q", *options, "-P", str(ssh_port), str(source),
                     f"{user}@{LOOPBACK}:{tmp_path / 'copy'}"],
                    capture_stderr=True, check=False)
                assert copied.returncode == 0, copied.stderr.decode()
    assert _sha256(tmp_path / "copy") == _sha256(source)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
