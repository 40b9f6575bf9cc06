"""Configuration: YAML files and command-line flags into frozen, checked values.

``load_config``/``parse_config`` and the config classes are the public face.
``model.py`` holds the classes, ``schema.py`` the keys and the rules between
them, ``values.py`` the value parsers, ``flags.py`` the command-line flags
(a mapping of the same keys, checked by the same schema), ``textforms.py``
the text forms shared with the command line.
"""

from .model import (
    DEFAULT_INITIAL_WINDOW,
    DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_CHUNK_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_QUEUED_SIZE,
    DEFAULT_MAX_SEND_WINDOW,
    LOG_FORMATS,
    LOG_LEVELS,
    AgentAccount,
    AgentConfig,
    RateLimit,
    RelayConfig,
    RelayTLS,
    demo_configs,
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
