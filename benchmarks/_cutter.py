"""A TCP forwarder between agent and relay that a test or benchmark cuts, as a broken
path would (tests/integration/test_resume.py, benchmarks/resume.py).

``cut(down)`` resets every connection through it at once (RST both ways, as when
a NAT forgets the mapping or a proxy restarts); for ``down`` seconds after, and
while ``down`` is set, new connections are reset as soon as they arrive. ``cut_after`` cuts when the
bytes forwarded reach a mark, so a test cuts mid-transfer by progress, not
by sleeping. ``downstream_rate`` makes the path a slow link, relay to agent;
``stall_upstream`` a path that silently stops passing what the agent sends.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Final

import trio

__all__ = ["PathCutter"]

#: What a paced (``downstream_rate``) path passes on at a time.
SLICE_SIZE: Final = 4096


class PathCutter:
    """Forwards 127.0.0.1:``port`` to the relay at ``target``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.down = False
        self.down_until = 0.0
        #: Answer WebSocket upgrades 426, as a proxy that drops the Upgrade header does
        #: (the relay then answers a plain request: "Upgrade Required"); pass the rest.
        self.strip_upgrades = False
        #: Bytes per second from the relay to the agent (0: as fast as loopback goes),
        #: passed on in small slices, as a slow link delivers them.
        self.downstream_rate = 0.0
        self.cuts = 0
        #: Cleared by ``stall_upstream``: what the agent sends is held here, not passed
        #: on (a path gone silent one way, with nothing reset).
        self._upstream = trio.Event()
        self._upstream.set()
        self.forwarded = 0
        self.connections = 0
        self._live: set[trio.SocketStream] = set()
        self._marks: list[tuple[int, Callable[[], None]]] = []
        self.cut_done = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    def cut_after(self, forwarded: int, then: Callable[[], None] | None = None) -> None:
        """Cut once ``forwarded`` bytes (both ways together) have passed."""
        self._marks.append((forwarded, then or (lambda: None)))
        self._marks.sort(key=lambda mark: mark[0])

    def cut(self, down: float = 0.0) -> None:
        """Reset every connection now; refuse new ones for ``down`` seconds."""
        self.down_until = trio.current_time() + down
        self.cuts += 1
        for stream in list(self._live):
            _reset(stream)
        self._live.clear()
        self._upstream.set()
        self.cut_done.set()
        self.cut_done = trio.Event()

    def stall_upstream(self) -> None:
        """From now on, pass nothing from the agent to the relay (until ``cut``)."""
        self._upstream = trio.Event()

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.down or trio.current_time() < self.down_until:
            _reset(client)
            return
        self.connections += 1
        first = b""
        if self.strip_upgrades:
            try:
                first = await client.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if b"upgrade: websocket" in first.lower():
                with contextlib.suppress(trio.BrokenResourceError):
                    await client.send_all(b"HTTP/1.1 426 Upgrade Required\r\n"
                                          b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                await client.aclose()
                return
        try:
            relay = await trio.open_tcp_stream("127.0.0.1", self.target)
            if first:
                await relay.send_all(first)
        except (OSError, trio.BrokenResourceError):
            _reset(client)
            return
        self._live |= {client, relay}
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, relay, nursery.cancel_scope)
                nursery.start_soon(self._pipe, relay, client, nursery.cancel_scope, True)
        finally:
            self._live -= {client, relay}
            _reset(client)
            _reset(relay)

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream,
                    scope: trio.CancelScope, downstream: bool = False) -> None:
        try:
            while data := await source.receive_some(65536):
                if downstream and self.downstream_rate:
                    await self._pace(sink, data)
                else:
                    if not self._upstream.is_set():
                        await self._upstream.wait()
                    await sink.send_all(data)
                self.forwarded += len(data)
                while self._marks and self.forwarded >= self._marks[0][0]:
                    _, then = self._marks.pop(0)
                    self.cut()
                    then()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()

    async def _pace(self, sink: trio.SocketStream, data: bytes) -> None:
        for start in range(0, len(data), SLICE_SIZE):
            piece = data[start:start + SLICE_SIZE]
            await trio.sleep(len(piece) / self.downstream_rate)
            await sink.send_all(piece)


def _reset(stream: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()
