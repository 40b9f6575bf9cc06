"""The agent's side of reverse forwards (``-R``): leases on the relay's listeners,
and the connections the relay sends back through them.

Theory of operation
-------------------
For each session, every reverse forward holds one *lease*: a channel opened
with a listen kind (TCP_LISTEN host:port, UNIX_LISTEN path) that the relay
answers OPEN_OK once it listens there, or OPEN_FAILED with why
(relay/reverse.py). The relay's listener lives exactly as long as that
channel, so the agent never has to tell the relay that it is gone: when the
session ends, the relay stops listening. A refusal is logged with what to do,
and the agent's other forwards keep working; an address in use is asked for
again every ``RETRY_INTERVAL`` while the session lasts. On reload, a removed
forward's lease is reset (the relay stops listening) and a new forward's
lease is opened on the current session.

The relay opens a channel (an even id) for each connection it accepts there,
naming the listener's address with a connect kind (TCP host:port, UNIX path).
The agent serves it only when that address is one of this session's leases
the relay confirmed, and dials the forward's own target: what the relay
says is never a destination, so a relay cannot make the agent connect
anywhere its configuration does not say. A UDP forward (``-R udp:``) leases
with UDP_LISTEN; each channel of kind UDP the relay opens is one client's
flow, carried over a UDP socket connected to the target, ended by this
agent after the forward's ``udp_idle_timeout`` (net/udp_flow.py).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Final

import trio

from .. import mux
from ..config import Forward
from ..config.textforms import REVERSE, UDP
from ..errors import ChannelRefused, SessionClosed
from ..net.channel_stream import ChannelStream, until_ended
from ..net.dialing import open_tcp
from ..net.ending import set_abortive
from ..net.sockopts import tune_plain_socket
from ..net.splice import splice_to_end
from ..net.transport import TunnelTransport
from ..net.udp_flow import carry_connected, connect_udp

__all__ = ["RETRY_INTERVAL", "ReverseForwards", "dial_target", "lease_kind"]

log = logging.getLogger("wstunnel.agent")

#: How often an address the relay could not listen on (in use) is asked for again.
RETRY_INTERVAL: Final = 30.0
#: Connecting a reverse connection's target (this agent's side) times out after this.
CONNECT_TIMEOUT: Final = 10.0

Rest = Callable[[], Awaitable[None]]
#: (kind, host, port) of a listener, as the relay names it in its OPEN.
_Key = tuple[int, str, int]

#: What each OPEN_FAILED reason means for a lease, and what to do about it.
_ADVICE: Final[dict[int, str]] = {
    mux.OpenFailure.FORBIDDEN: "add it to this agent's listen_allow on the relay "
                               "(or --listen-allow with --no-auth), then restart this agent "
                               "(it asks once per session)",
    mux.OpenFailure.REFUSED: "something else holds that address on the relay host; "
                             f"asking again every {RETRY_INTERVAL:g} s",
    mux.OpenFailure.UNSUPPORTED_KIND: "the relay is older than reverse forwards: upgrade it",
}


def lease_kind(forward: Forward) -> tuple[mux.ChannelKind, str, int]:
    """The OPEN that asks the relay to listen for ``forward``."""
    if forward.protocol == UDP:
        return mux.ChannelKind.UDP_LISTEN, forward.listen_host, forward.listen_port
    if forward.listen_path is not None:
        return mux.ChannelKind.UNIX_LISTEN, forward.listen_path, mux.PATH_KIND_PORT
    return mux.ChannelKind.TCP_LISTEN, forward.listen_host, forward.listen_port


def _key(forward: Forward) -> _Key:
    """How the relay names ``forward``'s listener in the channels it opens."""
    if forward.protocol == UDP:
        return mux.ChannelKind.UDP, forward.listen_host, forward.listen_port
    if forward.listen_path is not None:
        return mux.ChannelKind.UNIX, forward.listen_path, mux.PATH_KIND_PORT
    return mux.ChannelKind.TCP, forward.listen_host, forward.listen_port


class ReverseForwards:
    """The reverse forwards of one agent, across its sessions."""

    def __init__(self, forwards: Sequence[Forward],
                 tracked: Callable[[], Callable[[], None]]) -> None:
        """``tracked()`` counts a carried connection and returns its "finished" call
        (the agent drains open connections on shutdown)."""
        self._forwards = _reverse(forwards)
        self._tracked = tracked
        self._confirmed: dict[_Key, Forward] = {}
        self._leases: dict[Forward, trio.CancelScope] = {}
        self._session: TunnelTransport | None = None
        self._nursery: trio.Nursery | None = None
        self.state: dict[Forward, str] = {}  # forward -> "listening" or why not, for status

    @property
    def forwards(self) -> tuple[Forward, ...]:
        return self._forwards

    def status(self) -> list[dict[str, str]]:
        """One row per reverse forward, for ``wstunnel status``."""
        return [{"forward": forward.label, "listen": f"relay {forward.listen_text}",
                 "target": forward.target_text, "state": self.state.get(forward, "no session")}
                for forward in self._forwards]

    async def hold(self, transport: TunnelTransport) -> None:
        """Hold every forward's lease on ``transport`` until cancelled (the session ended)."""
        self._confirmed.clear()
        try:
            async with trio.open_nursery() as nursery:
                self._session, self._nursery = transport, nursery
                for forward in self._forwards:
                    self._start(forward)
                await trio.sleep_forever()
        finally:
            self._session = self._nursery = None
            self._confirmed.clear()
            self._leases.clear()
            for forward in self._forwards:
                self.state[forward] = "no session"

    def update(self, forwards: Sequence[Forward]) -> None:
        """A reload: release removed forwards' leases, ask for new ones (same session)."""
        new = _reverse(forwards)
        for forward in self._forwards:
            if forward not in new:
                scope = self._leases.pop(forward, None)
                if scope is not None:
                    scope.cancel()
                self.state.pop(forward, None)
        added = [forward for forward in new if forward not in self._forwards]
        self._forwards = new
        if self._nursery is not None:
            for forward in added:
                self._start(forward)

    def release_all(self) -> None:
        """Shutting down: the relay stops listening now, not when the session ends."""
        for scope in self._leases.values():
            scope.cancel()

    def _start(self, forward: Forward) -> None:
        assert self._nursery is not None and self._session is not None
        scope = trio.CancelScope()
        self._leases[forward] = scope
        self._nursery.start_soon(self._lease, self._session, forward, scope)

    async def _lease(self, transport: TunnelTransport, forward: Forward,
                     scope: trio.CancelScope) -> None:
        """Ask for ``forward``'s listener, keep it while this task lives, ask again
        when the relay could not listen because the address was in use."""
        with scope:
            while True:
                retry = await self._hold_once(transport, forward)
                if not retry:
                    await trio.sleep_forever()
                await trio.sleep(RETRY_INTERVAL)

    async def _hold_once(self, transport: TunnelTransport, forward: Forward) -> bool:
        """One lease, until it ends; True when asking again may help."""
        kind, host, port = lease_kind(forward)
        try:
            channel = transport.open_channel(host, port, kind=kind, forward=forward.label)
        except (SessionClosed, ChannelRefused) as exc:
            self.state[forward] = f"cannot ask: {exc}"
            return False
        self.state[forward] = "asking the relay"
        try:
            try:
                await channel.wait_opened()
            except trio.BrokenResourceError as exc:
                return self._refused(forward, exc.__cause__)
            self._confirmed[_key(forward)] = forward
            self.state[forward] = "listening"
            log.info("relay listening on %s for %s -> %s", forward.listen_text,
                     forward.label, forward.target_text)
            await until_ended(channel)
            self.state[forward] = f"lost: {channel.error}"
            if transport.is_open:
                log.warning("relay stopped listening on %s for %s: %s", forward.listen_text,
                            forward.label, channel.error)
            return False
        finally:
            if self._confirmed.get(_key(forward)) is forward:
                del self._confirmed[_key(forward)]
            if channel.error is None:  # (our release: a reload removed it, or shutdown)
                channel.abort("the agent released the reverse forward", mux.ResetCode.CANCELLED)

    def _refused(self, forward: Forward, error: BaseException | None) -> bool:
        reason = error.reason if isinstance(error, ChannelRefused) else None
        advice = _ADVICE.get(reason) if reason is not None else None
        if reason == mux.OpenFailure.FORBIDDEN and "listen_allow" not in str(error):
            advice = None  # (the relay host refused the bind: the relay's text says why)
        self.state[forward] = f"refused: {error}"
        log.error("the relay will not listen on %s for %s: %s%s", forward.listen_text,
                  forward.label, error, f" \N{EM DASH} {advice}" if advice else "")
        return reason in (mux.OpenFailure.REFUSED, mux.OpenFailure.INTERNAL_ERROR)

    # -- channels the relay opens ----------------------------------------------------

    def open_now(self, transport: TunnelTransport, channel: ChannelStream) -> Rest | None:
        """The relay accepted a connection on one of our leases: dial the forward's
        target in a task; refuse at once what is not one of this session's leases."""
        if channel.kind not in (mux.ChannelKind.TCP, mux.ChannelKind.UNIX, mux.ChannelKind.UDP):
            transport.refuse(channel, mux.OpenFailure.UNSUPPORTED_KIND,
                             "an agent opens only the relay's reverse connections")
            return None
        forward = self._confirmed.get((channel.kind, channel.host, channel.port))
        if forward is None or transport is not self._session:
            log.warning("the relay opened a channel for %s, which this agent has no "
                        "reverse forward listening on; refused", channel.destination)
            transport.refuse(channel, mux.OpenFailure.FORBIDDEN,
                             "no reverse forward of this agent listens there")
            return None
        channel.forward = forward.label
        if forward.protocol == UDP:
            return partial(self._connect_udp, transport, channel, forward)
        return partial(self._connect, transport, channel, forward)

    async def _connect_udp(self, transport: TunnelTransport, channel: ChannelStream,
                           forward: Forward) -> None:
        """One client's flow through a ``-R udp:`` listener: to the forward's target."""
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                sock = await connect_udp(forward.target_host, forward.target_port)
        except (OSError, trio.TooSlowError) as exc:
            reason, text = _failure(exc)
            log.warning("reverse udp flow via %s (%s): cannot reach %s: %s; refused",
                        forward.listen_text, forward.label, forward.target_text, text)
            transport.refuse(channel, reason, f"the agent cannot reach its target: {text}")
            return
        if not transport.accept(channel):
            sock.close()
            return
        finished = self._tracked()
        try:
            why = await carry_connected(channel, sock, idle_timeout=forward.udp_idle_timeout,
                                        budget=transport.datagram_budget)
            log.debug("reverse udp flow via %s (%s) ended: %s", forward.listen_text,
                      forward.label, why)
        finally:
            finished()

    async def _connect(self, transport: TunnelTransport, channel: ChannelStream,
                       forward: Forward) -> None:
        target = forward.target_text
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await dial_target(forward)
        except (OSError, trio.TooSlowError) as exc:
            reason, text = _failure(exc)
            log.warning("reverse connection via %s (%s): cannot connect to %s: %s; reset",
                        forward.listen_text, forward.label, target, text)
            transport.refuse(channel, reason, f"the agent cannot connect to its target: {text}")
            return
        sock = stream.socket
        tune_plain_socket(sock, notsent_lowat=False)
        set_abortive(sock)  # (a clean end clears it: net/ending.py)
        if not transport.accept(channel):
            await trio.aclose_forcefully(stream)
            return
        finished = self._tracked()
        if transport.observer is not None:
            transport.observer.channel_carried(channel, sock)
        if transport.attach(stream, channel, finished):
            return
        try:
            await splice_to_end(stream, channel)
        finally:
            finished()


def _reverse(forwards: Sequence[Forward]) -> tuple[Forward, ...]:
    return tuple(forward for forward in forwards if forward.kind == REVERSE)


async def dial_target(forward: Forward) -> trio.SocketStream:
    """Connect to ``forward``'s target; a dial the session's end interrupts resets
    what it had connected (net/dialing.py), so the target never sees a clean empty end."""
    if forward.target_path is not None:
        return await trio.open_unix_socket(forward.target_path)
    return await open_tcp(forward.target_host, forward.target_port)


def _failure(exc: BaseException) -> tuple[mux.OpenFailure, str]:
    if isinstance(exc, trio.TooSlowError):
        return mux.OpenFailure.TIMEOUT, f"no connection within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, socket.gaierror):
        return mux.OpenFailure.DNS_FAILURE, f"cannot resolve the name ({exc.strerror})"
    cause = exc
    grouped = getattr(exc.__cause__, "exceptions", None)  # trio's "all attempts failed"
    if grouped:
        cause = grouped[0]
    code = getattr(cause, "errno", None)
    text = (getattr(cause, "strerror", None) or str(cause)).lower()
    if code == errno.ECONNREFUSED:
        return mux.OpenFailure.REFUSED, "connection refused"
    if code in (errno.EACCES, errno.EPERM):
        return mux.OpenFailure.FORBIDDEN, text
    return mux.OpenFailure.UNREACHABLE, text

