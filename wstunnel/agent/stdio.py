"""``wstunnel agent --stdio HOST:PORT``: one channel over stdin/stdout, then exit.

Theory of operation
-------------------
This is what ``ssh -o ProxyCommand='wstunnel agent ... --stdio %h:%p'`` runs:
ssh writes its side of the connection to our stdin and reads the other side
from our stdout, so stdout carries channel bytes and nothing else (logs go to
stderr) and the process lives exactly as long as the channel.

* Connect first, without the agent's endless reconnecting: the relay must be
  reached within ``connect_wait_timeout`` (retrying with the usual backoff);
  a refused token is final at once. Either failure is a ``StdioFailed``.
* Then open the channel and splice it with stdin/stdout (net/splice.py: reads
  from stdin are sized by the channel's send credit and writes to stdout wait
  for the reader, so a huge transfer buffers no more than one window each way).
  EOF on stdin is a FIN; the channel's FIN closes stdout.
* Both directions ended cleanly: return (exit 0). Refused, reset or the
  session lost: ``StdioFailed`` with one line saying what happened and what to
  check (exit 1).

stdin and stdout are put into non-blocking mode for trio (``FdStream``); that
mode belongs to the file description, which the parent (ssh, a terminal)
shares, so it is restored when the streams close, on every path out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from typing import Final

import trio

from .. import ws
from ..addresses import HostPort
from ..config import AgentConfig
from ..errors import ChannelRefused, ChannelReset, SessionClosed, TunnelError
from ..net.channel_stream import ChannelStream
from ..net.splice import splice
from ..net.transport import TunnelTransport
from .agent import Agent
from .reconnect import Reconnect

__all__ = ["StdioFailed", "StdioStream", "run_stdio"]

log = logging.getLogger("wstunnel.agent")

#: How long the session may take to close politely once the channel is done.
CLOSE_TIMEOUT: Final = 2.0


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
        agent = Agent(config)
        transport = await _connect(agent, config.connect_wait_timeout)
        async with trio.open_nursery() as nursery:
            session_scope = trio.CancelScope(shield=True)
            nursery.start_soon(_serve_until_closed, agent, transport, session_scope)
            try:
                await _carry(transport, target, stream, agent.relay.url)
            finally:
                try:
                    with trio.CancelScope(shield=True):
                        await transport.close(ws.CloseCode.GOING_AWAY, "stdio channel done",
                                              timeout=CLOSE_TIMEOUT)
                finally:  # (whatever close did: the shielded session must not hold on)
                    session_scope.cancel()
                    nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_until_closed(agent: Agent, transport: TunnelTransport,
                              scope: trio.CancelScope) -> None:
    """Shielded: when run_stdio is cancelled (SIGHUP from ssh, SIGTERM, Ctrl-C), the
    session still sends its close, or the relay would keep the destination open for
    a resume that never comes."""
    with scope:
        await agent.serve(transport)


async def _connect(agent: Agent, timeout: float) -> TunnelTransport:
    """The first session, retrying until ``timeout`` with the agent's jittered backoff
    (many ProxyCommands started together must not retry in step); a refusal is final
    at once."""
    deadline = trio.current_time() + timeout
    backoff = Reconnect(lambda: agent.config)
    while True:
        try:
            return await agent.connect_once()
        except (OSError, TunnelError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            reason, retry = agent.connect_failure(exc)
            if not retry:  # (reached, and turned away: no timeout or attempts to blame)
                raise StdioFailed(f"relay {agent.relay.url} refused us: {reason}") from exc
            attempt, delay = backoff.connect_failed(agent.relay, refused=False)
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise StdioFailed(f"cannot reach relay {agent.relay.url}: {reason} (gave up "
                                  f"after {attempt} attempt{'s' * (attempt != 1)}; "
                                  f"connect_wait_timeout is {timeout:g} s)") from exc
            log.info("cannot reach relay %s (attempt %d): %s; retrying in %.1f s",
                     agent.relay.url, attempt, reason, delay)
            await trio.sleep(min(delay, remaining))


async def _carry(transport: TunnelTransport, target: HostPort,
                 stream: trio.abc.HalfCloseableStream, relay: str) -> None:
    try:
        channel = transport.open_channel(target.host, target.port, forward="--stdio")
    except (SessionClosed, ChannelRefused) as exc:
        raise StdioFailed(f"cannot open a channel to {target}: {exc}") from exc
    try:
        clean = await splice(stream, channel)
    except BaseException:  # cancelled: reset before the session closes, not "lost" with it
        channel.abort("the agent was stopped")
        raise
    if not clean:
        raise StdioFailed(_failure(target, channel, relay))
    await _wait_sent(transport, channel, target, relay)


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


def _failure(target: HostPort, channel: ChannelStream, relay: str) -> str:
    """One line: how the channel ended badly, and what to check. (The only line: the
    session's own warnings about losing its channels are hidden, cli/main.py.)"""
    error = channel.error
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
