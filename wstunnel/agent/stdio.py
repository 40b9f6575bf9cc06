"""``wstunnel agent --stdio HOST:PORT``: one channel over stdin/stdout, then exit.

Theory of operation
-------------------
This is what ``ssh -o ProxyCommand='wstunnel agent ... --stdio %h:%p'`` runs:
ssh writes its side of the connection to our stdin and reads the other side
from our stdout, so stdout carries channel bytes and nothing else (logs go to
stderr) and the process lives exactly as long as the channel.

* Connect first, without the agent's endless reconnecting: a relay must be
  reached within ``connect_wait_timeout``. With several relays the choice is
  the daemon agent's (reconnect.py): the first, in the configured order, whose
  jittered backoff is over, so a relay that is down or answers 503 sends us on
  to the next at once. A refused token is final once every relay refused it.
  Either failure is a ``StdioFailed``. Each attempt gets an ``Agent`` of its
  own that knows only the relay chosen: a resume goes back to the relay that
  holds the session, and the daemon's move back to the preferred relay (which
  ends an idle session: ours has no counted connection) never applies.
* Until the destination is known to be reached, the channel may be opened
  again on the next relay: when the relay goes away first (GOAWAY before our
  OPEN, or an OPEN refused for it) or the session is lost before anything was
  sent. Bytes read from stdin meanwhile are held (``_HeldInput``, at most one
  window) and sent again; once the relay confirms the channel or anything
  reaches stdout, nothing is retried (the destination may have acted on them).
* Then open the channel and splice it with stdin/stdout (net/splice.py: reads
  from stdin are sized by the channel's send credit and writes to stdout wait
  for the reader, so a huge transfer buffers no more than one window each way).
  EOF on stdin is a FIN; the channel's FIN closes stdout.
* Both directions ended cleanly and the relay answered our close (which it
  sends only once it has read our FIN): return (exit 0). Refused, reset or the
  session lost: ``StdioFailed`` with one line saying what happened and what to
  check (exit 1).

stdin and stdout are put into non-blocking mode for trio (``FdStream``); that
mode belongs to the file description, which the parent (ssh, a terminal)
shares, so it is restored when the streams close, on every path out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import stat
from typing import Final

import trio

from .. import mux, ws
from ..addresses import HostPort
from ..config import AgentConfig, RelayURL
from ..errors import ChannelRefused, ChannelReset, SessionClosed, TunnelError
from ..net.channel_stream import ChannelStream
from ..net.splice import splice
from ..net.transport import TunnelTransport
from .agent import Agent
from .reconnect import Reconnect

__all__ = ["StdioFailed", "StdioStream", "run_stdio"]

log = logging.getLogger("wstunnel.agent")

#: How long the session may take to close politely after a failure.
CLOSE_TIMEOUT: Final = 2.0
_DONE: Final = "stdio channel done"


class StdioFailed(TunnelError):
    """The one channel could not be opened or did not end cleanly (exit 1)."""


class StdioStream(trio.abc.HalfCloseableStream):
    """stdin (read side) and stdout (write side) as one half-closeable stream.

    ``send_eof`` closes the write side: the reader of our stdout sees EOF. The
    descriptors passed in are owned (closed, with their blocking mode restored).
    """

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._reader = trio.lowlevel.FdStream(read_fd)
        self._writer = trio.lowlevel.FdStream(write_fd)
        self._write_fd = write_fd

    @classmethod
    def from_stdio(cls) -> StdioStream:
        """Duplicates of fds 0 and 1; see ``send_eof`` for how fd 1 is closed."""
        return cls(os.dup(0), os.dup(1))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._reader.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._writer.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._writer.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if self._writer.fileno() >= 0:  # (not closed yet)
            _shutdown_if_socket(self._write_fd)
        await self._writer.aclose()
        _close_stdout()

    async def aclose(self) -> None:
        try:
            await self._writer.aclose()
        finally:
            await self._reader.aclose()


def _shutdown_if_socket(fd: int) -> None:
    """A socket given as both stdin and stdout (one socketpair) stays open through
    fd 0 when fd 1 closes: only shutdown(SHUT_WR) tells its reader we are done."""
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        with socket.socket(fileno=os.dup(fd)) as sock, contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


def _close_stdout() -> None:
    """Our duplicate of fd 1 is closed; fd 1 itself is replaced by /dev/null, so that
    no descriptor refers to the pipe any more (its reader sees EOF) and nothing
    opened later takes the number 1."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
    finally:
        os.close(null)


class _HeldInput(trio.abc.HalfCloseableStream):
    """The stdio stream, keeping what is read from it until ``commit``, so that a
    channel opened again (on the next relay) gets those bytes too (``rewind``). Writing
    to it commits: once stdout has bytes, the channel cannot start over. Splice reads
    only as much as the channel's credit allows, so at most one window is held."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self._stream = stream
        self._held = bytearray()
        self._given = 0  # (how much of _held this attempt has read)
        self._eof = False  # (stdin ended while held)
        self.committed = False
        self.anything_read = False

    def commit(self) -> None:
        """The channel reached its destination: nothing will be sent again."""
        self.committed = True
        del self._held[:self._given]  # (what this attempt has not read yet is still due)
        self._given = 0

    def rewind(self) -> None:
        """The next attempt reads everything held again, from the start."""
        self._given = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._given < len(self._held):
            end = len(self._held) if max_bytes is None else self._given + max_bytes
            held = bytes(self._held[self._given:end])
            self._given += len(held)
            return held
        if self._eof:
            return b""
        data = await self._stream.receive_some(max_bytes)
        self.anything_read = True
        if not self.committed:
            self._held += data
            self._given += len(data)
            self._eof = not data
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.commit()
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        self.commit()
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def run_stdio(config: AgentConfig, target: HostPort,
                    stream: trio.abc.HalfCloseableStream | None = None) -> None:
    """Carry ``stream`` (default: stdin/stdout) as one channel to ``target``; return
    when both directions ended. ``stream`` is closed on every path out.

    Raises:
        StdioFailed: the relay was not reached, the channel was refused or reset,
            or the session was lost; the message says which and what to check.
    """
    stream = stream if stream is not None else StdioStream.from_stdio()
    try:
        relays = Reconnect(lambda: config)
        deadline = trio.current_time() + config.connect_wait_timeout
        held = _HeldInput(stream)
        while True:
            agent, transport = await _connect(config, relays, deadline)
            started = trio.current_time()
            try:
                return await _run_session(agent, transport, target, held)
            except _Retry as retry:
                # (a relay that takes sessions and goes away at once backs off)
                delay = relays.session_ended(agent.relay, trio.current_time() - started)
                if trio.current_time() >= deadline:
                    raise StdioFailed(retry.message) from retry.__cause__
                log.info("%s; opening the channel again (%s backs off %.1f s)",
                         retry.message, agent.relay.url, delay)
                held.rewind()
    finally:
        await trio.aclose_forcefully(stream)


class _Retry(Exception):  # noqa: N818 (a control-flow signal, not an error people see)
    """The channel did not reach its destination and nothing reached stdout: it may be
    opened again on the relay that answers next (``message``: what to say if not)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def _run_session(agent: Agent, transport: TunnelTransport, target: HostPort,
                       held: _HeldInput) -> None:
    retry: _Retry | None = None
    async with trio.open_nursery() as nursery:
        session_scope = trio.CancelScope(shield=True)
        nursery.start_soon(_serve_until_closed, agent, transport, session_scope)
        try:
            await _carry(transport, target, held, agent.relay.url)
            await _close_confirmed(transport, target, agent.relay.url, agent.config.ping_timeout)
        except _Retry as exc:  # (raised out of the nursery, it would come in a group)
            retry = exc
        finally:
            try:
                with trio.CancelScope(shield=True):
                    await transport.close(ws.CloseCode.GOING_AWAY, _DONE, timeout=CLOSE_TIMEOUT)
            finally:  # (whatever close did: the shielded session must not hold on)
                session_scope.cancel()
                nursery.cancel_scope.cancel()
                await agent.discard_fresh()
    if retry is not None:
        raise retry


async def _serve_until_closed(agent: Agent, transport: TunnelTransport,
                              scope: trio.CancelScope) -> None:
    """Shielded: when run_stdio is cancelled (SIGHUP from ssh, SIGTERM, Ctrl-C), the
    session still sends its close, or the relay would keep the destination open for
    a resume that never comes."""
    with scope:
        await agent.serve(transport)


async def _connect(config: AgentConfig, relays: Reconnect,
                   deadline: float) -> tuple[Agent, TunnelTransport]:
    """A session on the relay ``relays`` chooses, retrying until ``deadline`` on the
    agent's jittered backoff (many ProxyCommands started together must not retry in
    step). A refusal is final once every relay has refused us."""
    failures: dict[RelayURL, str] = {}
    refused: set[RelayURL] = set()
    attempts = 0
    while True:
        _, ready_at = relays.next_relay(skip=refused)
        await trio.sleep_until(min(ready_at, deadline))
        relay, _ = relays.next_relay(skip=refused)  # (at the deadline: the one ready soonest)
        agent = Agent(_only(config, relay))
        attempts += 1
        try:
            transport = await agent.connect_once()
        except (OSError, TunnelError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            reason, retry = agent.connect_failure(exc)
            count, delay = relays.connect_failed(relay, refused=not retry)
            failures[relay] = reason
            if not retry:  # (reached, and turned away: no timeout or attempts to blame)
                refused.add(relay)
                if refused >= set(config.relay_urls):
                    raise StdioFailed(f"relay {relay.url} refused us: {reason}") from exc
            elif trio.current_time() >= deadline:
                raise StdioFailed(_unreachable(relay, failures, attempts, config)) from exc
            log.info("cannot reach relay %s (attempt %d): %s; %s backs off %.1f s",
                     relay.url, count, reason, relay.url, delay)
            continue
        relays.connected(relay)
        return agent, transport


def _only(config: AgentConfig, relay: RelayURL) -> AgentConfig:
    """``config`` with ``relay`` as its only relay."""
    if len(config.relay_urls) == 1:
        return config
    texts = (config.relay,) if isinstance(config.relay, str) else config.relay
    return dataclasses.replace(config, relay=dict(zip(config.relay_urls, texts,
                                                      strict=True))[relay])


def _unreachable(relay: RelayURL, failures: dict[RelayURL, str], attempts: int,
                 config: AgentConfig) -> str:
    """One line: the relay tried last and why, then the others'."""
    others = "".join(f"; nor relay {other.url}: {why}" for other, why in failures.items()
                     if other != relay)
    return (f"cannot reach relay {relay.url}: {failures[relay]}{others} (gave up after "
            f"{attempts} attempt{'s' * (attempts != 1)}; connect_wait_timeout is "
            f"{config.connect_wait_timeout:g} s)")


async def _carry(transport: TunnelTransport, target: HostPort, held: _HeldInput,
                 relay: str) -> None:
    try:
        channel = transport.open_channel(target.host, target.port, forward="--stdio")
    except (SessionClosed, ChannelRefused) as exc:
        message = f"cannot open a channel to {target}: {exc}"
        if isinstance(exc, SessionClosed):  # (GOAWAY or lost first: no OPEN went out)
            raise _Retry(message) from exc
        raise StdioFailed(message) from exc
    try:
        clean = await _splice(held, channel)
    except BaseException:  # cancelled: reset before the session closes, not "lost" with it
        channel.abort("the agent was stopped")
        raise
    if not clean and _may_open_again(channel, held):
        raise _Retry(_failure(target, channel, relay)) from channel.error
    if not clean:
        raise StdioFailed(_failure(target, channel, relay))
    await _wait_sent(transport, channel, target, relay)


async def _splice(held: _HeldInput, channel: ChannelStream) -> bool:
    """``splice``; what stdin gave stops being held once the relay confirms the channel."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_commit_when_opened, channel, held)
        clean = await splice(held, channel)
        nursery.cancel_scope.cancel()
    return clean


async def _commit_when_opened(channel: ChannelStream, held: _HeldInput) -> None:
    try:
        await channel.wait_opened()
    except trio.BrokenResourceError:  # (refused, reset or lost: splice ends and says which)
        return
    held.commit()


def _may_open_again(channel: ChannelStream, held: _HeldInput) -> bool:
    """The destination cannot have had a byte from us, and stdout has none yet: the
    relay refused the OPEN because it is going away, or the session was lost before
    stdin gave anything."""
    error = channel.error
    if held.committed:
        return False
    if isinstance(error, ChannelRefused):
        return error.reason == mux.OpenFailure.GOING_AWAY
    return isinstance(error, SessionClosed) and not held.anything_read


async def _wait_sent(transport: TunnelTransport, channel: ChannelStream, target: HostPort,
                     relay: str) -> None:
    """Both directions ended, but our last bytes and FIN may still wait to be sent,
    for a resume while the path is down: the close handshake must go after them, or
    they are lost and we exit 0. The channel is forgotten once its FIN is sent (or
    when the session is over: the relay's grace bounds the wait)."""
    await transport.wait_idle()
    if channel.error is not None or transport.end_reason is not None:
        reason = transport.end_reason or channel.error
        raise StdioFailed(f"lost the session to relay {relay} before it had the last bytes "
                          f"for {target}: {reason} \N{EM DASH} check the relay's log and the "
                          f"network to it, then connect again")


async def _close_confirmed(transport: TunnelTransport, target: HostPort, relay: str,
                           timeout: float) -> None:
    """Our FIN is written, but only the relay's answer to our close proves that it read
    the FIN and all before it: a path that breaks after the FIN went out, or while a
    resume replays it, must not end in exit 0 (the relay's grace then resets the
    destination). A peer silent for ``timeout`` (``ping_timeout``) counts as gone."""
    await transport.wait_carrier()  # (a resume in progress replays the FIN first)
    await transport.close(ws.CloseCode.GOING_AWAY, _DONE, timeout=timeout)
    if transport.close_confirmed:
        return
    why = transport.end_reason
    why = f"the session ended: {why}" if why and why != _DONE else (
        f"no answer to our close within {timeout:g} s")
    raise StdioFailed(f"relay {relay} did not confirm that it had the last bytes for {target} "
                      f"({why}), so {target} may not have them all \N{EM DASH} check the "
                      f"network to the relay, then send again")


def _failure(target: HostPort, channel: ChannelStream, relay: str) -> str:
    """One line: how the channel ended badly, and what to check. (The only line: the
    session's own warnings about losing its channels are hidden, cli/main.py.)"""
    error = channel.error
    if isinstance(error, ChannelRefused) and error.reason == mux.OpenFailure.GOING_AWAY:
        return (f"relay {relay} went away before it connected to {target}: {error} "
                f"\N{EM DASH} connect again (a relay behind a load balancer is stopping)")
    if isinstance(error, ChannelRefused):
        return (f"the relay could not connect to {target}: {error} (check that {target} "
                f"is up and that the relay's allow rules permit it)")
    if isinstance(error, ChannelReset):
        return f"the connection to {target} was reset: {error}"
    if error is not None:  # (SessionClosed: nothing else breaks a channel)
        reason = error.reason if isinstance(error, SessionClosed) and error.reason else error
        return (f"lost the session to relay {relay} while connected to {target}: {reason} "
                f"\N{EM DASH} check the relay's log and the network to it, then connect "
                f"again")
    return f"reading stdin or writing stdout failed; the connection to {target} was reset"
