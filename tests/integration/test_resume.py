"""Session resumption: connections outlive a broken path between agent and relay.

The path is a forwarder the test cuts (path_cutter.py): every connection
through it reset at once, as when a NAT forgets the mapping or a proxy
restarts. Cuts happen by progress (bytes forwarded), not by time.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import trio

from benchmarks._cutter import PathCutter
from wstunnel.addresses import HostPort
from wstunnel.agent import transports
from wstunnel.agent.connect import open_websocket
from wstunnel.agent.http_polling import RETRY_BUDGET
from wstunnel.config import parse_relay_url
from wstunnel.errors import HandshakeError
from wstunnel.framing import TRANSPORT_HEADER
from wstunnel.replay import RESUMABLE_HEADER, RESUME_HEADER

from .log_watch import LogWatch
from .process_helpers import stop
from .real_peers import free_port, sshd
from .security_helpers import account
from .tunnel_helpers import (
    LOOPBACK,
    agent_config,
    digest_handler,
    echo_exact,
    echo_handler,
    http_status,
    pattern_block,
    receive_until_reset,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
    upload_and_download,
)

MiB = 1 << 20


async def _tunnel_through_cutter(nursery: trio.Nursery, targets: list[int],
                                 **relay: object) -> tuple[PathCutter, list[int]]:
    relay_running = await start_relay(nursery, relay_config(**relay))
    cutter = PathCutter(relay_running.ports[0])
    await nursery.start(cutter.serve)
    agent = await start_agent(nursery, agent_config(cutter.port, targets))
    return cutter, agent.ports


async def test_transfers_both_ways_survive_cuts(carrier: str, logs: LogWatch) -> None:
    """16 MiB each way while the path is cut four times: every byte arrives, in
    order, once (sha256 equal), and the application sees no reset."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            digest = await serve_target(nursery, digest_handler(16 * MiB, b"down"))
            cutter, (port,) = await _tunnel_through_cutter(nursery, [digest])
            for mark in (3, 9, 17, 26):
                cutter.cut_after(mark * MiB)
            await upload_and_download(port, 16 * MiB, 16 * MiB)
            assert cutter.cuts == 4
            assert len([line for line in logs.lines if "session resumed" in line]) >= 8
            assert not any("all reset" in line for line in logs.lines)
            nursery.cancel_scope.cancel()


async def test_an_interactive_channel_carries_on_across_cuts(logs: LogWatch) -> None:
    """An echo keeps answering, on the same connection, across cuts."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            cutter, (port,) = await _tunnel_through_cutter(nursery, [echo])
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                assert await echo_exact(stream, b"first") == b"first"
                for round_ in range(5):
                    cutter.cut()
                    payload = f"round {round_} ".encode() * 100
                    assert await echo_exact(stream, payload) == payload
            assert cutter.connections == 6  # (one carrier per round, resumed each time)
            assert not any("all reset" in line for line in logs.lines)
            nursery.cancel_scope.cancel()


async def test_grace_over_resets_the_channels(logs: LogWatch) -> None:
    """With the path down past resume_grace, the channels are reset, not ended
    cleanly, and both sides say why."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            cutter, (port,) = await _tunnel_through_cutter(nursery, [echo],
                                                           resume_grace=0.5)
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                assert await echo_exact(stream, b"before") == b"before"
                cutter.down = True
                cutter.cut()
                assert await receive_until_reset(stream) == b""
            line = await logs.wait_for("did not resume within resume_grace")
            assert "0.5 s" in line
            await logs.wait_for("all reset")
            nursery.cancel_scope.cancel()


async def test_a_restarted_relay_resets_at_once(logs: LogWatch) -> None:
    """A relay that no longer knows the session (it restarted) says so on the
    first reconnect: the agent resets the channels at once and carries on with a
    fresh session."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            first = await start_relay(nursery, relay_config())
            cutter = PathCutter(first.ports[0])
            await nursery.start(cutter.serve)
            agent = await start_agent(nursery, agent_config(cutter.port, [echo]))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                assert await echo_exact(stream, b"before") == b"before"
                second = await start_relay(nursery, relay_config())
                cutter.target = second.ports[0]  # (the same address, a new process)
                first.kill()
                cutter.cut()
                assert await receive_until_reset(stream) == b""
            line = await logs.wait_for("could not resume the session")
            assert "does not know that session" in line
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                assert await echo_exact(stream, b"after") == b"after"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("grace", [60.0, 0.0])
async def test_resumption_is_offered_only_when_asked_and_allowed(grace: float) -> None:
    """The relay offers a resumable session to an agent that asks (and only if
    resume_grace is not 0); an agent that does not ask (an older one) gets a plain
    session, as before."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config(resume_grace=grace))
            url = parse_relay_url(f"ws://{LOOPBACK}:{relay.ports[0]}/tunnel")
            for ask in (True, False):
                answer: dict[str, str] = {}
                stream, _ = await open_websocket(
                    url, headers=[(RESUME_HEADER, "new")] if ask else [], answer=answer)
                await stream.aclose()
                offered = RESUMABLE_HEADER.lower() in answer
                assert offered == (ask and grace > 0)
            nursery.cancel_scope.cancel()


async def test_a_resume_by_another_agent_is_refused_like_a_bad_login(
        logs: LogWatch) -> None:
    """Resuming someone else's session (a guessed or stolen id, a wrong secret) gets
    the answer a bad token gets."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config())
            url = parse_relay_url(f"ws://{LOOPBACK}:{relay.ports[0]}/tunnel")
            answer: dict[str, str] = {}
            stream, _ = await open_websocket(url, headers=[(RESUME_HEADER, "new")],
                                             answer=answer)
            session_id, _secret, _grace = answer[RESUMABLE_HEADER.lower()].split()
            with pytest.raises(Exception) as info:
                await open_websocket(url, headers=[(RESUME_HEADER, f"{session_id} wrong 0")])
            assert getattr(info.value, "status", None) in (401, 403)
            await logs.wait_for("gave a wrong secret")
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_ssh_keeps_its_session_across_three_cuts(tmp_path: Path, logs: LogWatch) -> None:
    """ssh through a forward to a real sshd: a command printing a counter every 100 ms
    runs to its end across three cuts of the path, with no reconnect of ssh."""
    user = os.environ.get("USER") or "root"
    with sshd(tmp_path) as (ssh_port, key), trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            cutter, (port,) = await _tunnel_through_cutter(nursery, [ssh_port])
            process = await trio.lowlevel.open_process(
                ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes",
                 "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}", "-i", str(key),
                 "-p", str(port), f"{user}@{LOOPBACK}",
                 "for i in $(seq 1 30); do echo $i; sleep 0.1; done"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                assert process.stdout is not None
                seen = b""
                async for data in process.stdout:
                    seen += data
                    lines = seen.count(b"\n")
                    if cutter.cuts < 3 and lines >= 5 + 7 * cutter.cuts:
                        cutter.cut()
                assert await process.wait() == 0
            finally:
                await stop(process)
            assert seen.split() == [str(i).encode() for i in range(1, 31)]
            assert cutter.cuts == 3
            assert not any("all reset" in line for line in logs.lines)
            nursery.cancel_scope.cancel()


async def test_a_list_of_relays_fails_over_and_comes_back_to_the_first(
        logs: LogWatch) -> None:
    """relay: [first, second]: while the first is down the agent uses the second; once
    the first answers again and nothing is open, the agent moves back to it."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            first_port = free_port()
            second = await start_relay(nursery, relay_config())
            urls = tuple(f"ws://{LOOPBACK}:{port}/tunnel" for port in (first_port,
                                                                       second.ports[0]))
            agent = await start_agent(nursery, agent_config(0, [echo], relay=urls))
            await logs.wait_for(f"session up to ws://{LOOPBACK}:{second.ports[0]}/tunnel")
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                assert await echo_exact(stream, b"via the second") == b"via the second"
            await start_relay(nursery, relay_config(listen=HostPort(LOOPBACK, first_port)))
            await logs.wait_for("the preferred relay")
            await logs.wait_for(f"session up to ws://{LOOPBACK}:{first_port}/tunnel")
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                assert await echo_exact(stream, b"via the first") == b"via the first"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("transport", ["streaming", "polling"])
async def test_sessions_over_the_http_transports_resume_too(transport: str,
                                                            logs: LogWatch) -> None:
    """The same over the HTTP transports (where a WebSocket cannot pass). A cut breaks
    streaming's two long requests and the session resumes over new ones. Polling
    sends a request whose connection broke again on a new connection, for a few
    seconds (RETRY_BUDGET); when the path stays down past those retries (the second
    cut here), the session resumes. The cuts land in the middle of requests and
    answers: nothing is lost or repeated. (The default keepalive, 20 s, beyond the
    time allowed: the transfer must not need a ping to get going again.)"""
    with trio.fail_after(15 + RETRY_BUDGET):
        async with trio.open_nursery() as nursery:
            digest = await serve_target(nursery, digest_handler(8 * MiB, b"down"))
            relay = await start_relay(nursery, relay_config())
            cutter = PathCutter(relay.ports[0])
            await nursery.start(cutter.serve)
            agent = await start_agent(nursery, agent_config(cutter.port, [digest],
                                                            transport=transport))

            async def back_once_polling_gave_up() -> None:
                await logs.wait_for("giving up on this session's requests")
                cutter.down = False

            def stay_down() -> None:
                if transport == "polling":
                    cutter.down = True
                    nursery.start_soon(back_once_polling_gave_up)
                else:
                    cutter.down_until = trio.current_time() + 0.3
            for mark, then in ((2, None), (7, stay_down), (12, None)):
                cutter.cut_after(mark * MiB, then)
            await upload_and_download(agent.ports[0], 8 * MiB, 8 * MiB)
            assert cutter.cuts == 3
            assert any("session resumed" in line for line in logs.lines)
            assert not any("all reset" in line for line in logs.lines)
            nursery.cancel_scope.cancel()


async def test_a_streaming_resume_over_a_slow_link_waits_for_its_replay(
        logs: LogWatch, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a slow downstream, a resumed streaming session's replay (what was in flight
    at the cut) comes down before the answer to the agent's probe, and takes longer
    than the probe's timeout (here 0.2 s; the replay ~1 s), and than the handshake's
    (0.6 s). The probe waits while bytes come: the first attempt resumes. (It used to
    call that "a proxy buffers the bodies", and then "timed out", at every attempt,
    until the grace was over and every channel reset.)"""
    monkeypatch.setattr(transports, "STREAM_PROBE_TIMEOUT", 0.2)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            digest = await serve_target(nursery, digest_handler(MiB // 2, b"down"))
            relay = await start_relay(nursery, relay_config(resume_grace=4.0))
            cutter = PathCutter(relay.ports[0])
            await nursery.start(cutter.serve)
            agent = await start_agent(nursery, agent_config(cutter.port, [digest],
                                                            transport="streaming",
                                                            handshake_timeout=0.6))
            cutter.downstream_rate = 300_000  # (bytes/s: 256 KiB in flight take ~1 s)
            cutter.cut_after(256 * 1024)
            await upload_and_download(agent.ports[0], 64 * 1024, MiB // 2)
            assert cutter.cuts == 1
            assert not any("attempt 1 failed" in line for line in logs.lines)
            assert any("session resumed" in line for line in logs.lines)
            nursery.cancel_scope.cancel()


async def test_a_cut_that_starts_stripping_upgrades_moves_the_session_to_http(
        logs: LogWatch) -> None:
    """The path comes back through a proxy that no longer passes WebSocket upgrades:
    the session resumes over HTTP streaming, and the open connection carries on."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            cutter, (port,) = await _tunnel_through_cutter(nursery, [echo])
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                assert await echo_exact(stream, b"over websocket") == b"over websocket"
                cutter.strip_upgrades = True
                cutter.cut()
                assert await echo_exact(stream, b"over http") == b"over http"
            line = await logs.wait_for("using HTTP streaming")
            assert "426" in line
            assert any("session resumed" in line for line in logs.lines)
            nursery.cancel_scope.cancel()


async def test_a_connection_made_during_an_outage_waits_only_connect_wait_timeout(
        logs: LogWatch) -> None:
    """A new local connection while the session is resuming waits for it up to
    connect_wait_timeout (here 0.5 s; the grace is 60 s), then is reset; the
    connections the session already carried go on once the path is back. The log
    lines count them in good English ("1 channel", not "1 channels")."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            cutter = PathCutter(relay.ports[0])
            await nursery.start(cutter.serve)
            agent = await start_agent(nursery, agent_config(cutter.port, [echo],
                                                            connect_wait_timeout=0.5))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as old:
                assert await echo_exact(old, b"before") == b"before"
                cutter.down = True
                cutter.cut()
                await logs.wait_for("keeping 1 channel open to resume")
                async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as new:
                    with trio.fail_after(5):
                        assert await receive_until_reset(new) == b""
                cutter.down = False
                assert await echo_exact(old, b"after") == b"after"
            assert any("session resumed; 1 channel carries on" in line for line in logs.lines)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("ticket", ["stale", "malformed"])
async def test_a_resume_that_starts_a_new_session_counts_against_the_limit(
        ticket: str) -> None:
    """A resume the relay cannot honour (an id it no longer knows, or a header it cannot
    read) gets a new session, and a new session counts: an agent at
    max_sessions_per_agent is refused, not let past the limit by a resume header."""
    entry, token = account("a1", LOOPBACK)
    auth = ("Authorization", f"Bearer {token}")
    value = "gone secret 0" if ticket == "stale" else "not a ticket at all"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config(
                no_auth=False, allow=(), agents=(entry,), max_sessions_per_agent=1))
            url = parse_relay_url(f"ws://{LOOPBACK}:{relay.ports[0]}/tunnel")
            first, _ = await open_websocket(url, headers=[auth, (RESUME_HEADER, "new")])
            with pytest.raises(HandshakeError) as info:
                await open_websocket(url, headers=[auth, (RESUME_HEADER, value)])
            assert info.value.status == 429
            await first.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("transport", ["streaming", "polling"])
async def test_an_http_resume_is_not_a_new_session(transport: str, logs: LogWatch,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent at max_sessions_per_agent (its held session still counts) resumes over
    the HTTP transports as over a WebSocket: the resume's opening POST is not refused
    429, and the open connection carries on."""
    entry, token = account("a1", LOOPBACK)
    monkeypatch.setenv("A1_TOKEN", token)
    with trio.fail_after(15 + RETRY_BUDGET):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config(
                no_auth=False, allow=(), agents=(entry,), max_sessions_per_agent=1))
            cutter = PathCutter(relay.ports[0])
            await nursery.start(cutter.serve)
            agent = await start_agent(nursery, agent_config(
                cutter.port, [echo], transport=transport, token_env="A1_TOKEN"))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                assert await echo_exact(stream, b"before") == b"before"
                if transport == "polling":  # (polling retries a broken request first)
                    cutter.down = True
                cutter.cut()
                if transport == "polling":
                    await logs.wait_for("giving up on this session's requests")
                    cutter.down = False
                assert await echo_exact(stream, b"after") == b"after"
            assert any("session resumed" in line for line in logs.lines)
            assert not any("too many sessions" in line or "max_sessions_per_agent" in line
                           for line in logs.lines)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("ticket", ["stale", "malformed"])
async def test_an_http_resume_that_starts_a_new_session_counts_against_the_limit(
        ticket: str) -> None:
    """The same for an HTTP-transport opening request with a resume header: it gets
    429, not a session past the limit."""
    entry, token = account("a1", LOOPBACK)
    auth = ("Authorization", f"Bearer {token}")
    value = "gone secret 0" if ticket == "stale" else "not a ticket at all"
    opening = (f"POST /tunnel HTTP/1.1\r\nHost: x\r\n{TRANSPORT_HEADER}: polling\r\n"
               f"Authorization: Bearer {token}\r\n{RESUME_HEADER}: {value}\r\n"
               f"Content-Length: 0\r\n\r\n").encode()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config(
                no_auth=False, allow=(), agents=(entry,), max_sessions_per_agent=1))
            url = parse_relay_url(f"ws://{LOOPBACK}:{relay.ports[0]}/tunnel")
            first, _ = await open_websocket(url, headers=[auth, (RESUME_HEADER, "new")])
            async with await trio.open_tcp_stream(LOOPBACK, relay.ports[0]) as stream:
                await stream.send_all(opening)
                answer = b""
                while b"\r\n\r\n" not in answer and (data := await stream.receive_some()):
                    answer += data
            assert answer.startswith(b"HTTP/1.1 429 "), answer
            await first.aclose()
            nursery.cancel_scope.cancel()


async def test_a_draining_relay_takes_the_resume_of_its_session(logs: LogWatch) -> None:
    """A relay that drains (shutdown) still takes resumes of its own sessions: a download
    running on it when the agent's path breaks is resumed there and arrives whole,
    while the agent's next session is on the other relay. Once the download is done
    the relay's last session ends and it stops listening, long before drain_timeout.
    (Its listener used to close as the drain began: the resume found nobody, and the
    download was reset.)"""
    size = 32 * MiB  # (well past what windows and socket buffers hold: cut mid-transfer)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            digest = await serve_target(nursery, digest_handler(size, b"down"))
            first = await start_relay(nursery, relay_config(drain_timeout=60.0))
            second = await start_relay(nursery, relay_config())
            cutter = PathCutter(first.ports[0])
            await nursery.start(cutter.serve)
            relays = (f"ws://{LOOPBACK}:{cutter.port}/tunnel",
                      f"ws://{LOOPBACK}:{second.ports[0]}/tunnel")
            agent = await start_agent(nursery, agent_config(0, [digest], relay=relays))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                await stream.send_eof()  # (nothing up: the download starts)
                got = bytearray(await stream.receive_some())
                first.stop.set()
                await logs.wait_for(f"session up to {relays[1]}")
                cutter.cut()
                async for data in stream:
                    got += data
            await first.finished.wait()
            nursery.cancel_scope.cancel()
    assert bytes(got) == _pattern(size) + hashlib.sha256(b"").digest()
    assert cutter.cuts == 1  # (the agent's next session may ask the draining relay first: 503)
    assert sum("resumes its session" in line for line in logs.lines) == 1
    assert not any("all reset" in line for line in logs.lines)
    with pytest.raises(OSError):
        await trio.open_tcp_stream(LOOPBACK, first.ports[0])


async def test_a_draining_relay_answers_a_new_session_503_saying_what_to_do(
        logs: LogWatch) -> None:
    """While a relay drains (a session still has a channel open), a new agent's session
    gets 503 and the agent's log says that the relay is shutting down and what the
    agent does about it; GET /health says "draining" with a 404 (for balancers).
    When the last channel ends the relay stops listening. (The listener used to close
    as the drain began: "connection refused", nothing more.)"""
    health = b"GET /health HTTP/1.1\r\nHost: relay\r\n\r\n"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config(drain_timeout=60.0))
            assert await http_status(relay.ports[0], health) == 200
            holder = await start_agent(nursery, agent_config(relay.ports[0], [echo]))
            async with await trio.open_tcp_stream(LOOPBACK, holder.ports[0]) as held:
                assert await echo_exact(held, b"held") == b"held"
                relay.stop.set()
                await logs.wait_for("relay stopping: draining 1 sessions")
                assert await http_status(relay.ports[0], health) == 404
                await start_agent(nursery, agent_config(relay.ports[0], [echo]))
                line = await logs.wait_for("503 Service Unavailable")
                assert await echo_exact(held, b"still held") == b"still held"
            await relay.finished.wait()
            nursery.cancel_scope.cancel()
    assert line.startswith(f"cannot reach relay ws://{LOOPBACK}:{relay.ports[0]}/tunnel")
    assert ("this relay is shutting down (its sessions finish there) and takes no new "
            "session: the agent tries its next relay if it has one (list several under "
            "relay:), and this one again with backoff until it is back; retrying in ") in line
    with pytest.raises(OSError):
        await trio.open_tcp_stream(LOOPBACK, relay.ports[0])


def _pattern(size: int) -> bytes:
    """What ``digest_handler(size, b"down")`` sends before its digest."""
    block = pattern_block(b"down")
    return (block * (size // len(block) + 1))[:size]
