"""Copy bytes both ways between a TCP stream and a channel, carrying half-close.

Reads from the TCP side are sized by the channel's send credit, so a channel
never holds more than its window no matter how fast the local socket is.
"""

from __future__ import annotations

import trio

from ..errors import ChannelReset
from .channel_stream import ChannelStream
from .ending import abort_stream, clear_abortive

__all__ = ["splice", "close_spliced", "splice_to_end"]

READ_SIZE = 256 * 1024

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def splice(tcp: trio.abc.HalfCloseableStream, channel: ChannelStream) -> bool:
    """Run until both directions reached EOF (True), or either side broke (False).

    On a break the copying stops at once, so nothing hangs; a local socket
    that failed resets the channel (after the bytes read from it). Then call
    ``close_spliced``.
    """
    finished: list[bool] = []
    async with trio.open_nursery() as nursery:
        # Two tasks per channel, this one included, and no watcher: the channel
        # cancels the scope itself when it breaks. Tasks are most of what an idle
        # channel costs (10,000 channels: 35 -> 27 KiB each, agent + relay).
        scope = nursery.cancel_scope
        channel.cancel_on_break(scope)
        nursery.start_soon(_pump, _outbound, tcp, channel, scope, finished)
        await _pump(_inbound, tcp, channel, scope, finished)
    if finished == [True, True]:
        await channel.aclose()
        return True
    if channel.error is None:  # the local socket failed
        who = "the destination" if channel.accepted else "the local client"
        channel.abort(f"{who} reset the connection", after_data=True)
    return False


async def splice_to_end(tcp: trio.abc.HalfCloseableStream, channel: ChannelStream) -> None:
    """``splice``, then ``close_spliced``; a cancelled splice is a failure (RST)."""
    closed = False
    try:
        await close_spliced(tcp, channel, await splice(tcp, channel))
        closed = True
    finally:
        if not closed:
            await abort_stream(tcp)


async def close_spliced(tcp: trio.abc.HalfCloseableStream, channel: ChannelStream,
                        clean: bool) -> None:
    """Close ``tcp`` after ``splice``: normally when it ended cleanly, else with RST (a
    reset by the peer once the bytes before it were sent), so the application sees
    the failure."""
    if clean:
        sock = getattr(tcp, "socket", None)
        if sock is not None:
            clear_abortive(sock)
        await trio.aclose_forcefully(tcp)
    else:
        await abort_stream(tcp, after_sent=isinstance(channel.error, ChannelReset))


async def _pump(direction, tcp, channel, scope: trio.CancelScope, finished: list[bool]) -> None:  # type: ignore[no-untyped-def]
    try:
        await direction(tcp, channel)
    except _GONE:
        finished.append(False)
        if direction is _inbound or not channel.reading_before_reset:
            scope.cancel()  # (else _inbound delivers the data before the reset first)
        return
    finished.append(True)
    if len(finished) == 2:
        scope.cancel()


async def _outbound(tcp: trio.abc.HalfCloseableStream, channel: ChannelStream) -> None:
    """Local socket -> tunnel; EOF becomes FIN."""
    while True:
        capacity = await channel.send_capacity()
        data = await tcp.receive_some(min(capacity, READ_SIZE))
        given = channel.bytes_sent
        try:
            if not data:
                await channel.send_eof()
                return
            await channel.send_all(data)
        except BaseException:  # (re-raised: only saves what the refusal would lose)
            retry = channel.retry
            if retry is not None:  # refused with GOING_AWAY while we read: not lost
                retry.keep(memoryview(data)[channel.bytes_sent - given:])
            raise


async def _inbound(tcp: trio.abc.HalfCloseableStream, channel: ChannelStream) -> None:
    """Tunnel -> local socket; FIN becomes shutdown(SHUT_WR)."""
    while True:
        data = await channel.receive_some(READ_SIZE)
        if not data:
            await tcp.send_eof()
            return
        await tcp.send_all(data)
