"""Exception hierarchy shared by every layer.

Each layer translates foreign exceptions (OSError, ssl, trio) into these at one
boundary, so callers above catch *our* types and can say what went wrong.
"""

from __future__ import annotations

__all__ = [
    "TunnelError",
    "ConfigError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "PayloadTooBig",
    "FlowControlError",
    "HandshakeError",
    "AuthenticationError",
    "ChannelError",
    "ChannelRefused",
    "ChannelReset",
    "SessionClosed",
]


class TunnelError(Exception):
    """Base of every error wstunnel raises on purpose."""


class ConfigError(TunnelError):
    """A configuration file or command line is invalid.

    ``str()`` is the full message a person sees, e.g.
    ``agent.yaml:12: forwards[1].target: expected host:port, got "db.internal"``.
    """

    def __init__(self, message: str, *, source: str | None = None,
                 line: int | None = None, key_path: str | None = None) -> None:
        self.source = source
        self.line = line
        self.key_path = key_path
        self.detail = message
        where = ""
        if source is not None:
            where = source if line is None else f"{source}:{line}"
            where += ": "
        if key_path:
            where += f"{key_path}: "
        super().__init__(where + message)


class ProtocolError(TunnelError):
    """A protocol rule was broken; ``code`` is what to send the peer.

    For the WebSocket layer ``code`` is a close code (1002, 1007, 1009, ...);
    for the multiplexer it is a mux error code.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We misused a protocol object: a bug in the caller, raised at once."""

    def __init__(self, message: str, code: int = 1011) -> None:
        super().__init__(message, code)


class RemoteProtocolError(ProtocolError):
    """The peer broke the rules; never raised out of ``receive_data``."""


class PayloadTooBig(RemoteProtocolError):
    """A frame or message exceeded a configured limit."""


class FlowControlError(RemoteProtocolError):
    """The peer sent past the window it was granted."""


class HandshakeError(TunnelError):
    """The HTTP upgrade did not produce a WebSocket; ``status`` if one came back."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthenticationError(HandshakeError):
    """The relay rejected our credentials (401/403)."""


class ChannelError(TunnelError):
    """Affects one channel only; never fatal to the session."""


class ChannelRefused(ChannelError):
    """The relay could not or would not open the destination."""

    def __init__(self, message: str, reason: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class ChannelReset(ChannelError):
    """The peer aborted the channel; ``code`` is its RESET code (mux.ResetCode)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class SessionClosed(TunnelError):
    """The session (one WebSocket) is gone."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
