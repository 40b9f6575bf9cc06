"""Security end to end on loopback: TLS, pinning, tokens, mutual TLS, reload, rate limits."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import pytest
import trio

from wstunnel.agent.connect import open_websocket
from wstunnel.config import RelayTLS, parse_relay_url
from wstunnel.errors import AuthenticationError, HandshakeError
from wstunnel.relay import run_relay
from wstunnel.security.auth import new_token
from wstunnel.security.tls import CertificateMismatch, ClientTLS, client_context
from wstunnel.service.reload import ReloadRequest

from ..security_helpers import (
    account,
    expired_certificate,
    watch_logs,
    write_ca_and_client,
    write_self_signed,
)
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_handler,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
)

NAMES = ["relay.test", "127.0.0.1"]


def _auth_relay(*accounts: object, **overrides: object) -> object:
    return relay_config(no_auth=False, allow=(), agents=accounts, **overrides)


async def _echo_once(port: int, payload: bytes = b"ping through the tunnel") -> bytes:
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(payload)
        return await stream.receive_some()


async def _closed_without_data(port: int) -> bool:
    """The agent closes (or resets) a local connection it cannot carry, sending nothing."""
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(b"hello?")
        try:
            return await stream.receive_some() == b""
        except trio.BrokenResourceError:
            return True


async def _connect(port: int, settings: ClientTLS, *, pin: str | None = None,
                   server_name: str | None = None, token: str | None = None) -> None:
    """One upgrade to the relay; closes the stream again at once."""
    url = parse_relay_url(f"wss://127.0.0.1:{port}/tunnel")
    headers = [("Authorization", f"Bearer {token}")] if token else []
    stream, _ = await open_websocket(url, ssl_context=client_context(settings), pin=pin,
                                     server_hostname=server_name, headers=headers)
    await trio.aclose_forcefully(stream)


# ------------------------------------------------------------------------ TLS

async def test_right_pin_carries_traffic_over_wss(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A keygen'd relay certificate pinned by the agent: the session comes up and bytes flow."""
    cert = write_self_signed(tmp_path, "relay", NAMES)
    entry, token = account("a1", LOOPBACK)
    monkeypatch.setenv("A1_TOKEN", token)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, _auth_relay(entry, tls=cert.relay_tls))
            agent = await start_agent(nursery, agent_config(
                relay.ports[0], [target], relay=f"wss://127.0.0.1:{relay.ports[0]}/tunnel",
                relay_fingerprint=cert.fingerprint, token_env="A1_TOKEN"))
            assert await _echo_once(agent.ports[0]) == b"ping through the tunnel"
            nursery.cancel_scope.cancel()


async def test_wrong_pin_expired_and_wrong_name_each_say_which(tmp_path: Path) -> None:
    """Wrong pin names both fingerprints; an expired and a wrong-name certificate say so."""
    good = write_self_signed(tmp_path, "good", NAMES)
    other = write_self_signed(tmp_path, "other", NAMES)
    expired = expired_certificate(tmp_path, NAMES)
    misnamed = write_self_signed(tmp_path, "misnamed", ["elsewhere.test"])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ports = {}
            for name, cert in (("good", good), ("expired", expired), ("misnamed", misnamed)):
                relay = await start_relay(nursery, relay_config(tls=cert.relay_tls))
                ports[name] = relay.ports[0]
            with pytest.raises(CertificateMismatch) as wrong_pin:
                await _connect(ports["good"], ClientTLS(relay_fingerprint=other.fingerprint),
                               pin=other.fingerprint)
            assert good.fingerprint in str(wrong_pin.value)
            assert other.fingerprint in str(wrong_pin.value)
            await _connect(ports["good"], ClientTLS(ca_file=str(good.cert)))  # verified: fine
            with pytest.raises(HandshakeError, match="expired"):
                await _connect(ports["expired"], ClientTLS(ca_file=str(expired.cert)))
            with pytest.raises(HandshakeError, match="not valid for '127.0.0.1'"):
                await _connect(ports["misnamed"], ClientTLS(ca_file=str(misnamed.cert)))
            # SNI and Host may differ from the address dialled:
            await _connect(ports["misnamed"], ClientTLS(ca_file=str(misnamed.cert)),
                           server_name="elsewhere.test")
            nursery.cancel_scope.cancel()


async def test_insecure_skip_verify_warns_on_every_connect(tmp_path: Path) -> None:
    """insecure_skip_verify connects to an unverifiable relay, with a warning each time."""
    cert = write_self_signed(tmp_path, "relay", NAMES)
    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config(tls=cert.relay_tls))
            port = relay.ports[0]
            await start_agent(nursery, agent_config(
                port, [1], relay=f"wss://127.0.0.1:{port}/tunnel", insecure_skip_verify=True))
            await logs.wait_for("session up to wss://")
            assert logs.matching("WARNING", "NOT checking the relay's certificate")
            nursery.cancel_scope.cancel()


async def test_sighup_reload_serves_the_new_certificate_and_keeps_sessions(
        tmp_path: Path) -> None:
    """After a reload request new connections get the new certificate; a live session lives on."""
    first = write_self_signed(tmp_path, "relay", NAMES)
    send, receive = trio.open_memory_channel[ReloadRequest](1)
    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            stop = trio.Event()
            config = relay_config(tls=first.relay_tls)
            bound = await nursery.start(partial(
                run_relay, config, shutdown=stop, reloads=receive))
            port = bound[0][1]
            agent = await start_agent(nursery, agent_config(
                port, [target], relay=f"wss://127.0.0.1:{port}/tunnel",
                relay_fingerprint=first.fingerprint))
            assert await _echo_once(agent.ports[0]) == b"ping through the tunnel"
            second = write_self_signed(tmp_path, "relay", NAMES)  # same paths, new contents
            await send.send(ReloadRequest(config))  # what SIGHUP sends: the re-read config
            await logs.wait_for("TLS certificate reloaded")
            await _connect(port, ClientTLS(relay_fingerprint=second.fingerprint),
                           pin=second.fingerprint)
            with pytest.raises(CertificateMismatch):
                await _connect(port, ClientTLS(relay_fingerprint=first.fingerprint),
                               pin=first.fingerprint)
            assert await _echo_once(agent.ports[0], b"old session") == b"old session"
            assert len(logs.matching("session up to")) == 1  # never reconnected
            nursery.cancel_scope.cancel()


async def test_mutual_tls_names_the_agent_by_its_certificate(tmp_path: Path) -> None:
    """With tls.client_ca_file the certificate's CN is the agent; no certificate, no session."""
    cert = write_self_signed(tmp_path, "relay", NAMES)
    ca, client_cert, client_key = write_ca_and_client(tmp_path, "a1")
    entry, _ = account("a1", LOOPBACK)
    certless = type(entry)("a1", None, entry.allow)  # certificate only, no token
    tls = RelayTLS(str(cert.cert), str(cert.key), str(ca))
    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, _auth_relay(certless, tls=tls))
            port = relay.ports[0]
            agent = await start_agent(nursery, agent_config(
                port, [target], relay=f"wss://127.0.0.1:{port}/tunnel",
                relay_fingerprint=cert.fingerprint, client_cert_file=str(client_cert),
                client_key_file=str(client_key)))
            assert await _echo_once(agent.ports[0]) == b"ping through the tunnel"
            assert logs.matching("session up for agent a1")
            with pytest.raises((HandshakeError, trio.BrokenResourceError)):
                await _connect(port, ClientTLS(relay_fingerprint=cert.fingerprint),
                               pin=cert.fingerprint)
            await logs.wait_for("wstunnel.relay", "TLS handshake failed")
            assert len(logs.matching("session up for agent")) == 1
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------- tokens

async def test_wrong_token_gets_401_and_the_agent_says_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rejected token: the agent names itself and waits >= 30 s; nothing reaches the target."""
    entry, _ = account("a1", LOOPBACK)
    monkeypatch.setenv("A1_TOKEN", new_token("a1"))  # right name, wrong secret
    reached = []

    async def target_handler(stream: trio.SocketStream) -> None:
        reached.append(stream)
        await stream.aclose()

    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, target_handler)
            relay = await start_relay(nursery, _auth_relay(entry))
            agent = await start_agent(nursery, agent_config(
                relay.ports[0], [target], token_env="A1_TOKEN", connect_wait_timeout=0.2))
            (line,) = await logs.wait_for("the relay rejected the token for agent a1")
            (retry,) = await logs.wait_for("cannot reach relay", "retrying in")
            assert float(re.search(r"retrying in ([\d.]+) s", retry).group(1)) >= 30  # type: ignore[union-attr]
            assert logs.matching("WARNING", "authentication failed from 127.0.0.1",
                                 "wrong token for agent 'a1'")
            assert await _closed_without_data(agent.ports[0])
            assert reached == []
            nursery.cancel_scope.cancel()


async def test_every_bad_credential_gets_the_same_401_and_never_locks_out_the_right_token(
        ) -> None:
    """Missing, unknown-agent and wrong tokens get one identical 401, as often as they come;
    the right token from the same address still gets in. The log names each failure until
    the source is over its budget, then says so once instead of once per attempt."""
    entry, token = account("a1", LOOPBACK)
    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, _auth_relay(entry))
            url = parse_relay_url(f"ws://127.0.0.1:{relay.ports[0]}/tunnel")
            answers = []
            for header in ([], [("Authorization", f"Bearer {new_token('a1')}")],
                           [("Authorization", f"Bearer {new_token('nobody')}")],
                           [("Authorization", "Basic YTpi")],
                           [("Authorization", f"Bearer {token}x")],
                           *[[("Authorization", f"Bearer {new_token('a1')}")]] * 3):
                with pytest.raises(AuthenticationError) as info:
                    await open_websocket(url, headers=header)
                answers.append((info.value.status, str(info.value)))
            assert len(set(answers)) == 1 and answers[0][0] == 401
            assert "a1" not in answers[0][1] and "token" not in answers[0][1].split("401")[1]
            stream, _ = await open_websocket(url, headers=[("Authorization", f"Bearer {token}")])
            await logs.wait_for("session up for agent a1")
            await stream.aclose()
            assert len(logs.matching("authentication failed from 127.0.0.1")) == 6
            assert len(logs.matching("more failures from 127.0.0.1 are logged at most")) == 1
            nursery.cancel_scope.cancel()


async def test_sessions_per_agent_are_limited() -> None:
    """The agent's (max_sessions_per_agent + 1)-th session is refused with 429; others stay."""
    entry, token = account("a1", LOOPBACK)
    header = [("Authorization", f"Bearer {token}")]
    with watch_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, _auth_relay(entry, max_sessions_per_agent=2))
            url = parse_relay_url(f"ws://127.0.0.1:{relay.ports[0]}/tunnel")
            first, _ = await open_websocket(url, headers=header)
            second, _ = await open_websocket(url, headers=header)
            await logs.wait_for("session up for agent a1", count=2)
            with pytest.raises(HandshakeError) as info:
                await open_websocket(url, headers=header)
            assert info.value.status == 429 and "too many sessions" in str(info.value)
            assert logs.matching("agent a1 already has 2 sessions")
            await first.aclose()
            await logs.wait_for("session down")
            third, _ = await open_websocket(url, headers=header)  # a slot is free again
            for stream in (second, third):
                await stream.aclose()
            nursery.cancel_scope.cancel()
