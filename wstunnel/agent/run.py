"""``run_agent``: the agent as a service runs it, its listeners bound first.

Apart from agent.py because ``Agent`` is also used without listeners
(``--stdio`` connects once and carries one connection: stdio.py); this is the
long-running start-up around it: bind every forward before the relay is
contacted, keep the session up, apply reloads, drain on shutdown.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from ..config import AgentConfig, Forward
from ..config.textforms import REVERSE
from ..errors import ConfigError
from ..security.auth import load_token
from ..service.metrics import TunnelStats
from .agent import Agent, session_limits
from .connect import check_tls_files
from .proxy import proxy_dialer, proxy_environment
from .resume import this_instance

if TYPE_CHECKING:  # (the listeners load where used: --stdio needs none)
    from ..service.reload import ReloadRequest
    from .forwards import ForwardSet

__all__ = ["run_agent"]

log = logging.getLogger("wstunnel.agent")


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
    Every forward is bound before the relay is contacted: one that cannot be
    is an error (a ``ConfigError`` when the configuration cannot work on this
    machine) and the agent never connects. Each ``ReloadRequest`` from
    ``reloads`` is applied without touching the session or the connections
    already open (see forwards.py).
    """
    agent = Agent(config, stats)
    agent.instance = this_instance(config)  # (its restart ends its held sessions: resume.py)
    try:
        await _run(agent, config, shutdown, reloads, task_status)
    finally:
        await agent.discard_fresh()


async def _run(agent: Agent, config: AgentConfig, shutdown: trio.Event,
               reloads: trio.MemoryReceiveChannel[ReloadRequest] | None,
               task_status: Any) -> None:
    from .forwards import ForwardSet

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as connections:
            forwards = ForwardSet(agent.carrier, connections)
            async with trio.open_nursery() as accepting:
                bound_all = await _bind_forwards(accepting, forwards, config)
                if agent.reverse.forwards:
                    log.info("%d reverse forwards: %s", len(agent.reverse.forwards),
                             ", ".join(str(forward) for forward in agent.reverse.forwards))
                outer.start_soon(agent.maintain_session)
                log.info("%d forwards via %s", len(bound_all), agent.relay.url)
                if reloads is not None:
                    accepting.start_soon(_apply_reloads, agent, forwards, reloads)
                task_status.started(bound_all)
                await shutdown.wait()
                accepting.cancel_scope.cancel()
            log.info(
                "agent stopping: %d open connections may finish (up to %g s)",
                agent.open_connections,
                agent.config.drain_timeout,
            )
            await agent.drain(agent.config.drain_timeout)
            connections.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def _bind_forwards(
    accepting: trio.Nursery, forwards: ForwardSet, config: AgentConfig
) -> list[list[tuple[str, int]]]:
    from .forwards import ListenError

    try:
        bound: list[list[tuple[str, int]]] = await accepting.start(forwards.serve,
                                                                   local_forwards(config))
    except ListenError as exc:
        if exc.config_problem:
            raise ConfigError(exc.detail, source=config.source, key_path=exc.key_path) from exc
        raise
    return bound


async def _apply_reloads(
    agent: Agent, forwards: ForwardSet, reloads: trio.MemoryReceiveChannel[ReloadRequest]
) -> None:
    from .forwards import ListenError

    async for request in reloads:
        new: AgentConfig = request.config
        try:
            _startable(new)
            bound = await forwards.apply(local_forwards(new))
        except ConfigError as exc:
            request.finish(str(exc))
            continue
        except ListenError as exc:  # all or nothing: the running forwards stay
            request.finish(f"{exc}; kept the old forwards")
            continue
        if new.relay_urls != agent.config.relay_urls:
            log.warning("relay is now %s: used from the next reconnect; the current "
                        "session stays up", ", ".join(url.url for url in new.relay_urls))
        agent.reverse.update(new.forwards)
        agent.config = new
        agent.limits = session_limits(new)  # (for the next session)
        agent.dial = proxy_dialer(new, proxy_environment())  # token, TLS: read at each connect
        request.finish(result=bound)


def _startable(config: AgentConfig) -> None:
    """What stops the agent from starting refuses a reload too (an Agent reads them):
    a token source that cannot be read, a CA or client certificate that does not load.

    Raises:
        ConfigError: naming the file and key.
    """
    try:
        load_token(token_file=config.token_file, token_env=config.token_env,
                   token_credential=config.token_credential)
        if config.relay_url.secure:
            check_tls_files(config)
    except ConfigError as exc:
        if exc.source is not None:
            raise
        raise ConfigError(exc.detail, source=config.source, key_path=exc.key_path) from exc


def local_forwards(config: AgentConfig) -> tuple[Forward, ...]:
    """The forwards this agent listens for itself (all but ``-R``, which the relay
    listens for: reverse.py)."""
    return tuple(forward for forward in config.forwards if forward.kind != REVERSE)
