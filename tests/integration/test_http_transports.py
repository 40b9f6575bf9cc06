"""The HTTP transports end to end, in-process: the same session over plain requests.

Relay, agent and targets on 127.0.0.1. Forced transports carry bulk data both
ways and an interactive echo; the relay refuses requests for sessions that are
not the agent's; a transport whose connection is cut ends the session like a
lost WebSocket (channels reset, the agent reconnects).
"""

from __future__ import annotations

from functools import partial

import pytest
import trio

from wstunnel import mux
from wstunnel.addresses import HostPort
from wstunnel.agent import run_agent
from wstunnel.framing import SESSION_HEADER, TRANSPORT_HEADER
from wstunnel.protocol import TunnelProtocol
from wstunnel.relay.http_front import MAX_POST_SIZE
from wstunnel.service.metrics import TunnelStats
from wstunnel.service.metrics_output import snapshot

from .log_watch import LogWatch
from .security_helpers import account
from .tunnel_helpers import (
    LOOPBACK,
    agent_config,
    digest_handler,
    echo_handler,
    relay_config,
    serve_target,
    start_relay,
    tunnel,
    upload_and_download,
)

MiB = 1 << 20
TIMEOUT = 30


async def echo_round_trips(port: int, count: int = 20) -> None:
    """An interactive channel: small messages, each echoed before the next."""
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        for index in range(count):
            message = b"keystroke %d" % index
            await stream.send_all(message)
            echoed = b""
            while len(echoed) < len(message):
                data = await stream.receive_some()
                assert data, "the tunnel closed the echo"
                echoed += data
            assert echoed == message


@pytest.mark.parametrize("mode", ["streaming", "polling"])
async def test_bulk_both_ways_beside_an_echo(mode: str, logs: LogWatch) -> None:
    """16 MiB up and down arrive sha256-equal while an echo channel keeps answering."""
    handlers = [digest_handler(16 * MiB, b"down"), echo_handler]
    with trio.fail_after(TIMEOUT):
        async with tunnel(handlers, agent_overrides={"transport": mode}) as (ports, _, _):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload_and_download, ports[0], 16 * MiB, 16 * MiB)
                nursery.start_soon(echo_round_trips, ports[1])


@pytest.mark.parametrize("mode", ["streaming", "polling"])
async def test_a_cut_ends_the_session_and_the_agent_reconnects(mode: str,
                                                              logs: LogWatch) -> None:
    """The relay dies mid-session: once its resume grace is over (1 s here) the open
    channel is reset (no clean EOF), the agent logs the loss, and once a relay listens
    again at the same address the agent is back over the same transport, which its
    status shows."""
    stats = TunnelStats("agent")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config(resume_grace=1.0))
            port = relay.ports[0]
            config = agent_config(port, [target], transport=mode)
            bound = await nursery.start(partial(run_agent, config, shutdown=trio.Event(),
                                                stats=stats))
            local = bound[0][0][1]
            async with await trio.open_tcp_stream(LOOPBACK, local) as stream:
                await stream.send_all(b"before")
                assert await stream.receive_some() == b"before"
                assert [s["transport"] for s in snapshot(stats)["sessions"]] == [mode]
                relay.kill()
                with pytest.raises(trio.BrokenResourceError):
                    while await stream.receive_some():
                        pass
            await logs.wait_for("session to ws://")
            await start_relay(nursery, relay_config(listen=HostPort(LOOPBACK, port)))
            await logs.wait_for(f"({mode}): session up")
            await echo_round_trips(local, 3)
            nursery.cancel_scope.cancel()


async def _raw(port: int, request: bytes) -> bytes:
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(request)
        answer = b""
        while data := await stream.receive_some():
            answer += data
            if b"\r\n\r\n" in answer:
                break
        return answer


async def test_unknown_session_refused_like_a_bad_login(logs: LogWatch) -> None:
    """A request for a session id that does not exist gets the same 401 as a bad token."""
    with trio.fail_after(TIMEOUT):
        async with tunnel([echo_handler]) as (_, relay, _):
            forged = (f"GET /tunnel HTTP/1.1\r\nHost: x\r\n{TRANSPORT_HEADER}: polling\r\n"
                      f"{SESSION_HEADER}: nosuchsession\r\nX-Wstunnel-Seq: 0\r\n\r\n").encode()
            answer = await _raw(relay.ports[0], forged)
            assert answer.startswith(b"HTTP/1.1 401 "), answer


async def _open_session(port: int, token: str, mode: str = "polling") -> str:
    request = (f"POST /tunnel HTTP/1.1\r\nHost: x\r\n{TRANSPORT_HEADER}: {mode}\r\n"
               f"Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n").encode()
    answer = await _raw(port, request)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    head = answer.decode("latin-1")
    start = head.lower().index(f"{SESSION_HEADER.lower()}: ") + len(SESSION_HEADER) + 2
    return head[start:].split("\r\n", 1)[0]


def _poll(session_id: str, token: str) -> bytes:
    return (f"GET /tunnel HTTP/1.1\r\nHost: x\r\n{TRANSPORT_HEADER}: polling\r\n"
            f"Authorization: Bearer {token}\r\n{SESSION_HEADER}: {session_id}\r\n"
            f"X-Wstunnel-Seq: 0\r\n\r\n").encode()


async def test_a_session_id_works_only_with_its_agents_login(logs: LogWatch) -> None:
    """Session ids are bound to the agent that opened the session: the same GET with
    another agent's valid token gets exactly the 401 of a wrong token, while its own
    agent's gets the session's first bytes."""
    alice, alice_token = account("alice", LOOPBACK)
    bob, bob_token = account("bob", LOOPBACK)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config(no_auth=False, agents=(alice, bob)))
            port = relay.ports[0]
            session_id = await _open_session(port, alice_token)
            as_bob = await _raw(port, _poll(session_id, bob_token))
            wrong_token = await _raw(port, _poll(session_id, alice_token[:-2] + "xx"))
            as_alice = await _raw(port, _poll(session_id, alice_token))
            nursery.cancel_scope.cancel()
    assert as_bob.startswith(b"HTTP/1.1 401 ") and as_bob == wrong_token
    assert as_alice.startswith(b"HTTP/1.1 200 "), as_alice
    assert len(session_id) >= 32


async def test_a_garbled_sequence_number_is_refused_and_other_sessions_go_on(
        logs: LogWatch) -> None:
    """An X-Wstunnel-Seq that Python calls a digit but int() refuses ("²", a Latin-1
    byte a proxy may pass) gets 400, and the relay goes on serving the agent's
    session beside it (it used to take the whole relay down)."""
    with trio.fail_after(TIMEOUT):
        async with tunnel([echo_handler], agent_overrides={"transport": "polling"}) as (
                ports, relay, _):
            session_id = await _open_session(relay.ports[0], "any")
            garbled = _poll(session_id, "any").replace(b"Seq: 0", b"Seq: \xb2")
            answer = await _raw(relay.ports[0], garbled)
            assert answer.startswith(b"HTTP/1.1 400 "), answer
            await echo_round_trips(ports[0], 3)


def _post(session_id: str, length: int, *headers: str) -> bytes:
    """A polling POST's head (number 0) announcing a body of ``length`` bytes."""
    return "\r\n".join([
        "POST /tunnel HTTP/1.1", "Host: x", f"{TRANSPORT_HEADER}: polling",
        f"{SESSION_HEADER}: {session_id}", "X-Wstunnel-Seq: 0", f"Content-Length: {length}",
        *headers, "", ""]).encode()


async def _head(stream: trio.SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some()
        assert data, f"closed after {head!r}"
        head += data
    return head


async def test_a_body_waiting_for_100_continue_gets_it(logs: LogWatch) -> None:
    """A client that sends ``Expect: 100-continue`` and waits for the 100 before its
    body (curl waits a second, others longer) gets it at once, then its answer; one
    refused on its head (a body too large) gets the refusal, no 100 first."""
    opening = TunnelProtocol(mux.Role.AGENT, framed=True)
    opening.ping(b"x")
    body = bytes(opening.data_to_send())  # (the agent's first records)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config())
            port = relay.ports[0]
            session_id = await _open_session(port, "any")
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                await stream.send_all(_post(session_id, len(body), "Expect: 100-Continue"))
                with trio.fail_after(0.5):  # (it comes at once, or never)
                    assert await _head(stream) == b"HTTP/1.1 100 Continue\r\n\r\n"
                await stream.send_all(body)
                assert (await _head(stream)).startswith(b"HTTP/1.1 200 ")
            too_large = _post(session_id, MAX_POST_SIZE + 1, "Expect: 100-continue")
            assert (await _raw(port, too_large)).startswith(b"HTTP/1.1 413 ")
            nursery.cancel_scope.cancel()


async def test_a_refusal_reaches_a_client_still_sending_its_body(logs: LogWatch) -> None:
    """A POST refused on its head (too large) while its body comes gets the answer,
    not a reset: the relay reads what still comes (bounded) before it closes."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config())
            port = relay.ports[0]
            session_id = await _open_session(port, "any")
            async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
                await stream.send_all(_post(session_id, MAX_POST_SIZE + 1) + b"x" * 500_000)
                assert (await _head(stream)).startswith(b"HTTP/1.1 413 ")
            nursery.cancel_scope.cancel()


async def test_a_second_streaming_get_for_one_session_is_refused(logs: LogWatch) -> None:
    """Two streaming GETs for one session would split its downstream between them
    (records lost from both): the second one gets 409 while the first is open."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config())
            port = relay.ports[0]
            session_id = await _open_session(port, "any", "streaming")
            get = (f"GET /tunnel HTTP/1.1\r\nHost: x\r\n{TRANSPORT_HEADER}: streaming\r\n"
                   f"{SESSION_HEADER}: {session_id}\r\n\r\n").encode()
            async with await trio.open_tcp_stream(LOOPBACK, port) as first:
                await first.send_all(get)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await first.receive_some()
                assert head.startswith(b"HTTP/1.1 200 "), head
                second = await _raw(port, get)
                assert second.startswith(b"HTTP/1.1 409 "), second
            nursery.cancel_scope.cancel()
