"""Through real proxies: squid and tinyproxy (CONNECT), nginx and haproxy (reverse).

Relay, agent and targets run in-process on 127.0.0.1; the programs in between
are the real ones, configured from templates (the reverse-proxy ones from the
snippets shipped in configs/) with ports chosen at test time, and stopped in
``finally``. A missing program skips its test with the reason.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import trio

from wstunnel.agent.proxy import ProxyDialer, ProxyError
from wstunnel.config.proxy_url import ProxyURL

from .log_watch import LogWatch
from .real_peers import LOOPBACK, Pki, haproxy, nginx, squid, tinyproxy
from .tunnel_helpers import (
    agent_config,
    digest_handler,
    echo_exact,
    echo_handler,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
    upload_and_download,
)

MiB = 1 << 20
USER, PASSWORD = "agent", "s3cret"
TIMEOUT = 60


@pytest.fixture
def trust_test_ca(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's default TLS context (system CAs) trusts the test CA."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "proxy-password"
    path.write_text(PASSWORD + "\n")
    return path


async def echo_once(port: int, payload: bytes = b"ping through the path") -> None:
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        assert await echo_exact(stream, payload) == payload


# ------------------------------------------------------ agent -> CONNECT proxy


@pytest.mark.parametrize("proxy_kind", ["squid", "tinyproxy"])
async def test_64_mib_each_way_through_connect_proxy_and_tls_front(
    proxy_kind: str, pki: Pki, trust_test_ca: None, password_file: Path
) -> None:
    """agent -> proxy (CONNECT, Basic auth from a file) -> nginx (TLS) -> relay: 64 MiB
    each way arrive intact."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, digest_handler(64 * MiB, b"down"))
            relay = await start_relay(nursery, relay_config())
            with nginx(pki, relay.ports[0]) as front:
                proxy = (squid(USER, PASSWORD, front.port) if proxy_kind == "squid"
                         else tinyproxy(USER, PASSWORD))
                with proxy as proxy_port:
                    config = agent_config(
                        0, [target], relay=f"wss://{LOOPBACK}:{front.port}/tunnel",
                        proxy=f"http://{USER}@{LOOPBACK}:{proxy_port}",
                        proxy_password_file=str(password_file))
                    agent = await start_agent(nursery, config)
                    await upload_and_download(agent.ports[0], 64 * MiB, 64 * MiB)
                    nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("proxy_kind", "status"), [("squid", 407), ("tinyproxy", 401)])
async def test_wrong_proxy_password_names_the_proxy_and_the_auth_failure(
    proxy_kind: str, status: int, tmp_path: Path, logs: LogWatch
) -> None:
    """A wrong password: the agent's log names the proxy, the rejected user and the
    status (squid 407, tinyproxy 401), and it keeps retrying."""
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    relay_port = 8443
    with trio.fail_after(TIMEOUT):
        proxy = squid(USER, PASSWORD, relay_port) if proxy_kind == "squid" else tinyproxy(
            USER, PASSWORD)
        with proxy as proxy_port:
            async with trio.open_nursery() as nursery:
                config = agent_config(
                    relay_port, [9], proxy=f"http://{USER}@{LOOPBACK}:{proxy_port}",
                    proxy_password_file=str(wrong))
                await start_agent(nursery, config)
                line = await logs.wait_for("(attempt 2)")
                nursery.cancel_scope.cancel()
    assert f"the proxy at {LOOPBACK}:{proxy_port} rejected the credentials of user " \
           f"'{USER}' ({status} " in line
    assert "not-the-password" not in "\n".join(logs.lines)


async def test_squid_refusals_each_have_their_own_message(tmp_path: Path) -> None:
    """squid: no credentials -> "requires authentication"; CONNECT to a port it does not
    allow -> "refused CONNECT ... only to port 443"; a proxy port nobody serves -> "cannot
    be reached"."""
    allowed = 8443
    with trio.fail_after(TIMEOUT), squid(USER, PASSWORD, allowed) as port:
        anonymous = ProxyDialer(ProxyURL(LOOPBACK, port))
        with pytest.raises(ProxyError, match=r"requires authentication \(407 ") as caught:
            await anonymous(LOOPBACK, allowed)
        assert caught.value.status == 407
        authed = ProxyDialer(ProxyURL(LOOPBACK, port, USER, PASSWORD))
        with pytest.raises(ProxyError, match=(rf"refused CONNECT to {LOOPBACK}:8444 \(403 "
                                              r"Forbidden; many proxies allow CONNECT only "
                                              r"to port 443\)")):
            await authed(LOOPBACK, allowed + 1)
    with trio.fail_after(TIMEOUT), pytest.raises(ProxyError, match="cannot be reached"):
        await ProxyDialer(ProxyURL(LOOPBACK, port))(LOOPBACK, allowed)


# ------------------------------------------------------ nginx in front of the relay


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
async def test_relay_believes_x_forwarded_for_only_from_trusted_nginx(
    trusted: bool, pki: Pki, trust_test_ca: None, logs: LogWatch
) -> None:
    """Through nginx (TLS, WebSocket headers, connecting to the relay from 127.0.0.3) the
    tunnel carries traffic; the relay logs the agent's address (127.0.0.1) from
    X-Forwarded-For only when 127.0.0.3 is in trusted_proxies, and never the address the
    agent itself wrote into the header."""
    proxies = (ipaddress.ip_network("127.0.0.3/32"),) if trusted else ()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config(trusted_proxies=proxies))
            with nginx(pki, relay.ports[0], server_settings="    proxy_bind 127.0.0.3;") as front:
                config = agent_config(0, [target], relay=f"wss://{LOOPBACK}:{front.port}/tunnel",
                                      headers=(("X-Forwarded-For", "198.51.100.7"),))
                agent = await start_agent(nursery, config)
                await echo_once(agent.ports[0])
                line = await logs.wait_for(": session up")
                nursery.cancel_scope.cancel()
    if trusted:
        assert line.startswith(f"{LOOPBACK} via 127.0.0.3:")
    else:
        assert line.startswith("127.0.0.3:") and " via " not in line
    assert not any("198.51.100.7 via" in entry for entry in logs.lines)


BROKEN_LOCATIONS = """
    location /noupgrade { proxy_pass http://127.0.0.1:RELAY/tunnel; proxy_http_version 1.1; }
    location /http10 { proxy_pass http://127.0.0.1:RELAY/tunnel; }
    location /portal { return 200 "welcome to the network"; }
    location /drop { return 444; }
"""


@pytest.mark.parametrize(("path", "expected"), [
    ("/noupgrade", "does not pass WebSocket upgrades: got 426 Upgrade Required from nginx/"),
    ("/http10", "does not pass WebSocket upgrades: got 426 Upgrade Required from nginx/"),
    ("/portal", "got 200 OK from nginx/"),
    ("/drop", "does not pass WebSocket upgrades: closed the connection"),
])
async def test_a_path_that_breaks_websocket_is_explained_in_one_line(
    path: str, expected: str, pki: Pki, trust_test_ca: None, logs: LogWatch
) -> None:
    """nginx locations without the Upgrade headers, speaking HTTP/1.0, answering 200 or
    closing: the agent says what came back, from whom, at which URL, and keeps retrying
    (a 200 is a web server answering, not a path that drops upgrades)."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config())
            broken = BROKEN_LOCATIONS.replace("RELAY", str(relay.ports[0]))
            with nginx(pki, relay.ports[0], extra_server=broken) as front:
                url = f"wss://{LOOPBACK}:{front.port}{path}"
                # (WebSocket only: with auto the agent would get through over HTTP,
                # test_http_fallback.py)
                await start_agent(nursery, agent_config(0, [9], relay=url,
                                                        transport="websocket"))
                line = await logs.wait_for("(attempt 2)")
                nursery.cancel_scope.cancel()
    assert expected in line and "\n" not in line
    if path == "/portal":
        assert f"{url}: got 200" in line and "this is a web server, not a wstunnel relay" in line
    else:
        assert f" at {url}" in line


@pytest.mark.parametrize(("ping_interval", "grace", "survives"),
                         [(0.3, 0.0, True), (30.0, 0.0, False), (30.0, 60.0, True)])
async def test_keepalive_pings_outlive_nginx_idle_cut(
    ping_interval: float, grace: float, survives: bool, pki: Pki, trust_test_ca: None
) -> None:
    """nginx cuts an upgraded connection idle for proxy_read_timeout (here 1 s): with
    pings more frequent than that an idle channel survives 2.5 s of silence; without
    them it is broken, unless the session is resumable (resume_grace), which takes
    the cut for a broken path and resumes through nginx."""
    pings = {"ping_interval": ping_interval, "ping_timeout": 5.0}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config(**pings, resume_grace=grace))
            with nginx(pki, relay.ports[0], read_timeout="1s") as front:
                config = agent_config(0, [target], relay=f"wss://{LOOPBACK}:{front.port}/tunnel",
                                      **pings)
                agent = await start_agent(nursery, config)
                async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                    await stream.send_all(b"hello")
                    assert await stream.receive_some() == b"hello"
                    await trio.sleep(2.5)  # the idle period under test
                    alive = await _still_echoes(stream)
                nursery.cancel_scope.cancel()
    assert alive is survives


async def _still_echoes(stream: trio.SocketStream) -> bool:
    try:
        await stream.send_all(b"again")
        return await stream.receive_some() == b"again"
    except trio.BrokenResourceError:
        return False


# ------------------------------------------------------ haproxy and two relays


async def test_haproxy_moves_the_session_to_the_other_relay(
    pki: Pki, trust_test_ca: None, logs: LogWatch
) -> None:
    """agent -> haproxy (TLS, health checks) -> two relays: killing the relay the session
    is on makes the agent reconnect through haproxy to the other one within its backoff,
    and new connections work. Each relay allows a different target, so which forward
    works tells which relay carries the session."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            targets = [await serve_target(nursery, echo_handler) for _ in range(2)]
            relays = [await start_relay(nursery, relay_config(**_allow(port)))
                      for port in targets]
            with haproxy(pki, [relay.ports[0] for relay in relays]) as front:
                config = agent_config(0, targets, relay=f"wss://{LOOPBACK}:{front}/tunnel",
                                      reconnect_min_interval=0.2, reconnect_max_interval=1.0)
                agent = await start_agent(nursery, config)
                first = await _serving_relay(agent.ports)
                relays[first].kill()
                killed_at = trio.current_time()
                await logs.wait_for("; reconnecting")
                await _echo_until_ok(agent.ports[1 - first])
                moved_after = trio.current_time() - killed_at
                await echo_once(agent.ports[1 - first], b"a new connection")
                nursery.cancel_scope.cancel()
    assert moved_after < 1.0 + 2.0  # the backoff ceiling plus a margin for TLS and checks


async def test_haproxy_passes_http_streaming_keystrokes_at_once(
    pki: Pki, trust_test_ca: None
) -> None:
    """Over HTTP streaming through the shipped haproxy config, an interactive channel's
    small writes go on at once: 10 echoes in well under a second. (Without
    ``option http-no-delay`` haproxy held each small request-body chunk ~200 ms: 2 s.)"""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relays = [await start_relay(nursery, relay_config()) for _ in range(2)]
            with haproxy(pki, [relay.ports[0] for relay in relays]) as front:
                agent = await start_agent(nursery, agent_config(
                    0, [target], relay=f"wss://{LOOPBACK}:{front}/tunnel",
                    transport="streaming"))
                async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                    assert await echo_exact(stream, b"warm up") == b"warm up"
                    with trio.fail_after(1.0):
                        for index in range(10):
                            keystroke = b"keystroke %d" % index
                            assert await echo_exact(stream, keystroke) == keystroke
                nursery.cancel_scope.cancel()


def _allow(port: int) -> dict[str, object]:
    from wstunnel.security.allow_rule import AllowRule

    return {"allow": (AllowRule.parse(f"{LOOPBACK}:{port}"),)}


async def _serving_relay(ports: list[int]) -> int:
    """Index of the forward (= relay) that carries traffic now."""
    while True:
        for index, port in enumerate(ports):
            try:
                await echo_once(port)
                return index
            except (trio.BrokenResourceError, AssertionError):
                continue
        await trio.sleep(0.05)


async def _echo_until_ok(port: int) -> None:
    while True:
        try:
            await echo_once(port)
            return
        except (trio.BrokenResourceError, AssertionError):
            await trio.sleep(0.05)
