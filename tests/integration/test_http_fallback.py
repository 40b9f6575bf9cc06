"""When WebSocket cannot pass: the agent falls back to the HTTP transports by itself.

Real nginx in front of the relay (a location without the Upgrade headers; one
that also buffers both bodies) and real squid as a forward proxy for an http://
relay URL (it refuses CONNECT to the relay's port and forwards plain requests).
Relay, agent and targets run in-process on 127.0.0.1; the programs in between
are stopped in ``finally``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from .log_watch import LogWatch
from .real_peers import LOOPBACK, Pki, haproxy, nginx, squid, substitute
from .security_helpers import account
from .test_http_transports import echo_round_trips
from .tunnel_helpers import (
    agent_config,
    digest_handler,
    echo_handler,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
    upload_and_download,
)

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
SIZE = 64 * MiB
TIMEOUT = 60
USER, PASSWORD = "agent", "s3cret"

# No Upgrade/Connection headers passed on (nginx drops hop-by-hop headers): the
# relay sees a plain GET. /plain streams bodies; /buffered holds both whole.
LOCATIONS = """
    location /plain { proxy_pass http://127.0.0.1:RELAY/tunnel; proxy_http_version 1.1;
                      proxy_buffering off; proxy_request_buffering off; }
    location /buffered { proxy_pass http://127.0.0.1:RELAY/tunnel; proxy_http_version 1.1;
                         proxy_buffering on; proxy_request_buffering on; }
"""


@pytest.fixture
def trust_test_ca(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))


async def _carry_both(ports: list[int]) -> None:
    """SIZE each way, sha256-equal, with an interactive echo beside it."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upload_and_download, ports[0], SIZE, SIZE)
        nursery.start_soon(echo_round_trips, ports[1])


@pytest.mark.parametrize(("path", "transport"), [("/plain", "streaming"),
                                                 ("/buffered", "polling")])
async def test_nginx_without_upgrade_headers(path: str, transport: str, pki: Pki,
                                             trust_test_ca: None, logs: LogWatch) -> None:
    """nginx drops the upgrade: the agent says so and gets through over HTTP streaming;
    where nginx also buffers both bodies, the streaming probe fails and polling carries
    the session. 64 MiB both ways and an echo arrive intact."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            targets = [await serve_target(nursery, digest_handler(SIZE, b"down")),
                       await serve_target(nursery, echo_handler)]
            relay = await start_relay(nursery, relay_config())
            with nginx(pki, relay.ports[0],
                       extra_server=LOCATIONS.replace("RELAY", str(relay.ports[0]))) as front:
                url = f"wss://{LOOPBACK}:{front.port}{path}"
                agent = await start_agent(nursery, agent_config(0, targets, relay=url))
                line = await logs.wait_for("; using HTTP")
                await _carry_both(agent.ports)
                nursery.cancel_scope.cancel()
    assert line.startswith("WebSocket upgrade stripped by nginx/")
    assert "(got 426 Upgrade Required without Upgrade)" in line
    assert f"; using HTTP {transport} (set transport: {transport} or --transport" in line
    if transport == "polling":
        assert "HTTP streaming did not pass (no answer within 3 s" in line


async def test_stdio_behind_a_stripped_upgrade_says_one_line_that_says_how_to_skip_it(
        pki: Pki, trust_test_ca: None) -> None:
    """``--stdio`` (ssh's ProxyCommand, run per connection: the choice is not kept
    between runs) behind nginx that drops the upgrade: one stderr line per run, saying
    which transport carried it and the setting that skips the WebSocket attempt; with
    that setting, nothing at all."""
    agent = [sys.executable, "-m", "wstunnel", "agent", "--no-proxy"]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            with nginx(pki, relay.ports[0],
                       extra_server=LOCATIONS.replace("RELAY", str(relay.ports[0]))) as front:
                argv = [*agent, "--relay", f"wss://{LOOPBACK}:{front.port}/plain",
                        "--stdio", f"{LOOPBACK}:{echo}"]
                runs = [await trio.run_process(command, stdin=b"ping", capture_stdout=True,
                                               capture_stderr=True, check=False, cwd=ROOT)
                        for command in (argv, [*argv, "--transport", "streaming"])]
            nursery.cancel_scope.cancel()
    assert [(run.returncode, run.stdout) for run in runs] == [(0, b"ping")] * 2, runs
    lines = runs[0].stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "WebSocket upgrade stripped by nginx/" in lines[0]
    assert lines[0].endswith("; using HTTP streaming (set transport: streaming or "
                             "--transport streaming to skip the WebSocket attempt)")
    assert runs[1].stderr == b""


async def test_a_front_end_that_forbids_the_upgrade(pki: Pki, trust_test_ca: None,
                                                    logs: LogWatch) -> None:
    """A front end that answers every WebSocket upgrade 403 (a WAF's or proxy's rule:
    the relay itself never answers 403) and passes plain requests: the agent says so
    and carries the session over HTTP streaming instead of retrying the login forever."""
    forbid = """
    location /nows { if ($http_upgrade) { return 403; }
                     proxy_pass http://127.0.0.1:RELAY/tunnel; proxy_http_version 1.1;
                     proxy_buffering off; proxy_request_buffering off; }
"""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            with nginx(pki, relay.ports[0],
                       extra_server=forbid.replace("RELAY", str(relay.ports[0]))) as front:
                url = f"wss://{LOOPBACK}:{front.port}/nows"
                agent = await start_agent(nursery, agent_config(0, [target], relay=url))
                line = await logs.wait_for("; using HTTP")
                await echo_round_trips(agent.ports[0], 3)
                nursery.cancel_scope.cancel()
    assert line.startswith("the WebSocket upgrade was refused (403 Forbidden")
    assert line.endswith("using HTTP streaming (set transport: streaming or --transport "
                         "streaming to skip the WebSocket attempt)")


async def test_polling_through_a_proxy_that_times_out_held_gets(pki: Pki, trust_test_ca: None,
                                                                logs: LogWatch) -> None:
    """nginx with a read timeout (1 s) shorter than the relay holds an idle polling GET
    answers it 504: the agent asks again, and the session (no resume here) and its open
    channel live on instead of ending at every timeout."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config(resume_grace=0))
            with nginx(pki, relay.ports[0], read_timeout="1s") as front:
                url = f"wss://{LOOPBACK}:{front.port}/tunnel"
                agent = await start_agent(nursery, agent_config(0, [target], relay=url,
                                                                transport="polling"))
                async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                    await stream.send_all(b"before")
                    assert await stream.receive_some() == b"before"
                    with trio.fail_after(10):  # (the session used to end here)
                        await logs.wait_for("answered 504: asking again")
                    await stream.send_all(b"after")
                    assert await stream.receive_some() == b"after"
                nursery.cancel_scope.cancel()
    assert not [line for line in logs.lines if "connection lost" in line]


async def test_squid_forwarding_a_plain_http_relay(logs: LogWatch) -> None:
    """squid with Basic auth, refusing CONNECT to the relay's port: the WebSocket cannot
    pass, plain requests forwarded by squid (absolute form, Proxy-Authorization) do."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            targets = [await serve_target(nursery, digest_handler(SIZE, b"down")),
                       await serve_target(nursery, echo_handler)]
            relay = await start_relay(nursery, relay_config())
            with squid(USER, PASSWORD, relay_port=1) as proxy_port:
                config = agent_config(relay.ports[0], targets,
                                      proxy=f"http://{USER}:{PASSWORD}@{LOOPBACK}:{proxy_port}")
                agent = await start_agent(nursery, config)
                line = await logs.wait_for("; using HTTP")
                await _carry_both(agent.ports)
                nursery.cancel_scope.cancel()
    assert line.startswith("the proxy refused the WebSocket's CONNECT (status 403)")


STICKINESS = """    stick-table type string len 64 size 100k expire 24h peers wstunnel_tables
    stick store-response res.hdr(X-Wstunnel-Session)
    stick match req.hdr(X-Wstunnel-Session)
"""


async def _churn(port: int, count: int, parallel: int = 20) -> None:
    """``count`` short connections, ``parallel`` at a time, each echoing once."""
    async def one(index: int) -> None:
        async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
            message = b"channel %d" % index
            await stream.send_all(message)
            echoed = b""
            while len(echoed) < len(message):
                data = await stream.receive_some()
                assert data, "the tunnel closed the connection"
                echoed += data
            assert echoed == message

    for start in range(0, count, parallel):
        async with trio.open_nursery() as nursery:
            for index in range(start, min(count, start + parallel)):
                nursery.start_soon(one, index)


@pytest.mark.parametrize("transport", ["polling", "streaming"])
@pytest.mark.parametrize("sticky", [True, False], ids=["sticky", "not-sticky"])
async def test_haproxy_two_relays(sticky: bool, transport: str, pki: Pki, trust_test_ca: None,
                                  logs: LogWatch) -> None:
    """haproxy (configs/haproxy-relay.cfg) balances over two relays: with its
    stickiness on X-Wstunnel-Session an HTTP session carries 200 churning channels;
    without it the agent says in one line that the session's requests reached another
    relay and what to configure (it then resumes or reconnects, as luck routes it)."""
    changes = {} if sticky else {STICKINESS: ""}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relays = [await start_relay(nursery, relay_config()) for _ in range(2)]
            with haproxy(pki, [relay.ports[0] for relay in relays], changes) as front:
                config = agent_config(0, [target], relay=f"wss://{LOOPBACK}:{front}/tunnel",
                                      transport=transport)
                agent = await start_agent(nursery, config)
                if sticky:
                    await _churn(agent.ports[0], 200)
                else:
                    line = await logs.wait_for("stickiness")
                nursery.cancel_scope.cancel()
    if not sticky:
        assert "the relay does not know this session" in line and "stickiness" in line
        assert "\n" not in line


@pytest.mark.parametrize("transport", ["streaming", "polling"])
async def test_the_shipped_nginx_config_carries_the_http_transports(
        transport: str, pki: Pki, trust_test_ca: None) -> None:
    """configs/nginx-relay.conf as written passes both HTTP transports (for agents whose
    own side blocks WebSocket): bodies are not buffered, and stay under its body limit."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            targets = [await serve_target(nursery, digest_handler(SIZE, b"down")),
                       await serve_target(nursery, echo_handler)]
            relay = await start_relay(nursery, relay_config())
            with nginx(pki, relay.ports[0]) as front:
                config = agent_config(0, targets, relay=f"wss://{LOOPBACK}:{front.port}/tunnel",
                                      transport=transport)
                agent = await start_agent(nursery, config)
                await _carry_both(agent.ports)
                nursery.cancel_scope.cancel()


def _readme_nginx_upstream(ports: list[int]) -> str:
    """README's nginx map and upstream for several relays, as written there, ports
    filled in."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("map $http_authorization $wstunnel_agent {"):]
    upstream = block.index("upstream wstunnel_relays {")
    block = block[:block.index("}", upstream) + 1]
    return substitute(block, {"127.0.0.1:8081": f"{LOOPBACK}:{ports[0]}",
                              "127.0.0.1:8082": f"{LOOPBACK}:{ports[1]}"}) + "\n"


@pytest.mark.parametrize("transport", ["polling", "streaming"])
async def test_the_readme_nginx_upstream_keeps_an_agent_on_one_relay(
        transport: str, pki: Pki, trust_test_ca: None, logs: LogWatch,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """README's nginx block for several relays (hash on the agent's login) in
    configs/nginx-relay.conf: an HTTP session's requests all reach one relay, 200
    churning channels pass and nobody is told about stickiness."""
    entry, token = account("a1", LOOPBACK)
    monkeypatch.setenv("A1_TOKEN", token)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relays = [await start_relay(nursery, relay_config(
                no_auth=False, allow=(), agents=(entry,))) for _ in range(2)]
            upstream = _readme_nginx_upstream([relay.ports[0] for relay in relays])
            with nginx(pki, 0, upstream=upstream) as front:
                config = agent_config(0, [target], relay=f"wss://{LOOPBACK}:{front.port}/tunnel",
                                      transport=transport, token_env="A1_TOKEN")
                agent = await start_agent(nursery, config)
                await _churn(agent.ports[0], 200)
                nursery.cancel_scope.cancel()
    assert not [line for line in logs.lines if "stickiness" in line]


@pytest.mark.parametrize("transport", ["polling", "streaming"])
async def test_the_readme_nginx_upstream_keeps_an_agent_without_a_token_on_one_relay(
        transport: str, pki: Pki, trust_test_ca: None, logs: LogWatch) -> None:
    """README's nginx block with relays that take agents without a token (``no_auth``):
    no Authorization header, so the hash needs another key; an HTTP session's requests
    still all reach one relay, 200 churning channels pass and nobody is told about
    stickiness."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relays = [await start_relay(nursery, relay_config()) for _ in range(2)]
            upstream = _readme_nginx_upstream([relay.ports[0] for relay in relays])
            with nginx(pki, 0, upstream=upstream) as front:
                config = agent_config(0, [target], relay=f"wss://{LOOPBACK}:{front.port}/tunnel",
                                      transport=transport)
                agent = await start_agent(nursery, config)
                await _churn(agent.ports[0], 200)
                nursery.cancel_scope.cancel()
    assert not [line for line in logs.lines if "stickiness" in line]
