"""A channel refused because its relay was going away, opened again on the next session.

Why: during a rolling restart a local connection accepted in the instant
between the relay sending GOAWAY and the agent reading it opens its channel on
the old session, and the relay answers OPEN_FAILED(GOING_AWAY). The relay
never acted on that OPEN (docs/PROTOCOL.md section 7), so the same OPEN may be
made on the next session with the same bytes, and the application never
notices. The mux keeps what went out behind the OPEN until the answer and
hands it back with the refusal (``ChannelStream.retry``); here it is sent on a
new channel. Moving the local socket over (the pump gives it back, splice
returns) is the caller's part: agent.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..errors import ChannelRefused, SessionClosed
from ..net.channel_stream import ChannelStream
from ..net.transport import TunnelTransport
from .session_slot import SessionSlot

__all__ = ["reopen"]

log = logging.getLogger("wstunnel.agent")


async def reopen(refused: ChannelStream, sessions: SessionSlot, timeout: float,
                 stopping: Callable[[], bool]) -> tuple[TunnelTransport, ChannelStream] | None:
    """Open ``refused`` again on the next usable session of ``sessions`` (waiting up to
    ``timeout``, as a new connection would), and give the new channel the bytes the
    refused one had taken; (its session, the channel). None, logged: no session in
    time, the agent is stopping, or the new channel failed for another reason:
    then reset the local connection, as before.
    """
    retry = refused.retry
    assert retry is not None, "only for a channel refused with GOING_AWAY"
    data, target = bytes(retry.data), refused.destination
    deadline = trio.current_time() + timeout
    while not stopping():
        session = await sessions.wait(max(0.0, deadline - trio.current_time()))
        if session is None:
            log.warning("the relay went away before connecting %s, and no new session came "
                        "within %g s; reset the connection", target, timeout)
            return None
        try:
            channel = session.open_channel(refused.host, refused.port, kind=refused.kind,
                                           forward=refused.forward)
        except (SessionClosed, ChannelRefused) as exc:
            log.warning("cannot open a channel to %s: %s; reset the connection", target, exc)
            return None
        if await _send_again(channel, data):
            log.info("channel to %s: its relay went away before connecting it; opened again "
                     "on the new session", target)
            return session, channel
        if channel.retry is None:  # (refused for another reason, or that session lost)
            log.warning("channel to %s opened again, then: %s; reset the connection", target,
                        channel.error)
            return None
    log.warning("the relay went away before connecting %s, and the agent is stopping; "
                "reset the connection", target)
    return None


async def _send_again(channel: ChannelStream, data: bytes) -> bool:
    """Give ``channel`` the bytes the channel it replaces had taken (waiting for credit
    if this relay grants less); False: it broke meanwhile (``channel.error`` says
    how). Not the EOF, if the local side had sent it: a socket at its end reports it
    again on the next read, where the pump or splice turns it into the FIN as usual."""
    try:
        await channel.send_all(data)
    except trio.BrokenResourceError:
        return False
    return True
