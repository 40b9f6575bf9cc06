"""One UDP flow carried by a channel: datagrams both ways, lossy and bounded.

Theory of operation
-------------------
A flow is one client address and one destination; its channel (kind UDP)
carries the flow's datagrams each way as length-prefixed messages
(mux/datagram.py, docs/PROTOCOL.md section 4.2). ``DatagramFlow`` owns that
channel's two directions:

* outbound (``send``, called by whoever reads the local UDP socket, never
  blocking): a datagram goes into the channel at once when the channel's send
  capacity holds all of it and nothing waits before it; otherwise it joins the
  flow's own queue, which holds at most ``queue_size`` bytes of whole
  datagrams and drops the **oldest** to make room (UDP is lossy by contract:
  a stale datagram is worth less than a fresh one). A task (``_flush``) waits
  for capacity and moves queued datagrams into the channel; a datagram may be
  cut across DATA records, and once its first byte has gone its rest is never
  dropped (the stream would lose its framing). So a flow never waits, never
  takes credit beyond its own channel's window, and holds at most
  ``queue_size`` of its own plus its window in the session's queue (where the
  session's ``max_queued_size`` bounds all channels together, and a flow told
  0 drops rather than waits). All flows of a session together hold at most
  their ``DatagramBudget`` (the session's ``max_queued_size`` again) in their
  own queues: thousands of flows would otherwise hold 64 KiB each.
* inbound (``run``): the channel's bytes are decoded and each datagram is
  handed to ``deliver`` (a non-blocking send on the local socket; it drops
  when the socket's buffer is full). Credit is returned as the bytes are read,
  so a flow's peer is never held back by us.

Idle flows end cleanly: with ``idle_timeout``, no datagram either way for
that long sends FIN, waits up to ``FIN_WAIT_TIMEOUT`` for the peer's FIN
(datagrams that crossed are still delivered), and ends. A peer's FIN is
answered with ours. Either FIN follows the datagrams still queued (those that
get no credit within half the peer's FIN wait are dropped: the FIN must reach
it). Drops are counted in ``udp_stats`` by reason.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Final

import trio

from .. import mux
from ..errors import ChannelRefused
from ..mux.datagram import MAX_DATAGRAM_SIZE, DatagramDecoder, frame_datagram
from .channel_stream import ChannelStream

__all__ = ["FIN_WAIT_TIMEOUT", "FLOW_QUEUE_SIZE", "FORWARD_DATAGRAM_BUDGET", "RECEIVE_SIZE",
           "REFUSED_HOLD_INTERVAL", "UDP_DROP_REASONS", "DatagramBudget", "DatagramFlow",
           "UdpStats", "carry_connected", "connect_udp", "receive_more", "send_or_drop",
           "udp_stats"]

log = logging.getLogger("wstunnel.udp")

#: What one flow holds back while its channel has no send capacity (whole datagrams).
FLOW_QUEUE_SIZE: Final = 64 * 1024
#: What the flows of one agent UDP socket (a ``-L udp:`` forward's, a SOCKS UDP
#: association's) hold back together, as a relay session's flows hold at most its
#: ``max_queued_size`` (``DatagramBudget``): the multiplexer's default of that.
FORWARD_DATAGRAM_BUDGET: Final = mux.DEFAULT_MAX_QUEUED_SIZE
#: After an idle FIN, how long the peer has to answer with its own.
FIN_WAIT_TIMEOUT: Final = 5.0
#: How long a refused flow drops its client's datagrams before a new flow asks again.
REFUSED_HOLD_INTERVAL: Final = 5.0
#: How long queued datagrams may wait for credit before our FIN goes anyway (answering
#: the peer's: well within its FIN_WAIT_TIMEOUT, so it is never reset; or ours, idle).
_FIN_ANSWER_TIMEOUT: Final = FIN_WAIT_TIMEOUT / 2
#: recv buffer: above MAX_DATAGRAM_SIZE, so that a larger datagram is seen (and dropped).
RECEIVE_SIZE: Final = 65536
#: What a queued datagram costs beyond its bytes (its object, its place in the
#: queue), counted against ``queue_size`` (as mux PIECE_OVERHEAD_SIZE per piece).
_DATAGRAM_OVERHEAD_SIZE: Final = 64
#: Datagrams read per wake-up at most (then other tasks get their turn).
RECEIVE_BATCH: Final = 64

#: Local send errors that mean "drop this datagram", not "the flow is broken"; and
#: every errno Linux turns an ICMP/ICMPv6 error into (a connected socket's recv or
#: send reports it once, about an earlier datagram): EACCES is ICMPv6
#: "administratively prohibited", what ip6tables REJECT sends by default.
_TRANSIENT_ERRNOS: Final = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED,
                                      errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EMSGSIZE,
                                      errno.EPERM, errno.EACCES, errno.ENOPROTOOPT,
                                      errno.EHOSTDOWN, errno.ENONET, errno.EOPNOTSUPP,
                                      errno.EPROTO})


class UdpStats:
    """Process-wide UDP counters; service/metrics_output.py shows them.

    ``dropped`` by reason: ``queue_full`` (no send capacity and the flow's queue
    full: the oldest went), ``too_big`` (over 65,507 bytes), ``refused`` (the
    destination was refused; the flow drops for a while, see agent/udp.py and
    relay/reverse_udp.py),
    ``no_session`` (no channel could be opened), ``local_send`` (the local
    socket would not take a datagram from the tunnel), ``closing`` (arrived
    while the flow ended).
    """

    def __init__(self) -> None:
        self.flows_opened = 0
        self.flows_active = 0
        self.datagrams_sent = 0  # local socket -> channel
        self.datagrams_received = 0  # channel -> local socket
        self.dropped: Counter[str] = Counter()

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] += count


udp_stats: Final = UdpStats()
#: Every reason ``UdpStats.dropped`` counts (metrics show each, at 0 too).
UDP_DROP_REASONS: Final = ("closing", "local_send", "no_session", "queue_full", "refused",
                           "too_big")


class DatagramBudget:
    """What the flows of one session hold in their own queues together, at most
    ``limit`` bytes (each datagram counted with its overhead): past it, the flow
    that queues one more drops its oldest, as past its own ``queue_size``."""

    __slots__ = ("limit", "held")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0


class DatagramFlow:
    """One flow's datagrams over one channel; see the module docstring.

    Args:
        deliver: sends one datagram from the tunnel to the local socket (must
            not block: drop instead).
        idle_timeout: end the flow (FIN) after this long without a datagram
            either way; None: only the peer's FIN or a reset ends it.
        queue_size: bytes of whole datagrams held while the channel has no room.
        channel: the flow's channel when it is already open (datagrams then go
            into it at once, before ``run``); else ``run`` brings it.
        budget: shared with the session's other flows; None: only ``queue_size``.
    """

    def __init__(self, deliver: Callable[[bytes], None], *, idle_timeout: float | None,
                 queue_size: int = FLOW_QUEUE_SIZE, stats: UdpStats = udp_stats,
                 channel: ChannelStream | None = None,
                 budget: DatagramBudget | None = None) -> None:
        self._deliver = deliver
        self._idle_timeout = idle_timeout
        self._queue_limit = queue_size
        self._stats = stats
        self._queue: deque[bytes] = deque()
        self._queued_size = 0
        self._budget = budget if budget is not None else DatagramBudget(1 << 62)
        self._head: memoryview | None = None  # a datagram partly in the channel already
        self._channel = channel
        self._wake: trio.Event | None = None
        self._drained: trio.Event | None = None  # set by _flush once the queue is empty
        self._idle_scope: trio.CancelScope | None = None
        #: False once the flow has ended or is ending: the owner starts a new one.
        self.accepting = True
        #: Datagrams refused until then (``trio.current_time()``), after a refusal.
        self.refused_until = 0.0
        stats.flows_opened += 1

    @property
    def queued_size(self) -> int:
        return self._queued_size

    @property
    def channel(self) -> ChannelStream | None:
        return self._channel

    def send(self, payload: bytes) -> None:
        """One datagram from the local socket, towards the channel: now, queued, or
        dropped (counted). Never blocks."""
        if len(payload) > MAX_DATAGRAM_SIZE:
            self._stats.drop("too_big")
            return
        if not self.accepting:
            self._stats.drop("refused" if self.refused_until else "closing")
            return
        self._touch()
        framed = frame_datagram(payload)
        channel = self._channel
        if channel is not None and self._head is None and not self._queue:
            host = channel.session
            if host.send_capacity(channel) >= len(framed):
                host.send_data(channel, framed)
                channel.bytes_sent += len(framed)
                self._stats.datagrams_sent += 1
                return
        self._enqueue(framed)

    async def hold_if_refused(self, channel: ChannelStream, what: str,
                              logger: logging.Logger) -> bool:
        """After ``run``: if the peer refused ``channel``, say so once (``what`` names
        the flow for ``logger``), then drop this flow's datagrams for
        ``REFUSED_HOLD_INTERVAL`` (counted as ``refused``) rather than ask again for
        each (docs/PROTOCOL.md 4.2); True. Else False at once, also for a refusal
        because the peer's session was going away (``channel.retry``): the next
        datagram opens a flow on the next session at once; the few sent on the
        refused channel are lost, as UDP may lose any."""
        if not isinstance(channel.error, ChannelRefused) or channel.retry is not None:
            return False
        self.refused_until = trio.current_time() + REFUSED_HOLD_INTERVAL
        self._stats.drop("refused", 1)
        logger.warning("%s: %s; its datagrams are dropped for %g s", what, channel.error,
                       REFUSED_HOLD_INTERVAL)
        await trio.sleep(REFUSED_HOLD_INTERVAL)
        return True

    def discard(self, reason: str) -> None:
        """Drop what waits (the channel could not be opened), counted as ``reason``."""
        if self._queue:
            self._stats.drop(reason, len(self._queue))
        while self._queue:
            self._pop()
        self.accepting = False

    def _enqueue(self, framed: bytes) -> None:
        self._queue.append(framed)
        self._queued_size += len(framed)
        budget = self._budget
        budget.held += len(framed) + _DATAGRAM_OVERHEAD_SIZE
        # (each datagram but the newest counts its object too: tiny ones would otherwise
        # cost ~20x their size; a lone datagram of MAX_DATAGRAM_SIZE still fits)
        while self._queue and (
                self._queued_size + _DATAGRAM_OVERHEAD_SIZE * (len(self._queue) - 1)
                > self._queue_limit or budget.held > budget.limit):
            self._pop()
            self._stats.drop("queue_full")
        if self._wake is not None and self._queue:
            self._wake.set()

    def _pop(self) -> bytes:
        """The oldest queued datagram, out of the queue and the budget."""
        framed = self._queue.popleft()
        self._queued_size -= len(framed)
        self._budget.held -= len(framed) + _DATAGRAM_OVERHEAD_SIZE
        return framed

    def _touch(self) -> None:
        scope = self._idle_scope
        if scope is not None and self._idle_timeout is not None:
            scope.deadline = trio.current_time() + self._idle_timeout

    async def run(self, channel: ChannelStream) -> str:
        """Carry the flow over ``channel`` until it ends; returns why, for logs.

        The channel is ended here: FIN both ways when idle or when the peer ended
        it, RESET (PROTOCOL_ERROR) on a bad datagram length; a reset or refused
        channel is left as it is (``channel.error`` says why).
        """
        self._channel = channel
        self._stats.flows_active += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush, channel)
                why = await self._receive(channel)
                nursery.cancel_scope.cancel()
            return why
        finally:
            self.discard("closing")  # (what a reset or cancelled flow still queued)
            self._stats.flows_active -= 1
            if channel.error is None:
                await channel.aclose()  # (FIN if not sent yet; after cancellation too)

    async def _receive(self, channel: ChannelStream) -> str:
        decoder = DatagramDecoder()
        with trio.CancelScope() as scope:
            self._idle_scope = scope
            self._touch()
            why = await self._receive_until_end(channel, decoder)
        self._idle_scope = None
        if not scope.cancelled_caught:
            return why
        self.accepting = False
        return await self._end_idle(channel, decoder)

    async def _receive_until_end(self, channel: ChannelStream, decoder: DatagramDecoder) -> str:
        try:
            while True:
                data = await channel.receive_some()
                if not data:
                    await self._answer_fin(channel)
                    return "the peer ended the flow"
                if not self._deliver_all(channel, decoder, data):
                    return "the peer sent a datagram over the limit; reset"
                self._touch()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return str(channel.error or exc)

    async def _answer_fin(self, channel: ChannelStream) -> None:
        """Our FIN after the datagrams we had queued (docs/PROTOCOL.md 4.2)."""
        self.accepting = False  # (the client's next datagram opens a new flow)
        if await self._send_queued(channel):
            await channel.send_eof()

    async def _send_queued(self, channel: ChannelStream) -> bool:
        """Before either FIN (answering, or ours for an idle flow): let the datagrams
        still queued go, unless they get no credit within ``_FIN_ANSWER_TIMEOUT``:
        then they are dropped. False: a datagram was left half sent, and a FIN would
        cut it, so the channel is reset instead."""
        if self._head is not None or self._queue:
            self._drained = trio.Event()
            with trio.move_on_after(_FIN_ANSWER_TIMEOUT):
                await self._drained.wait()
            self.discard("closing")
        if self._head is None:
            return True
        self._head = None
        self._stats.drop("closing")
        channel.abort("a datagram could not be finished before the flow ended",
                      mux.ResetCode.CANCELLED)
        return False

    def _deliver_all(self, channel: ChannelStream, decoder: DatagramDecoder,
                     data: bytes) -> bool:
        for datagram in decoder.receive_data(data):
            self._stats.datagrams_received += 1
            self._deliver(datagram)
        if decoder.failure is None:
            return True
        channel.abort(str(decoder.failure), mux.ResetCode.PROTOCOL_ERROR)
        return False

    async def _end_idle(self, channel: ChannelStream, decoder: DatagramDecoder) -> str:
        """FIN for an idle flow; deliver what crosses it until the peer's FIN."""
        why = f"idle for {self._idle_timeout:g} s"
        try:
            if not await self._send_queued(channel):
                return why
            await channel.send_eof()
            with trio.move_on_after(FIN_WAIT_TIMEOUT):
                while data := await channel.receive_some():
                    if not self._deliver_all(channel, decoder, data):
                        return why
                return why
            channel.abort(f"no FIN within {FIN_WAIT_TIMEOUT:g} s of ours (idle flow)",
                          mux.ResetCode.TIMEOUT)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return why

    async def _flush(self, channel: ChannelStream) -> None:
        """Move queued datagrams into the channel as its capacity allows."""
        try:
            while True:
                while self._head is None and not self._queue:
                    if self._drained is not None:
                        self._drained.set()
                    self._wake = trio.Event()
                    await self._wake.wait()
                self._send_some(channel, await channel.send_capacity())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.discard("closing")
            if self._drained is not None:
                self._drained.set()

    def _send_some(self, channel: ChannelStream, capacity: int) -> None:
        host = channel.session
        while capacity > 0:
            head = self._head
            if head is None:
                if not self._queue:
                    return
                head = memoryview(self._pop())
            piece = bytes(head[:capacity])
            host.send_data(channel, piece)
            channel.bytes_sent += len(piece)
            capacity -= len(piece)
            if len(piece) < len(head):
                self._head = head[len(piece):]
                return
            self._head = None
            self._stats.datagrams_sent += 1


def send_or_drop(sock: socket.socket, data: bytes,
                 address: tuple[str, int] | None = None, *,
                 stats: UdpStats = udp_stats) -> None:
    """Send one datagram on a non-blocking socket, or drop it (counted, never waits)."""
    try:
        if address is None:
            sock.send(data)
        else:
            sock.sendto(data, address)
    except OSError as exc:
        if exc.errno not in _TRANSIENT_ERRNOS:
            log.debug("dropped a datagram: %s", exc)
        stats.drop("local_send")


async def carry_connected(channel: ChannelStream, sock: socket.socket, *,
                          idle_timeout: float | None,
                          budget: DatagramBudget | None = None) -> str:
    """Carry a flow between ``channel`` and ``sock``, a UDP socket connected to the
    flow's destination (the relay for ``-L``, the agent for ``-R``); closes ``sock``.
    ``budget``: the session's, shared by its flows."""
    flow = DatagramFlow(lambda data: send_or_drop(sock, data), idle_timeout=idle_timeout,
                        budget=budget)
    reader = trio.socket.from_stdlib_socket(sock)  # (the same socket object)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_connected, reader, sock, flow, channel)
            why = await flow.run(channel)
            nursery.cancel_scope.cancel()
        return why
    finally:
        reader.close()


async def connect_udp(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket connected to host:port (the first address it resolves
    to that a socket can be connected to).

    Raises:
        OSError: resolving failed (``socket.gaierror``), or no address could be used.
    """
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    error: OSError = OSError(errno.EADDRNOTAVAIL, f"no address for {host}")
    for family, _type, _proto, _name, address in infos:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error


def receive_more(sock: socket.socket,
                 limit: int = RECEIVE_BATCH) -> list[tuple[bytes, Any]]:
    """Up to ``limit`` more datagrams (with their source addresses) that ``sock`` (non-
    blocking) holds now, without waiting: one trip through trio's scheduler per
    batch instead of per datagram. Stops at the first error (the next wait reports it)."""
    batch: list[tuple[bytes, Any]] = []
    try:
        while len(batch) < limit:
            batch.append(sock.recvfrom(RECEIVE_SIZE))
    except OSError:
        pass  # (BlockingIOError: nothing more now)
    return batch


async def _read_connected(sock: trio.socket.SocketType, plain: socket.socket,
                          flow: DatagramFlow, channel: ChannelStream) -> None:
    """Datagrams from the destination into ``flow``. An ICMP error about an earlier
    datagram costs only that datagram; any other socket error resets this flow's
    channel, saying why, and leaves the session and its other flows alone."""
    while True:
        try:
            first = await sock.recv(RECEIVE_SIZE)
        except OSError as exc:  # an ICMP error from an earlier send (port unreachable)
            if exc.errno in _TRANSIENT_ERRNOS:
                continue
            channel.abort(f"the UDP socket to the destination failed: {exc}",
                          mux.ResetCode.CONNECTION_RESET)
            return
        flow.send(first)
        for data, _ in receive_more(plain):
            flow.send(data)
