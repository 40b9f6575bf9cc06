"""run_relay: the relay process around ``Relay``: listeners, this host, reloads, drain.

Starting and stopping a relay (binding or taking systemd's sockets, telling the
policy what this host is, applying reloads, draining at shutdown) happens once
per process; ``Relay`` serves sessions and is built without it in tests. Kept
apart so relay.py stays about sessions and channel opens.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from functools import partial
from typing import Any

import trio

from ..config import RelayConfig
from ..errors import ConfigError
from ..net.local_addresses import local_addresses
from ..security.policy import Listener, this_host
from ..service.metrics import TunnelStats
from ..service.open_files import pending_handshakes_limit
from ..service.reload import ReloadRequest
from . import rate_limits
from .relay import Relay

__all__ = ["run_relay"]

log = logging.getLogger("wstunnel.relay")  # (the relay's one logger: relay.py's too)


async def run_relay(
    config: RelayConfig,
    *,
    shutdown: trio.Event,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    stats: TunnelStats | None = None,
    reloads: trio.MemoryReceiveChannel[ReloadRequest] | None = None,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve until ``shutdown`` is set, then drain and return.

    ``task_status.started`` receives the bound (host, port) pairs. ``sockets``
    (systemd socket activation) replace binding ``config.listen``. Each
    ``ReloadRequest`` from ``reloads`` applies to channels opened after it.
    """
    relay = Relay(config, stats)
    listeners = await _listeners(config, sockets)
    bound = [listener.socket.getsockname()[:2] for listener in listeners]
    _warn_about_access(config)
    async with trio.open_nursery() as connections:
        await connections.start(_known_as_this_host, bound)
        await connections.start(relay.keepalive.run)
        async with trio.open_nursery() as accepting:
            serve = partial(trio.serve_listeners, handler_nursery=connections)
            await accepting.start(serve, relay.handle_connection, listeners)
            scheme = "wss" if config.tls is not None else "ws"
            log.info("relay listening on %s, tunnel path %s (%s://)", _addrs(bound), config.path,
                     scheme)
            if reloads is not None:
                accepting.start_soon(_apply_reloads, relay, reloads)
            task_status.started(bound)
            await shutdown.wait()
            # The listeners stay open while the sessions drain: an agent whose path
            # breaks meanwhile resumes its session here; anything new gets 503.
            log.info("relay stopping: draining %d sessions (up to %g s); new sessions get "
                     "503, resumes of these are still taken", len(relay.sessions),
                     relay.config.drain_timeout)
            await relay.drain(relay.config.drain_timeout)
            accepting.cancel_scope.cancel()
        connections.cancel_scope.cancel()


async def _known_as_this_host(
    bound: list[tuple[str, int]], *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """While the relay runs, its listening sockets and this host's addresses are
    destinations that only a rule naming them exactly unlocks (policy.py)."""
    listeners = [Listener.bound(host, port, "tunnel port") for host, port in bound]
    this_host.set_addresses(local_addresses())
    this_host.add_listeners(listeners)
    own = sorted(str(a) for a in this_host.current.addresses if not a.is_loopback)
    log.info("this host's own addresses (%s) and ports (%s) are refused as destinations "
             "unless an allow rule names them exactly", ", ".join(own) or "none found",
             ", ".join(sorted({str(listener.port) for listener in this_host.current.listeners})))
    try:
        task_status.started()
        await trio.sleep_forever()
    finally:
        this_host.remove_listeners(listeners)


def _warn_about_access(config: RelayConfig) -> None:
    if config.no_auth:
        log.warning("no_auth: ANY client that reaches this port may open channels (allow "
                    "rules still apply); use it for tests and loopback only")
        if not config.allow and config.listen_allow:  # (a relay for -R alone)
            log.info("no 'allow' rules: agents may not open channels of their own (-L, -D); "
                     "their -R listeners per listen_allow work")
        elif not config.allow:
            log.warning("no 'allow' rules: every channel will be refused "
                        "(add --allow HOST[:PORT])")
    elif not config.agents:
        log.warning("no agents configured: every agent will be refused with 401; add "
                    "agents (wstunnel keygen --token NAME) or, for tests, --no-auth")


async def _listeners(
    config: RelayConfig, sockets: list[socket.socket] | None
) -> list[trio.SocketListener]:
    if not sockets:
        return await trio.open_tcp_listeners(config.listen.port, host=config.listen.host)
    log.info("using %d socket(s) from systemd; 'listen' is ignored", len(sockets))
    return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]


async def _apply_reloads(relay: Relay, reloads: trio.MemoryReceiveChannel[ReloadRequest]) -> None:
    """New policy, path and limits for new sessions and channels; open ones keep theirs.

    ``listen`` keeps its old value: the listeners stay bound (the service layer
    logs that the change needs a restart).
    """
    async for request in reloads:
        new = dataclasses.replace(request.config, listen=relay.config.listen)
        try:
            relay.gate.reconfigure(new)  # (first: it refuses TLS files that do not load)
        except ConfigError as exc:
            request.finish(str(exc))
            continue
        relay.config = new
        relay.handshakes.limit = pending_handshakes_limit(new.max_pending_handshakes)
        rate_limits.reconfigure(relay.stats.agent_buckets, relay.config)
        this_host.set_addresses(local_addresses())  # (interfaces may have changed)
        if new.no_auth and not new.allow:  # (with agents, their own allow lists apply)
            log.warning("no 'allow' rules after the reload: every new channel will be refused")
        request.finish()


def _addrs(bound: list[tuple[str, int]]) -> str:
    """``host:port, ...``, an IPv6 host in brackets (as it would be typed)."""
    return ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in bound)
