"""Several relay processes behind real haproxy: the documented way past one core.

configs/haproxy-relay.cfg as shipped (only addresses, certificate and, for the
drain test, an admin socket filled in) in front of two ``wstunnel relay``
processes started from the CLI; agents run in-process. Which relay holds a
session is read from the relays' own logs ("session up", "resumes its session").
README, "Running several relays", is what these tests hold to.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from .process_helpers import Program, relay_process
from .real_peers import LOOPBACK, Pki, haproxy
from .tunnel_helpers import agent_config, echo_handler, serve_target, start_agent

TIMEOUT = 60
#: One attempt through an agent whose relay just died: a connection accepted while
#: the agent still tries to resume on the dead relay may stall (reported; then the
#: next attempt, on the new session, must work).
ECHO_TIMEOUT = 3.0
AGENTS = 4
SESSION_UP = rb"session up for agent"


@pytest.fixture
def trust_test_ca(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's default TLS context (system CAs) trusts the test CA."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))


def _times(pattern: bytes, count: int) -> bytes:
    """A regex matching once ``pattern`` has appeared ``count`` times."""
    return rb"(?:" + pattern + rb"[\s\S]*?){%d}" % count


async def _echo(port: int, payload: bytes = b"through haproxy") -> bool:
    """One connection through an agent's forward echoes ``payload`` within
    ECHO_TIMEOUT; False if it broke or stalled."""
    with trio.move_on_after(ECHO_TIMEOUT):
        return await _echo_once(port, payload)
    return False


async def _echo_once(port: int, payload: bytes) -> bool:
    try:
        async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
            await stream.send_all(payload)
            echoed = b""
            while len(echoed) < len(payload):
                data = await stream.receive_some()
                if not data:
                    return False
                echoed += data
            return echoed == payload
    except (trio.BrokenResourceError, OSError):
        return False


async def _echo_until_ok(port: int) -> None:
    while not await _echo(port):
        await trio.sleep(0.05)  # (the agent is reconnecting; nothing to wait on from here)


def _sessions(relay: Program) -> int:
    return bytes(relay.log).count(SESSION_UP)


async def test_agents_spread_over_two_relay_processes_and_move_when_one_dies(
    pki: Pki, trust_test_ca: None
) -> None:
    """Four agents through haproxy (leastconn): both relays get sessions and carry
    channels; SIGKILL one relay and its agents reconnect, through haproxy, to the
    other, where new connections work."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            async with relay_process() as (first, first_port), \
                    relay_process() as (second, second_port):
                with haproxy(pki, [first_port, second_port]) as front:
                    config = agent_config(0, [target], relay=f"wss://{LOOPBACK}:{front}/tunnel",
                                          reconnect_min_interval=0.2,
                                          reconnect_max_interval=1.0)
                    agents = []
                    for count in range(1, AGENTS + 1):
                        agents.append(await start_agent(nursery, config))
                        assert await _echo(agents[-1].ports[0])
                        assert _sessions(first) + _sessions(second) == count
                    spread = (_sessions(first), _sessions(second))
                    first.kill()
                    await second.wait_for(_times(SESSION_UP, AGENTS))
                    for agent in agents:
                        await _echo_until_ok(agent.ports[0])
                    nursery.cancel_scope.cancel()
    assert spread == (AGENTS // 2, AGENTS // 2), spread


async def test_a_resume_reaches_the_relay_holding_the_session(
    pki: Pki, trust_test_ca: None, tmp_path: Path
) -> None:
    """The relay holding a session is drained in haproxy (no new sessions) and its
    connections cut there: the agent's resume still reaches that relay, by the
    session id haproxy remembered, and the open connection carries on."""
    admin = tmp_path / "haproxy.sock"
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            async with relay_process() as (first, first_port), \
                    relay_process() as (second, second_port):
                with haproxy(pki, [first_port, second_port],
                             {"\nglobal\n": f"\nglobal\n    stats socket {admin} level admin\n"}
                             ) as front:
                    config = agent_config(0, [target], relay=f"wss://{LOOPBACK}:{front}/tunnel",
                                          reconnect_min_interval=0.2,
                                          reconnect_max_interval=1.0)
                    agent = await start_agent(nursery, config)
                    async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                        await stream.send_all(b"before")
                        assert await stream.receive_some() == b"before"
                        holder = first if _sessions(first) else second
                        name = "relay1" if holder is first else "relay2"
                        await _haproxy_command(admin, f"set server relays/{name} state drain")
                        await _haproxy_command(admin, f"shutdown sessions server relays/{name}")
                        with trio.fail_after(15):
                            await holder.wait_for(rb"resumes its session")
                        await stream.send_all(b"after")
                        assert await stream.receive_some() == b"after"
                    nursery.cancel_scope.cancel()


async def _haproxy_command(path: Path, command: str) -> str:
    """One command on haproxy's admin socket; its answer."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(path))
        await sock.send(command.encode() + b"\n")
        answer = b""
        while data := await sock.recv(4096):
            answer += data
    return answer.decode()
