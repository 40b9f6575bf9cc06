"""Configuration: YAML files and command-line flags into frozen, checked values.

``load_config``/``parse_config`` and the config classes are the public face.
``model.py`` holds the classes, ``schema.py`` the keys and the rules between
them, ``values.py`` the value parsers, ``flags.py`` the command-line flags
(a mapping of the same keys, checked by the same schema), ``textforms.py``
the text forms shared with the command line. The relay's classes
(``relay_model.py``) are loaded when first named (``__getattr__`` below): an
agent never needs them.
"""

from typing import TYPE_CHECKING

from .model import (
    DEFAULT_INITIAL_WINDOW,
    DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_CHUNK_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_QUEUED_SIZE,
    DEFAULT_MAX_SEND_WINDOW,
    LOG_FORMATS,
    LOG_LEVELS,
    AgentConfig,
    RateLimit,
)
from .schema import (
    load_agent_config,
    load_config,
    load_relay_config,
    parse_config,
)
from .textforms import (
    DEFAULT_BIND_HOST,
    DEFAULT_PATH,
    Forward,
    RelayURL,
    parse_forward,
    parse_host_port,
    parse_listen,
    parse_relay_url,
    parse_size,
    parse_url_path,
)

__all__ = [
    "DEFAULT_BIND_HOST",
    "DEFAULT_INITIAL_WINDOW",
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_CHUNK_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_QUEUED_SIZE",
    "DEFAULT_MAX_SEND_WINDOW",
    "DEFAULT_PATH",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "AgentAccount",
    "AgentConfig",
    "Forward",
    "RateLimit",
    "RelayConfig",
    "RelayTLS",
    "RelayURL",
    "demo_configs",
    "load_agent_config",
    "load_config",
    "load_relay_config",
    "parse_config",
    "parse_forward",
    "parse_host_port",
    "parse_listen",
    "parse_relay_url",
    "parse_size",
    "parse_url_path",
]

if TYPE_CHECKING:
    from .relay_model import AgentAccount, RelayConfig, RelayTLS, demo_configs

_RELAY_MODEL = frozenset({"AgentAccount", "RelayConfig", "RelayTLS", "demo_configs"})


def __getattr__(name: str) -> object:
    """The relay's config classes, on first use: creating them costs ``agent --stdio``
    ~3 ms at every ssh connection (issue 22)."""
    if name in _RELAY_MODEL:
        from . import relay_model

        return getattr(relay_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
