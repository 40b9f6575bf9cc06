"""Reloading a running role's configuration (SIGHUP, ``systemctl reload``).

Theory of operation
-------------------
The CLI re-reads and validates the configuration; a file that does not load
is refused there and never reaches the role. A valid one travels to the role
as a ``ReloadRequest`` over a memory channel; the role applies what it can
without disturbing anything that is running and answers with
:meth:`ReloadRequest.finish`. Settings that only take effect at startup
(the relay's ``listen``, ``metrics``, ``admin_socket``) are reported by
:func:`restart_only_changes` and logged; the rest of the reload still applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import trio

__all__ = ["RESTART_ONLY_KEYS", "ReloadRequest", "restart_only_changes"]

RESTART_ONLY_KEYS: Final = ("listen", "metrics", "metrics_auth_file", "admin_socket")


@dataclass
class ReloadRequest:
    """A validated new configuration for the running role, and its outcome."""

    config: Any  # AgentConfig or RelayConfig, same kind as the running one
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None  # why the role refused it; None once applied
    result: Any = None  # the agent: bound (host, port) lists per forward

    def finish(self, error: str | None = None, result: Any = None) -> None:
        """Record the outcome and wake whoever waits on :attr:`done`."""
        self.error = error
        self.result = result
        self.done.set()


def restart_only_changes(old: object, new: object) -> list[str]:
    """Keys in :data:`RESTART_ONLY_KEYS` whose value differs between the configs."""
    return [key for key in RESTART_ONLY_KEYS
            if hasattr(old, key) and getattr(old, key) != getattr(new, key, None)]
