"""The relay's settings: frozen dataclasses whose field defaults are the YAML defaults.

Apart from model.py (the agent's, and what both share) because an agent never
builds them: ``config`` loads this module when a relay config is first made or
named, so ``wstunnel agent --stdio``, started by ssh at every connection, does not
pay for creating these classes (~3 ms, issue 22). The derived fields are as in
model.py: left out of ``__init__``, ``repr`` and comparisons. ``demo_configs``
is here because it makes a relay config (and model.py must not import this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..addresses import HostPort
from .model import (
    DEFAULT_INITIAL_WINDOW,
    DEFAULT_MAX_BUFFERED_SIZE,
    DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_CHUNK_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_PENDING_OPENS,
    DEFAULT_MAX_QUEUED_SIZE,
    DEFAULT_MAX_SEND_WINDOW,
    DEFAULT_MAX_SESSIONS_PER_AGENT,
    AgentConfig,
)
from .rate_limit import RateLimit
from .textforms import DEFAULT_BIND_HOST, DEFAULT_PATH, Forward

if TYPE_CHECKING:  # (loaded where a relay's rules are built)
    from ..security.allow_rule import AllowRule
    from ..security.auth import TokenHash
    from ..security.forwarded import IPNetwork
    from ..security.listen_policy import ListenPolicy, ListenRule
    from ..security.policy import Policy

__all__ = ["AgentAccount", "RelayConfig", "RelayTLS", "demo_configs"]


@dataclass(frozen=True)
class RelayTLS:
    """The relay's ``tls:`` section."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass(frozen=True)
class AgentAccount:
    """One entry of the relay's ``agents:`` list."""

    name: str
    token_hash: TokenHash | None = None
    allow: tuple[AllowRule, ...] = ()
    #: What this agent's reverse forwards (``-R``) may make the relay listen on.
    listen_allow: tuple[ListenRule, ...] = ()
    #: Bandwidth of all this agent's sessions together (docs/PROTOCOL.md section 10.1).
    rate_limit: RateLimit | None = None
    #: The destination policy built from ``allow``: one per account and load, so
    #: its verdict cache serves every OPEN of every session of this agent.
    policy: Policy = field(init=False, repr=False, compare=False)
    listen_policy: ListenPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _set_policies(self)


@dataclass(frozen=True)
class RelayConfig:
    """Settings of ``wstunnel relay`` (YAML keys equal field names)."""

    listen: HostPort
    path: str = DEFAULT_PATH
    allow: tuple[AllowRule, ...] = ()
    listen_allow: tuple[ListenRule, ...] = ()  # (anonymous agents, with ``no_auth``)
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 10.0
    drain_timeout: float = 10.0
    initial_window: int = DEFAULT_INITIAL_WINDOW
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE
    max_send_window: int = DEFAULT_MAX_SEND_WINDOW  # per channel, whatever the peer grants
    max_queued_size: int = DEFAULT_MAX_QUEUED_SIZE  # per session, all channels together
    max_channels: int = DEFAULT_MAX_CHANNELS
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    trusted_proxies: tuple[IPNetwork, ...] = ()
    log_level: str = "info"
    log_format: str = "text"
    tls: RelayTLS | None = None
    agents: tuple[AgentAccount, ...] = ()
    no_auth: bool = False
    max_pending_opens: int = DEFAULT_MAX_PENDING_OPENS
    max_buffered_size: int = DEFAULT_MAX_BUFFERED_SIZE
    max_sessions_per_agent: int = DEFAULT_MAX_SESSIONS_PER_AGENT
    #: Connections still in their handshake (TLS, upgrade, login); past it the oldest
    #: is closed. None: a quarter of the open-files limit, at most 1024 (relay/handshakes.py).
    max_pending_handshakes: int | None = None
    rate_limit: RateLimit | None = None  # (anonymous agents, with ``no_auth``)
    idle_timeout: float = 0.0
    #: How long a session whose connection broke waits for its agent to resume it
    #: (0: sessions are not resumable).
    resume_grace: float = 60.0
    metrics: HostPort | None = None  # serve Prometheus text on http://HOST:PORT/metrics
    metrics_auth_file: str | None = None  # user:password lines: Basic auth on `metrics`
    admin_socket: str | None = None  # unix socket for `wstunnel status`
    #: One line per finished channel: "off", "on" (into the log stream) or a file path.
    access_log: str = "off"
    source: str = field(default="<command line>", compare=False)  # file named in messages
    #: The destination policy built from ``allow`` (anonymous clients, with ``no_auth``).
    policy: Policy = field(init=False, repr=False, compare=False)
    listen_policy: ListenPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _set_policies(self)


def _set_policies(owner: AgentAccount | RelayConfig) -> None:
    """Build ``owner``'s derived ``policy`` and ``listen_policy`` from its rules."""
    from ..security.listen_policy import ListenPolicy
    from ..security.policy import Policy

    object.__setattr__(owner, "policy", Policy(owner.allow))
    object.__setattr__(owner, "listen_policy", ListenPolicy(owner.listen_allow))


def demo_configs(echo_port: int, sink_port: int, *,
                 relay_port: int = 0) -> tuple[RelayConfig, AgentConfig]:
    """Loopback configs for ``wstunnel demo``: a relay allowing exactly the two
    targets (no_auth: nothing but this process can reach it in the demo's few
    seconds, and it only opens those two loopback ports), and an agent
    forwarding a free local port to each of them."""
    from ..security.allow_rule import AllowRule

    loopback = DEFAULT_BIND_HOST
    relay = RelayConfig(listen=HostPort(loopback, relay_port), source="<demo>", no_auth=True,
                        allow=tuple(AllowRule.parse(f"{loopback}:{port}")
                                    for port in (echo_port, sink_port)))
    forwards = tuple(Forward(loopback, 0, loopback, port) for port in (echo_port, sink_port))
    agent = AgentConfig(relay=f"ws://{loopback}:{relay_port}{DEFAULT_PATH}",
                        forwards=forwards, source="<demo>")
    return relay, agent
