"""A role run as a long-lived service: systemd, metrics, admin socket, reload.

Theory of operation
-------------------
``run_service`` wraps ``run_agent``/``run_relay``. Around the role it runs,
in one nursery: the watchdog ping (half of ``WATCHDOG_USEC``, from the trio
loop itself, so a hung loop stops pinging and systemd restarts it), the
metrics HTTP server, the admin socket, a once-a-second rate sampler and the
reloader. It sends ``READY=1`` only after the role's listeners are bound,
keeps ``STATUS=`` current as sessions come and go, sends ``STOPPING=1`` when
``shutdown`` is set and ``RELOADING=1`` ... ``READY=1`` around each reload.

A reload (one item on ``hangups``) re-reads the configuration through
``load_config``; a configuration that fails to load is refused with one
error line and the running one is kept. A valid one is handed to the role
(see reload.py), which changes only what it can change without dropping
anything.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final, NoReturn

import trio

from ..config import AgentConfig, RelayConfig
from ..errors import TunnelError
from .access_log import AccessLog
from .admin import serve_admin
from .dashboard_server import serve_metrics
from .metrics import TunnelStats
from .reload import ReloadRequest, restart_only_changes
from .systemd import Notifier

__all__ = ["run_service"]

log = logging.getLogger("wstunnel.service")

Config = AgentConfig | RelayConfig
Runner = Callable[..., Awaitable[None]]
SAMPLE_INTERVAL: Final = 1.0


async def run_service(
    runner: Runner,
    config: Config,
    *,
    shutdown: trio.Event,
    hangups: trio.MemoryReceiveChannel[None] | None = None,
    load_config: Callable[[], Config] | None = None,
    on_reload: Callable[[Config], None] | None = None,
    notifier: Notifier | None = None,
    sockets: list[socket.socket] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``runner(config, ...)`` as a service until ``shutdown`` is set and it returns.

    Args:
        runner: ``run_agent`` or ``run_relay``.
        hangups: one item per reload request (SIGHUP).
        load_config: re-reads the configuration; raises ConfigError when invalid.
        on_reload: called with each configuration the role accepted.
        notifier: sd_notify sender (one reading the environment when None).
        sockets: socket-activated listeners, for the relay.
    """
    notifier = notifier or Notifier()
    stats = TunnelStats("agent" if isinstance(config, AgentConfig) else "relay")
    _set_access_log(stats, config)
    reload_send, reload_receive = trio.open_memory_channel[ReloadRequest](0)
    options: dict[str, Any] = {"shutdown": shutdown, "stats": stats, "reloads": reload_receive}
    if sockets:
        options["sockets"] = sockets
    async with trio.open_nursery() as nursery:
        if notifier.watchdog_interval is not None:
            nursery.start_soon(_keep_watchdog_fed, notifier, notifier.watchdog_interval)
        await _start_observers(nursery, stats, config)
        nursery.start_soon(_sample_rates, stats)
        role = _Role(runner, config, options)
        bound = await nursery.start(role.run)
        status = _status_text(stats, role, bound)
        stats.on_change.append(lambda: None if notifier.status(status()) else None)
        notifier.ready(status())
        task_status.started(bound)
        if hangups is not None and load_config is not None:
            reloader = _Reloader(role, load_config, on_reload, notifier, stats, status)
            nursery.start_soon(reloader.serve, hangups, reload_send)
        await _first(shutdown.wait, role.done.wait)  # the role may also end by itself
        notifier.stopping(f"stopping: draining up to {role.config.drain_timeout:g} s")
        await role.done.wait()
        nursery.cancel_scope.cancel()
    notifier.close()


class _Role:
    def __init__(self, runner: Runner, config: Config, options: dict[str, Any]) -> None:
        self.runner = runner
        self.config = config
        self.options = options
        self.done = trio.Event()

    async def run(self, *, task_status: Any) -> None:
        try:
            await self.runner(self.config, task_status=task_status, **self.options)
        finally:
            self.done.set()


async def _first(*waits: Callable[[], Awaitable[Any]]) -> None:
    """Return as soon as one of ``waits`` returns."""
    async with trio.open_nursery() as nursery:
        for wait in waits:
            nursery.start_soon(_cancel_after, wait, nursery.cancel_scope)


async def _cancel_after(wait: Callable[[], Awaitable[Any]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


async def _start_observers(nursery: trio.Nursery, stats: TunnelStats, config: Config) -> None:
    if config.metrics is not None:
        await nursery.start(partial(serve_metrics, stats, config.metrics,
                                    auth_file=config.metrics_auth_file))
    if config.admin_socket is not None:
        await nursery.start(serve_admin, stats, config.admin_socket)


def _set_access_log(stats: TunnelStats, config: Config) -> None:
    """An ``AccessLog`` while ``access_log`` is on (where its lines go is logs.py's
    business, set up by the CLI); None, and no cost per channel, while it is off."""
    if config.access_log == "off":
        stats.access_log = None
    elif stats.access_log is None:
        stats.access_log = AccessLog()


async def _keep_watchdog_fed(notifier: Notifier, interval: float) -> NoReturn:
    log.debug("systemd watchdog: pinging every %g s", interval)
    while True:
        notifier.watchdog()
        await trio.sleep(interval)


async def _sample_rates(stats: TunnelStats) -> NoReturn:
    while True:
        stats.sample()
        await trio.sleep(SAMPLE_INTERVAL)


def _status_text(stats: TunnelStats, role: _Role, bound: Any) -> Callable[[], str]:
    if isinstance(role.config, AgentConfig):
        def agent_status() -> str:
            config = role.config
            assert isinstance(config, AgentConfig)
            count = len(config.forwards)
            forwards = f"{count} forward{'s' * (count != 1)}"
            if stats.sessions:
                where = next(iter(stats.sessions)).name  # (the relay it is up to)
                return f"session up to {where}; {forwards}"
            relays = " or ".join(url.url for url in config.relay_urls)
            return f"no session to {relays} (reconnecting); {forwards}"
        return agent_status

    where = ", ".join(f"{h}:{p}" for h, p in bound)

    def relay_status() -> str:
        count = len(stats.sessions)
        return f"listening on {where}; {count} agent session{'s' * (count != 1)}"
    return relay_status


class _Reloader:
    def __init__(self, role: _Role, load_config: Callable[[], Config],
                 on_reload: Callable[[Config], None] | None, notifier: Notifier,
                 stats: TunnelStats, status: Callable[[], str]) -> None:
        self.role = role
        self.load_config = load_config
        self.on_reload = on_reload
        self.notifier = notifier
        self.stats = stats
        self.status = status

    async def serve(self, hangups: trio.MemoryReceiveChannel[None],
                    requests: trio.MemorySendChannel[ReloadRequest]) -> None:
        async for _ in hangups:
            self.notifier.reloading()
            ok = await self._reload(requests)
            self.stats.reloads["ok" if ok else "failed"] += 1
            self.notifier.ready(self.status())

    async def _reload(self, requests: trio.MemorySendChannel[ReloadRequest]) -> bool:
        old = self.role.config
        try:
            new = self.load_config()
        except (TunnelError, OSError) as exc:
            log.error("reload refused, still running the previous configuration: %s", exc)
            return False
        request = ReloadRequest(new)
        await requests.send(request)
        await request.done.wait()
        if request.error is not None:
            log.error("reload refused, still running the previous configuration: %s",
                      request.error)
            return False
        kept = restart_only_changes(old, new)
        for key in kept:
            running = getattr(old, key)
            log.warning("'%s' changed: that takes a restart; keeping %s (restart the service "
                        "to apply it)", key, "none" if running is None else running)
        # What runs is the old value: the next reload compares with it, not with the file's.
        new = dataclasses.replace(new, **{key: getattr(old, key) for key in kept})
        self.role.config = new
        _set_access_log(self.stats, new)
        if self.on_reload is not None:
            self.on_reload(new)
        log.info("configuration reloaded from %s", new.source)
        return True
