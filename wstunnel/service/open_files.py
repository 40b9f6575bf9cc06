"""Lift the open-files limit to what thousands of channels need.

Every channel holds a socket in each process (the agent's accepted local
connection, the relay's connection to the destination), so 10,000 channels
need some 10,000 descriptors on each side, while a login shell's soft
RLIMIT_NOFILE is often 1024: the 1,000th connection would fail with EMFILE,
far below ``max_channels``. Raising the soft limit up to the hard one needs no
privilege, so the CLI does it once before ``trio.run`` and says in the log
when even the hard limit leaves fewer descriptors than channels.
"""

from __future__ import annotations

import logging
from typing import Final

__all__ = ["pending_handshakes_limit", "raise_open_files_limit", "RESERVED_FILES"]

log = logging.getLogger("wstunnel")

#: Descriptors a process needs besides its channels' sockets: listeners, the
#: WebSocket, epoll and trio's own, logs, the admin and metrics sockets.
RESERVED_FILES: Final = 64
#: The relay's default ``max_pending_handshakes``: this share of the open-files limit ...
HANDSHAKE_SHARE: Final = 4
#: ... but no more than this many (each holds a socket and ~9 KiB, ~54 KiB in a TLS
#: handshake: some 55 MiB for all; docs/SECURITY.md, "Connections not yet logged in").
MAX_DEFAULT_HANDSHAKES: Final = 1024


def raise_open_files_limit(channels: int, role: str) -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn if it still caps ``channels``.

    Returns:
        The soft limit now in force, or None where the platform has no
        ``resource`` module (nothing to do there).
    """
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("open-files limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open-files limit from %d to %d: %s",
                      soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft - RESERVED_FILES < channels:
        log.warning("the open-files limit (%d, hard %d) caps this %s at about %d channels "
                    "in all sessions together, below the %d a session may open: raise it "
                    "(`ulimit -n`, or LimitNOFILE= in the systemd unit)",
                    soft, hard, role, max(0, soft - RESERVED_FILES), channels)
    return soft


def pending_handshakes_limit(configured: int | None) -> int:
    """The relay's ``max_pending_handshakes``: ``configured``, else a quarter of the soft
    open-files limit now in force (at most ``MAX_DEFAULT_HANDSHAKES``), so that
    connections still in their handshake leave the rest to sessions and channels.
    A configured value above half the limit is kept, with a warning."""
    try:
        import resource
    except ImportError:  # not a POSIX system: no limit to share
        return configured or MAX_DEFAULT_HANDSHAKES
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return configured or MAX_DEFAULT_HANDSHAKES
    if configured is None:
        return max(1, min(MAX_DEFAULT_HANDSHAKES, soft // HANDSHAKE_SHARE))
    if configured > soft // 2:
        log.warning("max_pending_handshakes %d is more than half the open-files limit (%d): "
                    "connections that never finish their handshake could take the descriptors "
                    "sessions and their channels need; lower it, or raise the limit "
                    "(`ulimit -n`, or LimitNOFILE= in the systemd unit)", configured, soft)
    return configured
