"""What the agent says when its relay URL or its forwards are wrong (issue 15, part 4).

Each test points the agent at a real peer on 127.0.0.1 that is not what the URL
promises (a Python web server, a TLS relay for ws://, a plain relay for wss://,
nginx's TLS port, a SIGSTOPped relay process, a listener whose accept queue is
full) or gives it a forward it cannot bind, and checks the one line it logs: it
names what is really there and what to change.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import trio

from wstunnel.agent import run_agent
from wstunnel.config import Forward, RelayTLS
from wstunnel.service.reload import ReloadRequest

from ..log_watch import LogWatch
from ..real_peers import Pki, foreground, free_port, nginx, peer_dir
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_handler,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
)

ROOT = Path(__file__).resolve().parents[3]
TIMEOUT = 20
WEB_SERVER = "this is a web server, not a wstunnel relay: check the relay URL's host, port and path"
STALLED = "is it overloaded or stopped? a firewall or proxy may also be holding the request"


async def first_failure(relay_url: str, logs: LogWatch, **overrides: object) -> str:
    """Run an agent against ``relay_url`` until it logs its first failed attempt."""
    async with trio.open_nursery() as nursery:
        await start_agent(nursery, agent_config(0, [9], relay=relay_url, **overrides))
        line = await logs.wait_for("(attempt 1)")
        nursery.cancel_scope.cancel()
    assert "\n" not in line
    return line


# ------------------------------------------------ something else at the URL


@pytest.mark.parametrize("path", ["/tunnel", "/"])
async def test_a_plain_web_server_is_called_a_web_server(path: str, logs: LogWatch) -> None:
    """python -m http.server answering 404 (/tunnel) or 200 (/) to the upgrade: the
    agent says a web server answered, not a relay, and to check host, port and path."""
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", LOOPBACK]
    with peer_dir() as directory, foreground(argv, "http.server", port, directory / "log"):
        with trio.fail_after(TIMEOUT):
            line = await first_failure(f"ws://{LOOPBACK}:{port}{path}", logs)
    assert f"ws://{LOOPBACK}:{port}{path}: got " in line and "from SimpleHTTP/" in line
    assert WEB_SERVER in line


async def test_a_relay_asked_at_the_wrong_path_is_still_called_a_relay(logs: LogWatch) -> None:
    """The relay's own 404 (for a path that is not its --path) is told apart from a web
    server's: the line says a relay answered and the URL's path is what to fix."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config())
            line = await first_failure(f"ws://{LOOPBACK}:{relay.ports[0]}/elsewhere", logs)
            nursery.cancel_scope.cancel()
    assert "a wstunnel relay answered, but its tunnel is at another path" in line
    assert "the tunnel is at /tunnel" in line and WEB_SERVER not in line


# ------------------------------------------------ the scheme does not match the port


async def test_ws_to_a_tls_relay_suggests_wss(pki: Pki, logs: LogWatch) -> None:
    """ws:// to a relay serving TLS (it closes the plain upgrade without a word): the
    agent finds the port speaks TLS and says to use wss://, blaming no proxy."""
    tls = RelayTLS(str(pki.cert), str(pki.key))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config(tls=tls))
            line = await first_failure(f"ws://{LOOPBACK}:{relay.ports[0]}/tunnel", logs)
            nursery.cancel_scope.cancel()
    assert f"this port speaks TLS (it closed the plain-HTTP upgrade, and answers a TLS hello): " \
           f"use wss://{LOOPBACK}:{relay.ports[0]}/tunnel" in line
    assert "proxy" not in line


async def test_ws_to_nginx_tls_port_suggests_wss(pki: Pki, logs: LogWatch) -> None:
    """ws:// to nginx's TLS port (it answers 400 "plain HTTP request was sent to HTTPS
    port"): the agent says to use wss://, not that a proxy rejected the upgrade."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config())
            with nginx(pki, relay.ports[0]) as front:
                line = await first_failure(f"ws://{LOOPBACK}:{front.port}/tunnel", logs)
            nursery.cancel_scope.cancel()
    assert f"this port speaks TLS (it answered 400: a plain HTTP request sent to a TLS port): " \
           f"use wss://{LOOPBACK}:{front.port}/tunnel" in line
    assert "rejected the upgrade" not in line


async def test_wss_to_a_plain_relay_suggests_ws(logs: LogWatch) -> None:
    """wss:// to a relay without TLS: the line says the relay does not speak TLS there
    and to use ws://, instead of OpenSSL's WRONG_VERSION_NUMBER."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config())
            port = relay.ports[0]
            line = await first_failure(f"wss://{LOOPBACK}:{port}/tunnel", logs)
            nursery.cancel_scope.cancel()
    assert (f"the relay does not speak TLS at {LOOPBACK}:{port} (it answered the TLS hello "
            f"with plain bytes): use ws://{LOOPBACK}:{port}/tunnel") in line
    assert "WRONG_VERSION_NUMBER" not in line


# ------------------------------------------------ a relay that does not answer


@asynccontextmanager
async def stopped_relay(*flags: str) -> AsyncIterator[int]:
    """A relay process (``wstunnel relay``) that is listening, then SIGSTOPped."""
    port = free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "wstunnel", "relay", "--listen", f"{LOOPBACK}:{port}",
         "--no-auth", "--allow", LOOPBACK, *flags], stderr=subprocess.PIPE, cwd=ROOT)
    try:
        seen = b""
        assert process.stderr is not None
        while b"relay listening" not in seen:
            data = await process.stderr.receive_some()
            assert data, seen.decode(errors="replace")
            seen += data
        process.send_signal(signal.SIGSTOP)
        yield port
    finally:
        process.kill()
        process.send_signal(signal.SIGCONT)
        await process.wait()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_a_stopped_relay_is_not_called_a_firewall(
    scheme: str, pki: Pki, logs: LogWatch
) -> None:
    """A SIGSTOPped relay accepts TCP (the kernel does) and never answers: the line says
    it connected and which step got no answer within how long, and what that may mean."""
    flags = ("--tls-cert-file", str(pki.cert), "--tls-key-file", str(pki.key))
    step = "the TLS handshake" if scheme == "wss" else "the upgrade"
    with trio.fail_after(TIMEOUT):
        async with stopped_relay(*(flags if scheme == "wss" else ())) as port:
            line = await first_failure(f"{scheme}://{LOOPBACK}:{port}/tunnel", logs,
                                       handshake_timeout=0.5, ca_file=str(pki.ca))
    assert f"connected, but the relay did not answer {step} within 0.5 s: {STALLED}" in line
    assert "firewall dropping" not in line


async def test_no_tcp_connection_is_told_apart_from_no_answer(logs: LogWatch) -> None:
    """A listener whose accept queue is full drops the SYN: the line says there is no TCP
    connection (not that a connected relay is silent)."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(2)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex((LOOPBACK, port))
            with trio.fail_after(TIMEOUT):
                line = await first_failure(f"ws://{LOOPBACK}:{port}/tunnel", logs,
                                           handshake_timeout=0.5)
        finally:
            for filler in fillers:
                filler.close()
    assert (f"no TCP connection to {LOOPBACK}:{port} within 0.5 s: is the address right? a "
            "firewall may be dropping packets, or the relay's accept queue is full") in line
    assert "connected, but" not in line


# ------------------------------------------------ forwards that cannot be bound


def _as_unprivileged() -> list[str]:
    """A prefix that takes CAP_NET_BIND_SERVICE away from root (nothing for others)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set", "-net_bind_service"]


@pytest.mark.parametrize(("listen", "code", "expected"), [
    ("TAKEN", 1, "forwards[1]: cannot listen on 127.0.0.1:TAKEN (forward to 127.0.0.1:9): "
                 "address already in use \N{EM DASH} stop the program listening there or "
                 "pick another port"),
    ("127.0.0.1:1", 1, "forwards[1]: cannot listen on 127.0.0.1:1 (forward to 127.0.0.1:9): "
                       "permission denied \N{EM DASH} ports below 1024 need root or "
                       "CAP_NET_BIND_SERVICE"),
    ("192.0.2.1:4000", 2, "<command line>: forwards[1]: cannot listen on 192.0.2.1:4000 "
                          "(forward to 127.0.0.1:9): no such address on this machine"),
])
async def test_a_forward_that_cannot_be_bound_stops_the_agent_before_it_connects(
    listen: str, code: int, expected: str
) -> None:
    """The agent process names the forward, why and what to do, exits 1 (2 when the
    configuration cannot work on this machine) and never connects to the relay."""
    with socket.socket() as relay, socket.socket() as taken:
        for sock in (relay, taken):
            sock.bind((LOOPBACK, 0))
            sock.listen(8)
        relay.setblocking(False)
        taken_port = str(taken.getsockname()[1])
        listen = listen.replace("TAKEN", f"127.0.0.1:{taken_port}")
        prefix = _as_unprivileged() if listen.endswith(":1") else []
        argv = [*prefix, sys.executable, "-m", "wstunnel", "agent", "--no-proxy",
                "--relay", f"ws://{LOOPBACK}:{relay.getsockname()[1]}/tunnel",
                "-L", f"{LOOPBACK}:0:{LOOPBACK}:9", "-L", f"{listen}:{LOOPBACK}:9"]
        with trio.fail_after(TIMEOUT):
            result = await trio.run_process(argv, capture_stderr=True, check=False, cwd=ROOT)
        connected = _has_waiting_connection(relay)
    stderr = result.stderr.decode()
    assert not connected, "the agent connected to the relay"
    assert result.returncode == code, stderr
    assert expected.replace("TAKEN", taken_port) in stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1


def _has_waiting_connection(listener: socket.socket) -> bool:
    try:
        connection, _ = listener.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True


async def test_a_reload_that_cannot_bind_names_the_forward_and_keeps_the_rest(
    logs: LogWatch
) -> None:
    """A reload adding a forward whose port is taken is refused as a whole with a line
    naming that forward; the running forward and the session carry on."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            config = agent_config(relay.ports[0], [echo])
            send, receive = trio.open_memory_channel[ReloadRequest](0)
            bound = await nursery.start(partial(run_agent, config, shutdown=trio.Event(),
                                                reloads=receive))
            await logs.wait_for("session up")
            taken = Forward(LOOPBACK, echo, LOOPBACK, echo)  # the echo server's own port
            request = ReloadRequest(replace(config, forwards=(*config.forwards, taken)))
            await send.send(request)
            await request.done.wait()
            async with await trio.open_tcp_stream(LOOPBACK, bound[0][0][1]) as stream:
                await stream.send_all(b"still here")
                assert await stream.receive_some() == b"still here"
            nursery.cancel_scope.cancel()
    assert request.error == (
        f"forwards[1]: cannot listen on {LOOPBACK}:{echo} (forward to {LOOPBACK}:{echo}): "
        f"address already in use \N{EM DASH} stop the program listening there or pick another "
        f"port (ss -ltnp 'sport = :{echo}' shows which); kept the old forwards")
    assert not any("reconnecting" in line for line in logs.lines)
