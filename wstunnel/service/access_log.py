"""The access log: one line per finished channel, for the people who run the tunnel.

Theory of operation
-------------------
An ``AccessLog`` exists only while ``access_log`` is on (``TunnelStats.access_log``
is None otherwise, so a channel costs nothing more than a None check then). It
hears from ``TunnelStats`` what it keeps on its own: the address at the other
end of the local socket (``channel_carried``: the client on the side that opened
the channel, the dialled address on the side that accepted it), a RESET we sent
and why (``channel_reset``), a refusal we answered and why (``channel_refused``).
Each is held in a dict keyed by the channel until the channel is closed, then
written with what the stats know (the session's agent and address, when the
channel opened) as one record of the ``wstunnel.access`` logger; nothing
happens per DATA record.

Where the records go (the normal log stream or a file of their own) and their
format (text or JSON, as ``log_format``) is logging's business: service/logs.py.

A channel ends in one of these ways (``end``): ``clean`` (FIN both ways),
``reset_local`` (this side sent RESET: its local socket was reset, or it gave
up), ``reset_peer`` (the other side of the tunnel sent RESET), ``session_lost``
(the session ended with the channel open) or ``refused`` (OPEN_FAILED; ``reason``
is its code, ``detail`` the text).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from .. import mux
from ..addresses import join_host_port
from ..errors import ChannelRefused, ChannelReset, SessionClosed

if TYPE_CHECKING:
    from ..net.channel_stream import ChannelStream

__all__ = ["ACCESS_LOGGER", "AccessLog", "FIELDS"]

#: The logger every line goes to (service/logs.py decides where that leads).
ACCESS_LOGGER: Final = "wstunnel.access"
#: Every line has these fields, in this order (None where unknown: ``-`` in text).
FIELDS: Final = ("agent", "forward", "kind", "channel", "source", "host", "port", "dialled",
                 "bytes_up", "bytes_down", "duration", "end", "reason", "detail")
_PATH_KINDS: Final = frozenset({mux.ChannelKind.UNIX, mux.ChannelKind.UNIX_LISTEN})

_Ending = tuple[str, str | None, str | None]  # end, reason, detail


class AccessLog:
    """Writes one line per finished channel; see the module docstring."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._peers: dict[ChannelStream, str] = {}
        self._endings: dict[ChannelStream, _Ending] = {}  # our RESET or refusal

    # -- what the roles and the transports report (through TunnelStats) ---------------

    def channel_carried(self, channel: ChannelStream, sock: Any) -> None:
        """``sock`` (a socket, or None) carries ``channel`` here: note its peer."""
        peer = _peer_of(sock)
        if peer is not None:
            self._peers[channel] = peer

    def channel_reset(self, channel: ChannelStream, code: int, text: str) -> None:
        self._endings.setdefault(channel, ("reset_local", _reset_name(code), text))

    def channel_refused(self, channel: ChannelStream, reason: int, text: str) -> None:
        self._endings.setdefault(channel, ("refused", _failure_name(reason), text))

    def refused_unopened(self, agent: str | None, source: str | None, reason: int, text: str,
                         destination: str) -> None:
        """An OPEN of ``agent``'s session (from ``source``) refused before it became a
        channel (a session limit): its line at once."""
        host, _, port = destination.rpartition(":")
        fields = dict.fromkeys(FIELDS)
        fields.update(agent=agent, source=source, host=host.strip("[]") or destination,
                      port=int(port) if port.isdigit() else None, bytes_up=0, bytes_down=0,
                      duration=0.0, end="refused", reason=_failure_name(reason), detail=text)
        self.logger.info("channel", extra=fields)

    def channel_closed(self, channel: ChannelStream, duration: float, agent: str | None,
                       source: str | None) -> None:
        """The channel is finished and its byte counts are final: write its line.
        ``agent`` and ``source`` name its session (its agent, the other end's address)."""
        peer = self._peers.pop(channel, None)
        ending = self._endings.pop(channel, None) or _ending_of(channel.error)
        fields = _fields(channel, peer, ending, duration, agent, source)
        self.logger.info("channel", extra=fields)


def _fields(channel: ChannelStream, peer: str | None, ending: _Ending, duration: float,
            agent: str | None, source: str | None) -> dict[str, Any]:
    """The line's fields; ``peer`` is the local socket's other end: the client, or
    (on the side that accepted the channel) the address dialled."""
    accepted = channel.accepted  # (then the client is on the other side)
    up, down = channel.bytes_sent, channel.bytes_received
    if accepted:
        up, down = down, up
    end, reason, detail = ending
    return {
        "agent": agent, "forward": channel.forward, "kind": _kind_name(channel.kind),
        "channel": channel.channel_id, "source": source if accepted else peer,
        "host": channel.host, "port": None if channel.kind in _PATH_KINDS else channel.port,
        "dialled": peer if accepted else None, "bytes_up": up, "bytes_down": down,
        "duration": round(duration, 3), "end": end, "reason": reason, "detail": detail,
    }


def _ending_of(error: BaseException | None) -> _Ending:
    if error is None:
        return "clean", None, None
    if isinstance(error, ChannelRefused):
        reason = _failure_name(error.reason) if error.reason is not None else None
        return "refused", reason, str(error)
    if isinstance(error, ChannelReset):
        return "reset_peer", _reset_name(error.code) if error.code is not None else None, str(error)
    if isinstance(error, SessionClosed):
        return "session_lost", None, str(error)
    return "reset_local", None, str(error)  # pragma: no cover (no other error breaks a channel)


def _peer_of(sock: Any) -> str | None:
    """``host:port`` (or ``unix:/path``) at the other end of ``sock``; None if unknown."""
    if sock is None:
        return None
    try:
        address = sock.getpeername()
    except OSError:  # (reset already, or not a socket)
        return None
    if isinstance(address, tuple):
        return join_host_port(str(address[0]), int(address[1]))
    if isinstance(address, bytes):
        address = address.decode(errors="replace")
    return f"unix:{address}" if address else None


def _kind_name(kind: int) -> str:
    try:
        return mux.ChannelKind(kind).name.lower()
    except ValueError:
        return str(kind)


def _reset_name(code: int) -> str:
    try:
        return mux.ResetCode(code).name.lower()
    except ValueError:
        return f"code_{code}"


def _failure_name(reason: int) -> str:
    try:
        return mux.OpenFailure(reason).name.lower()
    except ValueError:
        return f"code_{reason}"

