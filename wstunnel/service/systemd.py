"""The systemd service protocol, stdlib only: sd_notify and socket activation.

Theory of operation
-------------------
systemd tells a service about itself through environment variables:

* ``NOTIFY_SOCKET`` - an ``AF_UNIX`` datagram socket (a path, or an abstract
  name written with a leading ``@``) that takes newline-separated
  ``KEY=VALUE`` messages: ``READY=1`` once the service is serving,
  ``STATUS=...`` free text for ``systemctl status``, ``RELOADING=1`` and
  ``STOPPING=1`` around a reload and a stop, ``WATCHDOG=1`` as a keep-alive.
* ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) - the keep-alive deadline; we ping
  at half of it so a hung event loop is killed and restarted.
* ``LISTEN_PID``/``LISTEN_FDS`` - sockets passed in from a ``.socket`` unit,
  starting at file descriptor 3.

Outside systemd none of these are set and every call here is a cheap no-op.
A message is one non-blocking ``sendto``: if systemd's queue is full the
message is dropped and logged rather than stalling the event loop.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Final

__all__ = ["LISTEN_FDS_START", "Notifier", "listen_sockets"]

LISTEN_FDS_START: Final = 3  # SD_LISTEN_FDS_START
_USEC: Final = 1_000_000

log = logging.getLogger("wstunnel.systemd")


class Notifier:
    """Sends sd_notify messages when ``NOTIFY_SOCKET`` is set, else does nothing.

    Args:
        environ: where to read ``NOTIFY_SOCKET``/``WATCHDOG_USEC``/``WATCHDOG_PID``
            (``os.environ`` when None).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _notify_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env)
        self._socket: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields as one message; True if it was sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._socket is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                self._socket = socket.socket(socket.AF_UNIX, kind)
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
        except OSError as exc:  # warn once: the watchdog would repeat it every few seconds
            level = logging.DEBUG if self._failed else logging.WARNING
            log.log(level, "cannot notify systemd at %s: %s", self.address_text, exc)
            self._failed = True
            return False
        return True

    @property
    def address_text(self) -> str:
        address = self.address
        if isinstance(address, bytes):
            return "@" + address[1:].decode("utf-8", "replace")
        return str(address)

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (with an optional ``STATUS=``): listeners are bound."""
        return self.notify("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """``STATUS=text`` for ``systemctl status``."""
        return self.notify(*_status(text))

    def reloading(self) -> bool:
        """``RELOADING=1``; follow with :meth:`ready` when the reload is done."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the service is shutting down."""
        return self.notify("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the keep-alive; call every :attr:`watchdog_interval` s."""
        if self.watchdog_interval is None:
            return False
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _status(text: str | None) -> list[str]:
    if text is None:
        return []
    return ["STATUS=" + " ".join(text.split())]  # one line; systemd shows it verbatim


def _notify_address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace socket
    if value.startswith("/"):
        return value
    if value:
        log.warning("ignoring NOTIFY_SOCKET=%r: expected an absolute path or @name", value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, or None when no watchdog is asked for us."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # meant for another process (e.g. our parent)
    return int(usec) / _USEC / 2


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by systemd socket activation; [] when there are none.

    Reads ``LISTEN_PID``/``LISTEN_FDS`` and removes them (and
    ``LISTEN_FDNAMES``) so they are not inherited. The sockets are returned as
    ``socket.socket`` objects, close-on-exec, in the order systemd passed them.
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
