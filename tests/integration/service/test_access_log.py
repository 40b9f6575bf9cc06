"""The access log end to end: a real relay and agent (run as services), real sockets.

Each finished channel gives exactly one line on each side, in the format
``log_format`` says, with who, where, how much and how it ended.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from wstunnel.config import Forward
from wstunnel.relay import run_relay
from wstunnel.service.access_log import FIELDS
from wstunnel.service.logs import setup_logging
from wstunnel.service.runner import run_service

from ..process_helpers import agent_process, relay_process
from ..tunnel_helpers import LOOPBACK, agent_config, echo_handler, relay_config, serve_target

FORMATS = ("text", "json")


class _Lines(io.StringIO):
    """The log stream: wakes whoever waits for more lines."""

    def __init__(self) -> None:
        super().__init__()
        self.grew = trio.Event()

    def write(self, text: str) -> int:
        written = super().write(text)
        self.grew.set()
        self.grew = trio.Event()
        return written

    def access_lines(self) -> list[str]:
        return [line for line in self.getvalue().splitlines() if "wstunnel.access" in line]

    async def wait_access_lines(self, count: int) -> list[str]:
        while len(self.access_lines()) < count:
            await self.grew.wait()
        return self.access_lines()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide loggers: put them back."""
    saved = []
    for name in ("wstunnel", "wstunnel.access"):
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.level, logger.propagate))
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def _parse(line: str, log_format: str) -> dict[str, Any]:
    """One access line as a dict of its fields (text ``-`` is None)."""
    if log_format == "json":
        record: dict[str, Any] = json.loads(line)
        assert record["logger"] == "wstunnel.access" and record["level"] == "info"
        return record
    head, _, rest = line.partition(" INFO wstunnel.access: channel ")
    assert head.endswith("Z"), line
    fields: dict[str, Any] = {}
    for item in _split_text(rest):
        key, _, value = item.partition("=")
        fields[key] = None if value == "-" else json.loads(value) if value.startswith('"') \
            else value
    return fields


def _split_text(text: str) -> list[str]:
    """key=value items; a quoted value may hold spaces."""
    items, current, quoted = [], "", False
    for char in text:
        if char == " " and not quoted:
            items.append(current)
            current = ""
            continue
        if char == '"' and not current.endswith("\\"):
            quoted = not quoted
        current += char
    return [*items, current]


def _normal(fields: dict[str, Any]) -> dict[str, Any]:
    """Field values as text, as both formats can be compared."""
    return {key: None if fields[key] is None else str(fields[key]) for key in FIELDS}


@dataclass
class _Tunnel:
    """A relay and an agent run by ``run_service``, both logging to ``lines``."""

    lines: _Lines
    agent_port: int
    relay_port: int
    stop: list[trio.Event] = field(default_factory=list)


async def _start(nursery: trio.Nursery, log_format: str, target_host: str, target_port: int,
                 access_log: str = "on") -> _Tunnel:
    lines = _Lines()
    setup_logging("warning", log_format, stream=lines, access_log=access_log)
    relay_stop, agent_stop = trio.Event(), trio.Event()
    rconf = relay_config(access_log=access_log)
    bound = await nursery.start(partial(run_service, run_relay, rconf, shutdown=relay_stop))
    relay_port = bound[0][1]
    from wstunnel.agent import run_agent

    forward = Forward(LOOPBACK, 0, target_host, target_port, name="web")
    aconf = agent_config(relay_port, [], forwards=(forward,), access_log=access_log)
    agent_bound = await nursery.start(partial(run_service, run_agent, aconf,
                                              shutdown=agent_stop))
    return _Tunnel(lines, agent_bound[0][0][1], relay_port, [relay_stop, agent_stop])


def _by_side(lines: list[str], log_format: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the relay's line, the agent's line): the relay's names the agent."""
    parsed = [_parse(line, log_format) for line in lines]
    relay = [p for p in parsed if p["agent"] is not None]
    agent = [p for p in parsed if p["agent"] is None]
    assert len(relay) == 1 and len(agent) == 1, lines
    return relay[0], agent[0]


@pytest.mark.parametrize("log_format", FORMATS)
async def test_a_clean_channel_gives_one_line_on_each_side(log_format: str) -> None:
    """Who (agent, forward, source), where (host, port, the address dialled), how much
    each way (up: client to destination), how long, and `end=clean`: one line each."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            tunnel = await _start(nursery, log_format, LOOPBACK, echo)
            client = await trio.open_tcp_stream(LOOPBACK, tunnel.agent_port)
            host, port = client.socket.getsockname()[:2]
            client_address = f"{host}:{port}"
            await client.send_all(b"hello")
            await client.send_eof()
            received = b""
            async for data in client:
                received += data
            await client.aclose()
            relay, agent = _by_side(await tunnel.lines.wait_access_lines(2), log_format)
            nursery.cancel_scope.cancel()
    assert received == b"hello"
    same = {"kind": "tcp", "channel": "1", "host": LOOPBACK, "port": str(echo),
            "bytes_up": "5", "bytes_down": "5", "end": "clean", "reason": None, "detail": None}
    for line in (relay, agent):
        assert {key: _normal(line)[key] for key in same} == same
        assert 0 <= float(line["duration"]) < 10
    assert relay["agent"] == "anonymous" and agent["agent"] is None
    assert relay["dialled"] == f"{LOOPBACK}:{echo}" and agent["dialled"] is None
    assert agent["source"] == client_address
    assert relay["source"].startswith(f"{LOOPBACK}:")  # the agent's address


async def _reset_at_once(stream: trio.SocketStream) -> None:
    """Read the first bytes, then reset the connection (RST)."""
    await stream.receive_some()
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


@pytest.mark.parametrize("log_format", FORMATS)
async def test_a_destination_reset_is_local_on_the_relay_and_the_peers_on_the_agent(
        log_format: str) -> None:
    """The destination resets: the relay's line says it reset the channel itself
    (its local socket was reset), the agent's that its peer did; both give the code."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, _reset_at_once)
            tunnel = await _start(nursery, log_format, LOOPBACK, target)
            client = await trio.open_tcp_stream(LOOPBACK, tunnel.agent_port)
            await client.send_all(b"GET / HTTP/1.0\r\n\r\n")
            with pytest.raises(trio.BrokenResourceError):
                async for _ in client:
                    pass
            await trio.aclose_forcefully(client)
            relay, agent = _by_side(await tunnel.lines.wait_access_lines(2), log_format)
            nursery.cancel_scope.cancel()
    assert (relay["end"], relay["reason"]) == ("reset_local", "connection_reset")
    assert "the destination reset the connection" in relay["detail"]
    assert (agent["end"], agent["reason"]) == ("reset_peer", "connection_reset")
    assert "reset by the peer" in agent["detail"]
    assert str(relay["bytes_up"]) == str(agent["bytes_up"]) == "18"


@pytest.mark.parametrize("log_format", FORMATS)
async def test_a_refused_open_gives_the_reason_on_both_sides(log_format: str) -> None:
    """The relay's policy refuses the destination: `end=refused`, the OPEN_FAILED reason
    (forbidden) and its text, nothing dialled, no bytes."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            tunnel = await _start(nursery, log_format, "192.0.2.1", 80)  # not allowed
            client = await trio.open_tcp_stream(LOOPBACK, tunnel.agent_port)
            with pytest.raises(trio.BrokenResourceError):
                await client.send_all(b"x")
                async for _ in client:
                    pass
            await trio.aclose_forcefully(client)
            relay, agent = _by_side(await tunnel.lines.wait_access_lines(2), log_format)
            nursery.cancel_scope.cancel()
    for line in (relay, agent):
        assert (line["end"], line["reason"]) == ("refused", "forbidden"), line
        assert line["host"] == "192.0.2.1" and str(line["port"]) == "80"
        assert line["dialled"] is None and str(line["bytes_down"]) == "0"
        assert "allow" in line["detail"], line  # the relay's text says what rule is missing


@pytest.mark.parametrize("access_log", ["off", "on"])
async def test_off_writes_nothing(access_log: str) -> None:
    """`access_log: off` (the default): no access line at all, even at debug level,
    once both roles have stopped (``on``: the same run gives its two lines)."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            async with trio.open_nursery() as roles:
                tunnel = await _start(roles, "text", LOOPBACK, echo, access_log=access_log)
                logging.getLogger("wstunnel").setLevel(logging.DEBUG)
                async with await trio.open_tcp_stream(LOOPBACK, tunnel.agent_port) as client:
                    await client.send_all(b"hello")
                    await client.send_eof()
                    async for _ in client:
                        pass
                for stop in tunnel.stop:
                    stop.set()
            nursery.cancel_scope.cancel()
    assert len(tunnel.lines.access_lines()) == (0 if access_log == "off" else 2)


# ------------------------------------------------------------- the real program

async def _one_clean_channel(port: int) -> None:
    async with await trio.open_tcp_stream(LOOPBACK, port) as client:
        await client.send_all(b"ping")
        await client.send_eof()
        async for _ in client:
            pass


async def _wait_lines(path: Path, count: int) -> list[str]:
    """The file's lines once it has ``count`` (a file write has no event to wait for)."""
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        await trio.sleep(0.01)


async def test_the_file_is_reopened_on_sighup_and_sigusr1(tmp_path: Path) -> None:
    """logrotate renames the file and signals: the next lines go to a new file at the
    configured path, and the renamed one keeps exactly what was written before."""
    path = tmp_path / "access.log"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            async with relay_process("--access-log", str(path)) as (relay, relay_port), \
                    agent_process(relay_port, echo) as (_, local_port):
                for number, signum in enumerate((signal.SIGHUP, signal.SIGUSR1), 1):
                    await _one_clean_channel(local_port)
                    await _wait_lines(path, 1)
                    path.rename(tmp_path / f"access.log.{number}")
                    relay.process.send_signal(signum)
                    await relay.wait_for(b"%s received" % signal.Signals(signum).name.encode())
                await _one_clean_channel(local_port)
                await _wait_lines(path, 1)
            nursery.cancel_scope.cancel()
    for name in ("access.log.1", "access.log.2", "access.log"):
        lines = (tmp_path / name).read_text().splitlines()
        assert len(lines) == 1, (name, lines)
        assert " INFO wstunnel.access: channel agent=anonymous " in lines[0]
        assert " bytes_up=4 bytes_down=4 " in lines[0] and " end=clean " in lines[0]
