"""The channel multiplexer, sans-IO: many channels over one record stream.

One record is one binary WebSocket message; the wire format is specified in
docs/PROTOCOL.md.  This package imports only the stdlib and wstunnel.errors.
"""

from __future__ import annotations

from .channel import ReceiveState, SendState
from .events import (
    ChannelClosed,
    ChannelOpened,
    ChannelOpenFailed,
    ChannelOpenRequested,
    ChannelReset,
    DataReceived,
    EndOfStream,
    Event,
    GoAwayReceived,
    OutboundBudgetExhausted,
    PeerOpenRefused,
    SessionFailed,
    SettingsReceived,
    WindowUpdated,
)
from .flow import DEFAULT_MAX_AUTO_WINDOW, DEFAULT_OPEN_WINDOW, WindowPlan, plan_windows
from .pacing import Pacer, TokenBucket
from .send_budget import DEFAULT_MAX_QUEUED_SIZE, DEFAULT_MAX_SEND_WINDOW
from .session import Session
from .session_state import DEFAULT_MAX_CHANNELS, Role
from .wire import (
    DEFAULT_INITIAL_WINDOW,
    DEFAULT_MAX_CHUNK_SIZE,
    DEFAULT_SOLO_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_WINDOW,
    MIN_CHUNK_SIZE,
    MIN_WINDOW,
    PATH_KIND_PORT,
    VERSION,
    ChannelKind,
    ErrorCode,
    OpenFailure,
    RecordType,
    ResetCode,
)

__all__ = [
    "DEFAULT_INITIAL_WINDOW",
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_AUTO_WINDOW",
    "DEFAULT_MAX_CHUNK_SIZE",
    "DEFAULT_MAX_QUEUED_SIZE",
    "DEFAULT_MAX_SEND_WINDOW",
    "DEFAULT_OPEN_WINDOW",
    "DEFAULT_SOLO_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_WINDOW",
    "MIN_CHUNK_SIZE",
    "MIN_WINDOW",
    "PATH_KIND_PORT",
    "VERSION",
    "ChannelClosed",
    "ChannelKind",
    "ChannelOpenFailed",
    "ChannelOpenRequested",
    "ChannelOpened",
    "ChannelReset",
    "DataReceived",
    "EndOfStream",
    "ErrorCode",
    "Event",
    "GoAwayReceived",
    "OpenFailure",
    "OutboundBudgetExhausted",
    "Pacer",
    "PeerOpenRefused",
    "ReceiveState",
    "RecordType",
    "ResetCode",
    "Role",
    "SendState",
    "Session",
    "SessionFailed",
    "SettingsReceived",
    "TokenBucket",
    "WindowPlan",
    "WindowUpdated",
    "plan_windows",
]
