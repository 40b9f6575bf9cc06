"""The agent: local listeners whose connections ride one session to the relay.

Theory of operation: the listeners live for the whole run; the session comes
and goes. ``_maintain_session`` connects, serves the session until it ends,
then reconnects with exponential backoff and jitter. A local connection waits
up to ``connect_wait_timeout`` for a session, opens a channel on it (its first
bytes travel right behind the OPEN) and is spliced until both sides finish.
When the session drops, its channels break and their local sockets are
closed, never left hanging.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import trio

from . import mux, ws
from .config import AgentConfig, Forward, RelayURL
from .errors import ChannelRefused, HandshakeError, SessionClosed
from .forwards import ForwardSet
from .metrics import TunnelStats
from .net.connect import open_websocket, tune_socket
from .net.splice import splice
from .net.transport import TunnelTransport
from .protocol import TunnelProtocol
from .reload import ReloadRequest

__all__ = ["run_agent", "Agent"]

log = logging.getLogger("wstunnel.agent")


class Agent:
    """Session management and local connection handling for one agent."""

    def __init__(self, config: AgentConfig, stats: TunnelStats | None = None) -> None:
        self.config = config
        self.stats = stats or TunnelStats("agent")
        self.relay: RelayURL = config.relay_url
        self.session: TunnelTransport | None = None
        self.stopping = False
        self.reconnects = 0
        self._session_up = trio.Event()
        self._channels = 0
        self._idle = trio.Event()
        self._idle.set()

    # -- the session ----------------------------------------------------------

    async def maintain_session(self) -> None:
        """Keep one session up until cancelled, reconnecting with backoff."""
        failures = 0
        while not self.stopping:
            try:
                transport = await self._connect()
            except (OSError, HandshakeError, trio.TooSlowError) as exc:
                failures += 1
                if getattr(exc, "status", None) in (401, 403):
                    self.stats.auth_failures += 1
                delay = self._backoff(failures)
                log.warning(
                    "cannot reach relay %s (attempt %d): %s; retrying in %.1f s",
                    self.relay.url,
                    failures,
                    _reason(exc),
                    delay,
                )
                await trio.sleep(delay)
                continue
            failures = 0
            reason = await self._serve(transport)
            if self.stopping:
                return
            self.reconnects += 1
            self.stats.reconnects += 1
            log.warning("session to %s down: %s; reconnecting", self.relay.url, reason)
            await trio.sleep(self._backoff(1))

    def _backoff(self, failures: int) -> float:
        config = self.config
        delay = min(
            config.reconnect_max_interval, config.reconnect_min_interval * 2 ** (failures - 1)
        )
        return float(delay) * random.uniform(0.8, 1.0)

    async def _connect(self) -> TunnelTransport:
        config = self.config
        with trio.fail_after(config.handshake_timeout):
            stream, trailing = await open_websocket(self.relay)
        protocol = TunnelProtocol(
            mux.Role.AGENT,
            trailing_data=trailing,
            initial_window=config.initial_window,
            max_chunk_size=config.max_chunk_size,
        )
        return TunnelTransport(
            stream,
            protocol,
            name=self.relay.url,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            stats=self.stats,
        )

    async def _serve(self, transport: TunnelTransport) -> str:
        self.session = transport
        self._session_up.set()
        self.stats.session_started(transport)
        log.info("session up to %s", self.relay.url)
        try:
            return await transport.run()
        finally:
            self.stats.session_ended(transport)
            self.session = None
            self._session_up = trio.Event()
            await trio.aclose_forcefully(transport.stream)

    async def wait_session(self, timeout: float) -> TunnelTransport | None:
        """The current session, waiting up to ``timeout`` for one to come up."""
        with trio.move_on_after(timeout):
            while True:
                session = self.session
                if session is not None and session.is_open and not session.goaway_received:
                    return session
                await self._session_up.wait()
                await trio.sleep(0)
        return None

    # -- local connections ---------------------------------------------------

    async def handle_local(self, forward: Forward, tcp: trio.SocketStream) -> None:
        """One accepted local connection, carried as one channel."""
        self._channels += 1
        self._idle = trio.Event()
        try:
            tune_socket(tcp, notsent_lowat=False)
            await self._carry(forward, tcp)
        finally:
            await trio.aclose_forcefully(tcp)
            self._channels -= 1
            if self._channels == 0:
                self._idle.set()

    async def _carry(self, forward: Forward, tcp: trio.SocketStream) -> None:
        target = f"{forward.target_host}:{forward.target_port}"
        session = await self.wait_session(self.config.connect_wait_timeout)
        if session is None:
            log.warning(
                "no session to the relay within %g s; closed the connection for %s",
                self.config.connect_wait_timeout,
                target,
            )
            return
        try:
            channel = session.open_channel(forward.target_host, forward.target_port)
        except SessionClosed as exc:
            log.warning("cannot open a channel to %s: %s", target, exc)
            return
        await splice(tcp, channel)
        error = channel.error
        if isinstance(error, ChannelRefused):
            log.warning("relay could not connect to %s: %s", target, error)
        elif error is not None:
            log.info("channel to %s ended: %s", target, error)

    async def drain(self, timeout: float) -> None:
        """GOAWAY, let open channels finish up to ``timeout``, close the session."""
        self.stopping = True
        session = self.session
        if session is not None:
            session.go_away("the agent is shutting down")
        with trio.move_on_after(timeout):
            await self._idle.wait()
        if self.session is not None:
            await self.session.close(ws.CloseCode.GOING_AWAY, "agent shutting down")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "no answer to the upgrade within the handshake timeout"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


async def run_agent(
    config: AgentConfig,
    *,
    shutdown: trio.Event,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    stats: TunnelStats | None = None,
    reloads: trio.MemoryReceiveChannel[ReloadRequest] | None = None,
) -> None:
    """Serve the forwards until ``shutdown`` is set, then drain and return.

    ``task_status.started`` receives one list of bound (host, port) per forward.
    Each ``ReloadRequest`` from ``reloads`` is applied without touching the
    session or the connections already open (see forwards.py).
    """
    agent = Agent(config, stats)
    async with trio.open_nursery() as outer:
        outer.start_soon(agent.maintain_session)
        async with trio.open_nursery() as connections:
            forwards = ForwardSet(agent.handle_local, connections)
            async with trio.open_nursery() as accepting:
                bound_all = await accepting.start(forwards.serve, config.forwards)
                log.info("%d forwards via %s", len(bound_all), agent.relay.url)
                if reloads is not None:
                    accepting.start_soon(_apply_reloads, agent, forwards, reloads)
                task_status.started(bound_all)
                await shutdown.wait()
                accepting.cancel_scope.cancel()
            log.info(
                "agent stopping: %d open connections may finish (up to %g s)",
                agent._channels,
                agent.config.drain_timeout,
            )
            await agent.drain(agent.config.drain_timeout)
            connections.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def _apply_reloads(
    agent: Agent, forwards: ForwardSet, reloads: trio.MemoryReceiveChannel[ReloadRequest]
) -> None:
    async for request in reloads:
        new: AgentConfig = request.config
        try:
            bound = await forwards.apply(new.forwards)
        except OSError as exc:
            request.finish(f"cannot listen: {exc.strerror or exc}; kept the old forwards")
            continue
        if new.relay_url != agent.relay:
            log.warning("relay is now %s: used from the next reconnect; the current "
                        "session stays up", new.relay_url.url)
        agent.config, agent.relay = new, new.relay_url
        request.finish(result=bound)

