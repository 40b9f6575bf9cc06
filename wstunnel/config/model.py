"""The agent's settings, and the defaults both roles share: frozen dataclasses whose
field defaults are the YAML defaults. The relay's are in relay_model.py.

A config object is built once per load or reload, and what the roles read on
every connection or every OPEN is parsed here, once, in ``__post_init__``:
``AgentConfig.relay_url`` and ``proxy_url`` from their text, ``Policy``
objects (with their verdict caches) from the allow rules. They are derived
fields, left out of ``__init__``, ``repr`` and comparisons, so that
``dataclasses.replace`` derives them again from the new text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from .. import mux, ws
from ..addresses import HostPort
from .proxy_url import NO_PROXY, ProxyURL, parse_proxy_url
from .rate_limit import RateLimit
from .textforms import Forward, MiB, RelayURL, parse_relay_url

if TYPE_CHECKING:  # (loaded where the agent's TLS is built: an agent over ws://, e.g.
    # ``--stdio`` under ssh, starts without it)
    from ..security.tls import ClientTLS

__all__ = [
    "DEFAULT_INITIAL_WINDOW",
    "DEFAULT_MAX_BUFFERED_SIZE",
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_CHUNK_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_PENDING_OPENS",
    "DEFAULT_MAX_QUEUED_SIZE",
    "DEFAULT_MAX_SEND_WINDOW",
    "DEFAULT_MAX_SESSIONS_PER_AGENT",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "AgentConfig",
    "RateLimit",
]

# The protocol core's limits are the config's limits: one source of truth.
DEFAULT_INITIAL_WINDOW: Final = mux.DEFAULT_INITIAL_WINDOW
DEFAULT_MAX_CHUNK_SIZE: Final = mux.DEFAULT_MAX_CHUNK_SIZE
DEFAULT_MAX_CHANNELS: Final = mux.DEFAULT_MAX_CHANNELS
DEFAULT_MAX_SEND_WINDOW: Final = mux.DEFAULT_MAX_SEND_WINDOW
DEFAULT_MAX_QUEUED_SIZE: Final = mux.DEFAULT_MAX_QUEUED_SIZE
DEFAULT_MAX_MESSAGE_SIZE: Final = ws.DEFAULT_MAX_MESSAGE_SIZE
DEFAULT_MAX_PENDING_OPENS: Final = 64
#: What one session may make the relay buffer (received, not yet written to its
#: destinations): 1024 channels at the 256 KiB window, or 10,240 channels of
#: which the first ~400 open at 256 KiB and the rest at 16 KiB (mux/flow.py).
DEFAULT_MAX_BUFFERED_SIZE: Final = 256 * MiB
DEFAULT_MAX_SESSIONS_PER_AGENT: Final = 8
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")


@dataclass(frozen=True)
class AgentConfig:
    """Settings of ``wstunnel agent`` (YAML keys equal field names)."""

    #: One URL, or several: the first is preferred, the others are used in turn while
    #: it cannot be reached (``relay_urls``).
    relay: str | tuple[str, ...]
    forwards: tuple[Forward, ...] = ()  # at least one, unless ``stdio`` is set
    #: ``--stdio HOST:PORT``: carry stdin/stdout as one channel there, then exit
    #: (the forwards are not served).
    stdio: HostPort | None = None
    connect_wait_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 10.0
    drain_timeout: float = 10.0
    reconnect_min_interval: float = 1.0
    reconnect_max_interval: float = 30.0
    handshake_timeout: float = 10.0
    initial_window: int = DEFAULT_INITIAL_WINDOW
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE
    max_send_window: int = DEFAULT_MAX_SEND_WINDOW  # per channel, whatever the peer grants
    max_queued_size: int = DEFAULT_MAX_QUEUED_SIZE  # per session, all channels together
    proxy: str | None = field(default=None, repr=False)  # None: environment; "none": direct
    proxy_password_file: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    host_header: str | None = None
    #: How the session reaches the relay: "auto" tries WebSocket, then HTTP streaming,
    #: then HTTP polling (agent/transports.py); the others force one.
    transport: str = "auto"
    #: The User-Agent of every request to the relay and the proxy; None: wstunnel's.
    user_agent: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    token_file: str | None = None
    token_env: str | None = None
    token_credential: str | None = None
    ca_file: str | None = None
    relay_fingerprint: str | None = None
    insecure_skip_verify: bool = False
    server_name: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    metrics: HostPort | None = None  # serve Prometheus text on http://HOST:PORT/metrics
    metrics_auth_file: str | None = None  # user:password lines: Basic auth on `metrics`
    admin_socket: str | None = None  # unix socket for `wstunnel status`
    #: One line per finished channel: "off", "on" (into the log stream) or a file path.
    access_log: str = "off"
    source: str = field(default="<command line>", compare=False)  # file named in messages
    #: ``relay`` split into what the agent dials: the preferred one, and all in order.
    relay_url: RelayURL = field(init=False, repr=False, compare=False)
    relay_urls: tuple[RelayURL, ...] = field(init=False, repr=False, compare=False)
    #: ``proxy`` parsed; None when it is unset (the environment decides) or ``none``.
    proxy_url: ProxyURL | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Parse ``relay`` and ``proxy`` once.

        Raises:
            ValueError: either is not valid (the loaders check them first, with
                file, line and key).
        """
        texts = (self.relay,) if isinstance(self.relay, str) else self.relay
        object.__setattr__(self, "relay_urls", tuple(parse_relay_url(text) for text in texts))
        object.__setattr__(self, "relay_url", self.relay_urls[0])
        object.__setattr__(self, "proxy_url", _proxy_setting(self.proxy))

    @property
    def client_tls(self) -> ClientTLS:
        """How the agent checks the relay's certificate."""
        from ..security.tls import ClientTLS

        return ClientTLS(self.ca_file, self.relay_fingerprint, self.insecure_skip_verify,
                         self.client_cert_file, self.client_key_file)


def _proxy_setting(text: str | None) -> ProxyURL | None:
    if text is None or text.strip().lower() == NO_PROXY:
        return None
    return parse_proxy_url(text)
