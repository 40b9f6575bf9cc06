"""The relay's handshake on loopback: it sends, logs and counts what its door decides.

The decisions themselves are unit-tested in tests/unit/relay/test_door.py; here a
real relay (``Relay.handle_connection`` behind a loopback listener) must carry them
out: each answer reaches the client, the door's log lines reach the log (also those
that come after a scrypt check in a worker thread), only failed logins count in
``wstunnel_auth_failures_total``, and a draining relay refuses new sessions.
"""

from __future__ import annotations

import trio

from wstunnel.config import AgentAccount, RelayConfig
from wstunnel.relay import Relay
from wstunnel.relay.upgrade import REFUSAL_LINGER_TIMEOUT
from wstunnel.security.auth import hash_token, new_token, scrypt_hash
from wstunnel.service.metrics import TunnelStats

from ..log_watch import LogWatch
from ..tunnel_helpers import LOOPBACK, http_status, receive_all, relay_config, serving_relay

TIMEOUT = 10.0
TOKEN = new_token("a1")
OLD_TOKEN = new_token("old")


def _config() -> RelayConfig:
    agents = (AgentAccount("a1", hash_token(TOKEN)),
              AgentAccount("old", scrypt_hash(OLD_TOKEN, n=1 << 4)))
    return relay_config(no_auth=False, agents=agents)


def _request(target: str = "/tunnel", token: str | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: relay", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: wstunnel.v1"]
    lines += [f"Authorization: Bearer {token}"] if token is not None else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_answers_reach_the_client_and_only_failed_logins_are_counted(
    logs: LogWatch,
) -> None:
    """404, 401 (hmac and, after its check in a thread, scrypt) and 101 reach the client;
    the failures' warnings reach the log; only the two 401s are counted."""
    stats = TunnelStats("relay")
    with trio.fail_after(TIMEOUT):
        async with serving_relay(Relay(_config(), stats)) as port:
            assert await http_status(port, _request("/elsewhere", TOKEN)) == 404
            assert stats.auth_failures == 0
            assert await http_status(port, _request(token=new_token("a1"))) == 401
            await logs.wait_for("authentication failed from 127.0.0.1: wrong token for "
                                "agent 'a1'")
            assert await http_status(port, _request(token=new_token("old"))) == 401
            await logs.wait_for("wrong token for agent 'old'")
            assert stats.auth_failures == 2
            assert await http_status(port, _request(token=OLD_TOKEN)) == 101
            await logs.wait_for("session up for agent old")
    assert stats.auth_failures == 2


async def test_a_draining_relay_refuses_new_sessions_with_503() -> None:
    """Once the relay drains, a request that reaches it gets 503, however good its token."""
    relay = Relay(_config())
    with trio.fail_after(TIMEOUT):
        async with serving_relay(relay) as port:
            await relay.drain(0.0)
            assert await http_status(port, _request(token=TOKEN)) == 503


async def _status_while_sending(port: int, head: bytes, body: bytes) -> int:
    """The status of a request whose sender writes all of it, then reads to the end."""
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(head + body)  # (a reset here: the answer is lost)
        # (the relay ends its side after the answer: not only once it closes)
        with trio.fail_after(REFUSAL_LINGER_TIMEOUT / 2):
            answer = await receive_all(stream)
        assert answer, "the relay closed without answering"
        return int(answer.split()[1])


async def test_a_refusal_reaches_a_client_that_is_still_sending() -> None:
    """A refused request with bytes still coming (a body the relay will not read, a head
    too large) is answered, then read to its end before the close: closing with unread
    bytes would reset the connection, and the client would lose the answer."""
    filler = b"x" * 500_000
    with trio.fail_after(TIMEOUT):
        async with serving_relay(Relay(_config())) as port:
            assert await _status_while_sending(
                port, _request(token=new_token("a1")), filler) == 401
            too_large = _request(token=TOKEN).replace(b"\r\n\r\n", b"\r\nX-Filler: ", 1)
            assert await _status_while_sending(port, too_large, filler + b"\r\n\r\n") == 431
