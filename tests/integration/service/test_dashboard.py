"""The dashboard on the metrics listener: over HTTP, and in a real headless browser."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from wstunnel.addresses import HostPort
from wstunnel.agent import run_agent
from wstunnel.config import Forward, RelayTLS
from wstunnel.relay import run_relay
from wstunnel.security.allow_rule import AllowRule
from wstunnel.service import dashboard_server
from wstunnel.service.dashboard_server import serve_metrics
from wstunnel.service.dashboard_status import status_document
from wstunnel.service.metrics import TunnelStats

from ..headless import CHROMIUM, Tab, open_tab
from ..process_helpers import relay_process
from ..real_peers import Pki
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_handler,
    expect_reset,
    relay_config,
    serve_target,
)

FORBIDDEN = "192.0.2.1"  # TEST-NET-1: never in the relays' allow rules here
AUTH = "Basic " + base64.b64encode(b"ops:s3cret").decode()


async def _get(port: int, path: str, authorization: str | None = AUTH
               ) -> tuple[int, dict[str, str], bytes]:
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n"
    if authorization:
        request += f"Authorization: {authorization}\r\n"
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all((request + "\r\n").encode())
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status.split()[1]), headers, body


async def _echo(stream: trio.SocketStream, size: int) -> None:
    await stream.send_all(b"x" * size)
    got = 0
    while got < size:
        got += len(await stream.receive_some())


def _auth_file(tmp_path: Path) -> str:
    path = tmp_path / "metrics.users"
    path.write_text("# dashboard users\nops:s3cret\n")
    return str(path)


async def test_page_and_status_over_http_behind_basic_auth(tmp_path: Path) -> None:
    """Without credentials every path answers 401 with a Basic challenge. With them,
    / is the self-contained page (a CSP allowing nothing external) and /api/status
    shows the session (agent, source, transport, TLS), its bytes and rate, and a
    refused open with its reason and destination; /metrics still answers."""
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            stats = TunnelStats("relay")
            config = relay_config(allow=(AllowRule.parse(f"{LOOPBACK}:{echo}"),))
            relay = await nursery.start(partial(run_relay, config, shutdown=trio.Event(),
                                                stats=stats))
            forwards = (Forward(LOOPBACK, 0, LOOPBACK, echo), Forward(LOOPBACK, 0, FORBIDDEN, 9))
            agent = await nursery.start(partial(
                run_agent, agent_config(relay[0][1], [], forwards=forwards),
                shutdown=trio.Event()))
            metrics = await nursery.start(partial(serve_metrics, stats, HostPort(LOOPBACK, 0),
                                                  auth_file=_auth_file(tmp_path)))
            port = metrics[0][1]
            for path in ("/", "/api/status", "/metrics"):
                status, headers, _ = await _get(port, path, None)
                assert status == 401 and headers["www-authenticate"].startswith("Basic realm=")
            wrong = "Basic " + base64.b64encode(b"ops:wrong").decode()
            assert (await _get(port, "/", wrong))[0] == 401
            status, headers, page = await _get(port, "/")
            assert status == 200 and headers["content-type"].startswith("text/html")
            assert headers["content-security-policy"].startswith("default-src 'none'")
            assert b"<canvas" in page and b"api/status" in page and b"://" not in page
            async with await trio.open_tcp_stream(LOOPBACK, agent[0][0][1]) as stream:
                stats.sample()
                await _echo(stream, 100_000)
                async with await trio.open_tcp_stream(LOOPBACK, agent[1][0][1]) as refused:
                    await expect_reset(refused, b"x")
                await _echo(stream, 1)  # (the relay has processed the refusal)
                stats.sample()
                status, headers, body = await _get(port, "/api/status")
            assert status == 200 and headers["content-type"] == "application/json"
            document = json.loads(body)
            [session] = document["sessions"]
            assert session["agent"] == "anonymous" and session["peer"].startswith(LOOPBACK)
            assert (session["transport"], session["tls"]) == ("websocket", False)
            assert session["bytes_in"] == 100_001 and session["rate_in"] > 0
            assert session["channels_open"] == 1 and session["channels_total"] == 2
            assert document["history"]["points"][-1][2] > 0
            [refusal] = document["refusals"]["recent"]
            assert (refusal["reason"], refusal["destination"]) == ("forbidden", f"{FORBIDDEN}:9")
            assert document["refusals"]["by_reason"] == {"forbidden": 1}
            assert (await _get(port, "/metrics"))[0] == 200
            assert (await _get(port, "/nowhere"))[0] == 404
            nursery.cancel_scope.cancel()


async def _status_line(port: int, request: bytes) -> bytes:
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(request)
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
    return response.partition(b"\r\n")[0]


async def test_metrics_answers_carry_a_reason_and_survive_any_password(tmp_path: Path) -> None:
    """Every answer of the metrics listener has its reason phrase (curl -v, proxies and
    people read the status line); a password that is not UTF-8 is a plain 401, and
    the listener answers the next request as before."""
    not_utf8 = "Basic " + base64.b64encode(b"ops:\xff").decode()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            metrics = await nursery.start(partial(serve_metrics, TunnelStats("relay"),
                                                  HostPort(LOOPBACK, 0),
                                                  auth_file=_auth_file(tmp_path)))
            port = metrics[0][1]
            auth = f"Authorization: {AUTH}\r\n".encode()
            for request, line in [
                (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 401 Unauthorized"),
                (f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: {not_utf8}\r\n\r\n".encode(),
                 b"HTTP/1.1 401 Unauthorized"),
                (b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", b"HTTP/1.1 200 OK"),
                (b"GET /x HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n", b"HTTP/1.1 404 Not Found"),
                (b"DELETE / HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
                 b"HTTP/1.1 405 Method Not Allowed"),
                (b"\x16\x03\x01 not http\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
            ]:
                assert await _status_line(port, request) == line
            nursery.cancel_scope.cancel()


async def test_a_bug_in_one_metrics_request_closes_it_and_the_listener_serves_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error while answering one request (a bug) closes that connection
    and is logged; the process it watches and the next request are untouched."""
    stats = TunnelStats("relay")
    calls = 0
    original = dashboard_server._Site.answer

    def first_one_fails(self: Any, request: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a request nobody foresaw")
        return original(self, request)

    monkeypatch.setattr(dashboard_server._Site, "answer", first_one_fails)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            metrics = await nursery.start(partial(serve_metrics, stats, HostPort(LOOPBACK, 0)))
            request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            assert await _status_line(metrics[0][1], request) == b""
            assert await _status_line(metrics[0][1], request) == b"HTTP/1.1 200 OK"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_wss_session_shows_tls_on_both_sides(pki: Pki, transport: str) -> None:
    """A wss:// session is shown with TLS on the relay's and on the agent's dashboard,
    also when HTTP requests carry it (HTTPS); the agent's names the relay's URL as the
    other end and no agent name."""
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            relay_stats, agent_stats = TunnelStats("relay"), TunnelStats("agent")
            config = relay_config(tls=RelayTLS(str(pki.cert), str(pki.key)))
            relay = await nursery.start(partial(run_relay, config, shutdown=trio.Event(),
                                                stats=relay_stats))
            url = f"wss://{LOOPBACK}:{relay[0][1]}/tunnel"
            agent = await nursery.start(partial(
                run_agent, agent_config(relay[0][1], [echo], relay=url, ca_file=str(pki.ca),
                                        transport=transport),
                shutdown=trio.Event(), stats=agent_stats))
            async with await trio.open_tcp_stream(LOOPBACK, agent[0][0][1]) as stream:
                await _echo(stream, 10)  # (the session is up)
            [on_relay] = status_document(relay_stats)["sessions"]
            [on_agent] = status_document(agent_stats)["sessions"]
            assert on_relay["transport"] == on_agent["transport"] == transport
            assert on_relay["tls"] is True and on_relay["agent"] == "anonymous"
            assert on_agent["tls"] is True and on_agent["agent"] is None
            assert on_agent["peer"] == url
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ in a real browser

_UNTIL = """(async () => {
const until = async (test, what) => {
  const end = Date.now() + 15000;
  while (Date.now() < end) {
    const got = test();
    if (got) return got;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error("timed out waiting for " + what + "; the page shows:\\n" +
                  document.body.innerText.slice(0, 3000));
};
const value = (id) => Number(document.getElementById(id).dataset.value);
"""

SESSION_AND_RATE = _UNTIL + """
return await until(() => {
  const row = document.querySelector('#sessions tr[data-agent="anonymous"]');
  return row && value("rate-out") > 0 &&
    {row: row.innerText, rate: value("rate-out"), bytes: value("bytes-out")};
}, "the session and a rate");
})()"""

RATE_MOVED = _UNTIL + """
return await until(() => value("bytes-out") > %d && value("rate-out") > 0 &&
                   {rate: value("rate-out"), bytes: value("bytes-out")}, "more bytes");
})()"""

REFUSAL = _UNTIL + """
return await until(() => {
  const text = document.getElementById("refusals").innerText;
  return text.includes("forbidden") && text.includes("%s:9") && text;
}, "the refusal");
})()"""

ONLY_ITSELF = """
performance.getEntriesByType("resource").map((entry) => entry.name)
  .filter((name) => !name.startsWith(location.origin))
"""


def _drive(tab: Tab, url: str, refuse: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    """What the page showed, read twice while traffic flows, then after a refusal."""
    tab.call("Page.navigate", url=url)
    tab.wait_event("Page.loadEventFired")
    first = tab.evaluate(SESSION_AND_RATE)
    second = tab.evaluate(RATE_MOVED % first["bytes"])
    trio.from_thread.run(refuse)
    refusals = tab.evaluate(REFUSAL % FORBIDDEN)
    tab.call("Emulation.setDeviceMetricsOverride", width=390, height=800,
             deviceScaleFactor=2, mobile=True)
    overflow = tab.evaluate("document.documentElement.scrollWidth")
    return {"first": first, "second": second, "refusals": refusals, "phone_width": overflow,
            "foreign": tab.evaluate(ONLY_ITSELF)}


async def _traffic(port: int) -> None:
    """Echo 16 KiB every 20 ms through the tunnel until cancelled."""
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        while True:
            await _echo(stream, 16384)
            await trio.sleep(0.02)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium for the headless browser test: "
                    "apt-get install chromium")
async def test_the_page_in_a_headless_browser_updates_by_itself(tmp_path: Path) -> None:
    """In Chromium, the page of a relay started with --metrics and --metrics-auth-file
    shows the agent's session, a rate that moves while traffic flows, and a refused
    open once it happens, with no reload; it loads nothing from elsewhere and fits a
    phone's width."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            async with relay_process("--metrics", f"{LOOPBACK}:0", "--metrics-auth-file",
                                     _auth_file(tmp_path)) as (relay, relay_port):
                match = await relay.wait_for(rb"dashboard on http://127\.0\.0\.1:(\d+)/")
                forwards = (Forward(LOOPBACK, 0, LOOPBACK, echo),
                            Forward(LOOPBACK, 0, FORBIDDEN, 9))
                agent = await nursery.start(partial(
                    run_agent, agent_config(relay_port, [], forwards=forwards),
                    shutdown=trio.Event()))
                nursery.start_soon(_traffic, agent[0][0][1])

                async def refuse() -> None:
                    async with await trio.open_tcp_stream(LOOPBACK, agent[1][0][1]) as stream:
                        await expect_reset(stream, b"x")

                def browse() -> dict[str, Any]:
                    with open_tab(tmp_path / "profile", {"Authorization": AUTH}) as tab:
                        return _drive(tab, f"http://{LOOPBACK}:{int(match[1])}/", refuse)

                seen = await trio.to_thread.run_sync(browse, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()
    assert "anonymous" in seen["first"]["row"] and "websocket" in seen["first"]["row"]
    assert seen["second"]["bytes"] > seen["first"]["bytes"] and seen["second"]["rate"] > 0
    assert "forbidden" in seen["refusals"]
    assert seen["phone_width"] <= 390
    assert seen["foreign"] == []
