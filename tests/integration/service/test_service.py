"""Service features in-process: reload without drops, metrics, admin socket, status."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from wstunnel.addresses import HostPort
from wstunnel.agent import run_agent
from wstunnel.config import Forward, RelayTLS
from wstunnel.errors import ConfigError
from wstunnel.relay import run_relay
from wstunnel.security.allow_rule import AllowRule
from wstunnel.service.admin import AdminError, format_status, query_status
from wstunnel.service.dashboard_server import serve_metrics
from wstunnel.service.metrics import TunnelStats
from wstunnel.service.metrics_output import render_prometheus
from wstunnel.service.reload import ReloadRequest
from wstunnel.service.runner import run_service

from ..security_helpers import account
from ..tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_exact,
    echo_handler,
    expect_reset,
    relay_config,
    serve_target,
    start_relay,
)


async def _echo_once(stream: trio.abc.Stream, data: bytes) -> None:
    assert await echo_exact(stream, data) == data


async def _reload(reloads: trio.MemorySendChannel[ReloadRequest], config: Any) -> ReloadRequest:
    request = ReloadRequest(config)
    await reloads.send(request)
    await request.done.wait()
    return request


async def test_agent_reload_adds_and_removes_forwards_keeping_session_and_channels() -> None:
    """A reload adds a forward and removes another; the session, the kept forward's
    channel and even the removed forward's open channel carry on untouched."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            config = agent_config(relay.ports[0], [echo, echo])
            send, receive = trio.open_memory_channel[ReloadRequest](0)
            bound = await nursery.start(partial(run_agent, config, shutdown=trio.Event(),
                                                reloads=receive))
            first, second = (b[0][1] for b in bound)
            kept = await trio.open_tcp_stream(LOOPBACK, first)
            orphan = await trio.open_tcp_stream(LOOPBACK, second)
            await _echo_once(kept, b"before")
            await _echo_once(orphan, b"before")
            other_echo = await serve_target(nursery, echo_handler)
            added = Forward(LOOPBACK, 0, LOOPBACK, other_echo)
            new = replace(config, forwards=(config.forwards[0], added))
            request = await _reload(send, new)
            assert request.error is None
            assert request.result[0][0][1] == first  # the kept forward kept its socket
            await _echo_once(kept, b"after")
            await _echo_once(orphan, b"after")
            with pytest.raises(OSError):
                await trio.open_tcp_stream(LOOPBACK, second)
            async with await trio.open_tcp_stream(LOOPBACK, request.result[1][0][1]) as fresh:
                await _echo_once(fresh, b"new forward")
            await kept.aclose()
            await orphan.aclose()
            nursery.cancel_scope.cancel()


async def test_agent_reload_that_cannot_bind_changes_nothing() -> None:
    """A reload whose new listen address is taken is refused as a whole: the old
    forwards keep listening and the removed one is not removed."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            config = agent_config(relay.ports[0], [echo])
            send, receive = trio.open_memory_channel[ReloadRequest](0)
            bound = await nursery.start(partial(run_agent, config, shutdown=trio.Event(),
                                                reloads=receive))
            taken = Forward(LOOPBACK, echo, LOOPBACK, echo)  # the echo server's own port
            request = await _reload(send, replace(config, forwards=(taken,)))
            assert request.error is not None and "cannot listen" in request.error
            async with await trio.open_tcp_stream(LOOPBACK, bound[0][0][1]) as stream:
                await _echo_once(stream, b"still here")
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("broken", [{"token_file": "/nonexistent/agent.token"},
                                    {"token_env": "WSTUNNEL_TEST_UNSET_TOKEN"}])
async def test_agent_reload_the_start_would_refuse_changes_nothing(
        broken: dict[str, str]) -> None:
    """A token source that cannot be read stops ``wstunnel agent`` from starting; a
    reload to it is refused the same way, naming the key, and the forwards stay."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            config = agent_config(relay.ports[0], [echo])
            send, receive = trio.open_memory_channel[ReloadRequest](0)
            bound = await nursery.start(partial(run_agent, config, shutdown=trio.Event(),
                                                reloads=receive))
            other = Forward(LOOPBACK, 0, LOOPBACK, await serve_target(nursery, echo_handler))
            request = await _reload(send, replace(config, forwards=(other,), **broken))
            assert request.error is not None and next(iter(broken)) in request.error
            async with await trio.open_tcp_stream(LOOPBACK, bound[0][0][1]) as stream:
                await _echo_once(stream, b"still here")
            nursery.cancel_scope.cancel()


async def test_relay_policy_reload_applies_to_new_channels_only() -> None:
    """After a reload that forbids the target, a new channel is refused while the
    channel opened before the reload keeps working."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            config = relay_config()
            send, receive = trio.open_memory_channel[ReloadRequest](0)
            relay = await nursery.start(partial(run_relay, config, shutdown=trio.Event(),
                                                reloads=receive))
            agent = await nursery.start(partial(run_agent, agent_config(relay[0][1], [echo]),
                                                shutdown=trio.Event()))
            port = agent[0][0][1]
            old = await trio.open_tcp_stream(LOOPBACK, port)
            await _echo_once(old, b"allowed")
            elsewhere = (AllowRule.parse("192.0.2.1"),)
            assert (await _reload(send, replace(config, allow=elsewhere))).error is None
            async with await trio.open_tcp_stream(LOOPBACK, port) as refused:
                await expect_reset(refused, b"x")  # the relay refused
            await _echo_once(old, b"still allowed")
            await old.aclose()
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------ run_service level

@dataclass
class Notes:
    """A Notifier stand-in recording what would go to systemd."""

    watchdog_interval: float | None = None
    sent: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # the STATUS= texts
    changed: trio.Event = field(default_factory=trio.Event)

    def __getattr__(self, name: str) -> Callable[..., bool]:
        def note(*args: Any) -> bool:
            self.sent.append(name)
            self.texts.extend(arg for arg in args if isinstance(arg, str))
            self.changed.set()
            return True
        return note

    async def wait_for(self, name: str, count: int) -> None:
        while self.sent.count(name) < count:
            self.changed = trio.Event()
            await self.changed.wait()


async def _serve_relay_service(nursery: trio.Nursery, config: Any,
                               upcoming: list[Any]) -> tuple[int, Notes, Any, trio.Event]:
    """A relay under run_service whose reloads load ``upcoming[0]`` (or raise it)."""
    notes = Notes()
    hangup, hangups = trio.open_memory_channel[None](1)

    def load() -> Any:
        if isinstance(upcoming[0], Exception):
            raise upcoming[0]
        return upcoming[0]

    shutdown = trio.Event()
    bound = await nursery.start(partial(run_service, run_relay, config, shutdown=shutdown,
                                        hangups=hangups, load_config=load, notifier=notes))
    return bound[0][1], notes, hangup, shutdown


async def test_invalid_reload_is_refused_and_the_old_config_kept(tmp_path: Path) -> None:
    """A reload whose file does not load is refused (RELOADING=1 then READY=1 with the
    old config still in force); a later valid one applies. STOPPING=1 on shutdown."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            config = relay_config()
            upcoming: list[Any] = [ConfigError("relay.yaml:3: allow[0]: broken")]
            port, notes, hangup, shutdown = await _serve_relay_service(nursery, config, upcoming)
            assert notes.sent == ["ready"]
            agent = await nursery.start(partial(run_agent, agent_config(port, [echo]),
                                                shutdown=trio.Event()))
            await hangup.send(None)
            await notes.wait_for("ready", 2)
            assert [n for n in notes.sent if n != "status"] == ["ready", "reloading", "ready"]
            async with await trio.open_tcp_stream(LOOPBACK, agent[0][0][1]) as stream:
                await _echo_once(stream, b"old policy still allows this")
            upcoming[0] = replace(config, allow=(AllowRule.parse("192.0.2.1"),))
            await hangup.send(None)
            await notes.wait_for("ready", 3)
            async with await trio.open_tcp_stream(LOOPBACK, agent[0][0][1]) as stream:
                await expect_reset(stream, b"x")  # the new policy refuses it
            shutdown.set()
            await notes.wait_for("stopping", 1)
            nursery.cancel_scope.cancel()


async def _http_get(port: int, path: str) -> tuple[int, bytes]:
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the exposition:\n{text}")


async def test_metrics_count_sessions_channels_bytes_and_refusals() -> None:
    """GET /metrics serves the Prometheus text format with the sessions, channels,
    bytes each way and refused opens the relay has seen; other paths get 404."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            stats = TunnelStats("relay")
            config = relay_config(allow=(AllowRule.parse(f"{LOOPBACK}:{echo}"),))
            relay = await nursery.start(partial(run_relay, config, shutdown=trio.Event(),
                                                stats=stats))
            agent = await nursery.start(partial(
                run_agent, agent_config(relay[0][1], [echo, echo + 1 if echo < 65535 else 1]),
                shutdown=trio.Event()))
            metrics = await nursery.start(serve_metrics, stats, HostPort(LOOPBACK, 0))
            async with await trio.open_tcp_stream(LOOPBACK, agent[0][0][1]) as stream:
                await _echo_once(stream, b"x" * 1000)
                async with await trio.open_tcp_stream(LOOPBACK, agent[1][0][1]) as refused:
                    await expect_reset(refused, b"x")
                await _echo_once(stream, b"x" * 1000)  # the relay has processed the refusal
                status, body = await _http_get(metrics[0][1], "/metrics")
            text = body.decode()
            assert status == 200 and "# TYPE wstunnel_bytes_total counter" in text
            assert _value(text, "wstunnel_sessions") == 1
            assert _value(text, "wstunnel_channels_total") == 2
            assert _value(text, "wstunnel_channels_open") == 1
            assert _value(text, 'wstunnel_bytes_total{direction="outbound"}') == 2000
            assert _value(text, 'wstunnel_bytes_total{direction="inbound"}') == 2000
            assert _value(text, 'wstunnel_channel_open_failures_total{reason="forbidden"}') == 1
            for name in ("wstunnel_auth_failures_total", "wstunnel_scheduler_queue_depth",
                         'wstunnel_buffered_bytes{direction="inbound"}'):
                assert _value(text, name) == 0
            assert (await _http_get(metrics[0][1], "/nowhere"))[0] == 404  # (/ is the dashboard)
            nursery.cancel_scope.cancel()


async def test_status_lists_channels_over_a_0600_admin_socket(tmp_path: Path) -> None:
    """The admin socket is mode 0600; `status` shows the session and each open
    channel with its destination and bytes, and the formatted view names them."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            path = str(tmp_path / "admin.sock")
            config = relay_config(admin_socket=path)
            port, _notes, _hangup, _shutdown = await _serve_relay_service(nursery, config, [])
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            agent = await nursery.start(partial(run_agent, agent_config(port, [echo]),
                                                shutdown=trio.Event()))
            async with await trio.open_tcp_stream(LOOPBACK, agent[0][0][1]) as stream:
                await _echo_once(stream, b"y" * 5000)
                status = await trio.to_thread.run_sync(query_status, path)
            (session,) = status["sessions"]
            (channel,) = session["channels"]
            assert channel["destination"] == f"{LOOPBACK}:{echo}"
            assert channel["bytes_sent"] == channel["bytes_received"] == 5000
            text = format_status(status)
            assert f"{LOOPBACK}:{echo}" in text and "4.9 KiB" in text
            nursery.cancel_scope.cancel()


async def test_status_against_a_socket_of_another_program_says_so(tmp_path: Path) -> None:
    """A program on the admin_socket path that answers JSON of another shape (a list):
    `status` says it is not a wstunnel admin socket, no AttributeError."""
    path = str(tmp_path / "other.sock")
    with trio.fail_after(10), trio.socket.socket(trio.socket.AF_UNIX) as listener:
        await listener.bind(path)
        listener.listen()

        async def answer_a_list() -> None:
            conn, _ = await listener.accept()
            with conn:
                await conn.recv(1024)
                await conn.send(b"[1, 2]\n")
                await conn.recv(1024)  # (until the client closes)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_a_list)
            with pytest.raises(AdminError, match="not a wstunnel admin socket"):
                await trio.to_thread.run_sync(query_status, path)


async def test_agent_status_follows_the_session() -> None:
    """The agent's READY=1 carries a STATUS=, and STATUS= changes to "session up" when
    the session comes up and to "no session ... (reconnecting)" when it drops (here
    without resumption: resume_grace 0)."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config(resume_grace=0.0))
            notes = Notes()
            config = agent_config(relay.ports[0], [9], reconnect_min_interval=5.0,
                                  reconnect_max_interval=5.0)
            await nursery.start(partial(run_service, run_agent, config, shutdown=trio.Event(),
                                        notifier=notes))
            assert notes.sent[0] == "ready" and "1 forward" in notes.texts[0]
            while not any(t.startswith("session up to ws://") for t in notes.texts):
                await notes.wait_for("status", notes.sent.count("status") + 1)
            relay.kill()
            while not notes.texts[-1].startswith("no session to ws://"):
                await notes.wait_for("status", notes.sent.count("status") + 1)
            assert notes.texts[-1].endswith("(reconnecting); 1 forward")
            nursery.cancel_scope.cancel()


async def test_agent_metrics_count_channels_per_forward_name() -> None:
    """Each forward's channels are counted under its name (or its command-line form),
    and a forward with no channel yet is already there with 0."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            relay = await nursery.start(partial(run_relay, relay_config(),
                                                shutdown=trio.Event()))
            stats = TunnelStats("agent")
            named = replace(Forward(LOOPBACK, 0, LOOPBACK, echo), name="web")
            config = agent_config(relay[0][1], [], forwards=(
                named, Forward(LOOPBACK, 0, LOOPBACK, echo)))
            agent = await nursery.start(partial(run_agent, config, shutdown=trio.Event(),
                                                stats=stats))
            async with await trio.open_tcp_stream(LOOPBACK, agent[0][0][1]) as stream:
                await _echo_once(stream, b"x" * 100)
                text = render_prometheus(stats)
            assert _value(text, 'wstunnel_forward_channels_total{forward="web"}') == 1
            assert _value(text, 'wstunnel_forward_channels_open{forward="web"}') == 1
            unnamed = f'{{forward="-L {LOOPBACK}:0:{LOOPBACK}:{echo}"}}'
            assert _value(text, "wstunnel_forward_channels_total" + unnamed) == 0
            nursery.cancel_scope.cancel()


async def test_a_restart_only_change_is_kept_out_until_a_restart(
        caplog: pytest.LogCaptureFixture) -> None:
    """A changed ``metrics`` is warned about at each reload and its running value kept;
    writing the running value back is then no change to warn about."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            config = relay_config()
            upcoming: list[Any] = [replace(config, metrics=HostPort(LOOPBACK, 9))]
            _, notes, hangup, shutdown = await _serve_relay_service(nursery, config, upcoming)
            for count, reload in enumerate([upcoming[0], upcoming[0], config], start=2):
                upcoming[0] = reload
                await hangup.send(None)
                await notes.wait_for("ready", count)
            warnings = [r.getMessage() for r in caplog.records if "restart" in r.getMessage()]
            assert warnings == ["'metrics' changed: that takes a restart; keeping none "
                                "(restart the service to apply it)"] * 2
            shutdown.set()
            nursery.cancel_scope.cancel()


async def test_relay_reload_whose_certificate_cannot_load_changes_nothing(
        tmp_path: Path) -> None:
    """A reload naming TLS files that do not load is refused as a whole, as a file that
    does not load is: the relay goes on as before (here plain ws:// on the old path)."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[ReloadRequest](0)
            config = relay_config()
            bound = await nursery.start(partial(run_relay, config, shutdown=trio.Event(),
                                                reloads=receive))
            missing = str(tmp_path / "missing.crt")
            request = await _reload(send, replace(config, path="/new",
                                                  tls=RelayTLS(missing, missing)))
            assert request.error is not None and missing in request.error
            assert (await _http_get(bound[0][1], "/tunnel"))[0] == 426
            assert (await _http_get(bound[0][1], "/new"))[0] == 404
            nursery.cancel_scope.cancel()


async def test_relay_reload_with_agents_does_not_warn_of_missing_allow_rules(
        caplog: pytest.LogCaptureFixture) -> None:
    """With agents the global ``allow`` is always empty (their rules are in
    ``agents[].allow``): a reload says nothing about it, as the start does not."""
    config = relay_config(no_auth=False, allow=(), agents=(account("a", LOOPBACK)[0],))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[ReloadRequest](0)
            await nursery.start(partial(run_relay, config, shutdown=trio.Event(),
                                        reloads=receive))
            assert (await _reload(send, config)).error is None
            assert (await _reload(send, relay_config(allow=()))).error is None
            nursery.cancel_scope.cancel()
    refusing = [r.getMessage() for r in caplog.records if "will be refused" in r.getMessage()]
    assert refusing == ["no 'allow' rules after the reload: every new channel will be refused"]
