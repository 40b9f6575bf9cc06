"""A bare TCP forwarder, to measure what any Python tunnel pays (benchmarks/floor.py).

``python _forwarder.py MODE LISTEN_PORT TARGET_PORT`` accepts on 127.0.0.1, connects
each connection to the target and copies bytes both ways until either side ends,
then prints nothing more: it announces ``ready`` on stdout once listening.

Two of them chained (client -> forwarder -> forwarder -> echo) have the shape of
agent and relay without anything a tunnel adds (framing, a multiplexer, flow
control, TLS): what is left is the interpreter's and the event loop's cost per
wake-up and per connection, the floor under wstunnel's round-trip and churn rows.

- ``trio``: trio with raw non-blocking sockets and its readiness waits, a task
  per direction (leaner than trio's stream objects, as wstunnel's socket pump);
- ``selectors``: one thread, the standard library's epoll selector, non-blocking
  sockets, no tasks and no framework: the least Python can do per wake-up.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import sys


def _tuned(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _shut(sock: socket.socket) -> bool:
    """Pass an EOF on; False when the peer is gone already."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return False
    return True


def _send_some(sock: socket.socket, data: bytes) -> int | None:
    """What the kernel takes of ``data`` now; None when the peer is gone."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0
    except OSError:
        return None


def run_trio(listen_port: int, target_port: int) -> None:
    import trio

    async def copy(source: socket.socket, sink: socket.socket) -> None:
        # Raw non-blocking sockets and trio's readiness waits, as wstunnel's
        # socket pump does: no stream objects, a task per direction.
        try:
            while True:
                try:
                    data = source.recv(256 * 1024)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(source)
                    continue
                if not data:
                    _shut(sink)
                    return
                view = memoryview(data)
                while view:
                    try:
                        view = view[sink.send(view):]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sink)
        except OSError:
            return

    async def handle(client: socket.socket) -> None:
        target = _tuned(socket.socket())
        target.setblocking(False)
        with client, target:
            try:
                target.connect(("127.0.0.1", target_port))
            except BlockingIOError:
                await trio.lowlevel.wait_writable(target)
            except OSError:
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(copy, client, target)
                nursery.start_soon(copy, target, client)

    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", listen_port), backlog=1024)
        listener.setblocking(False)
        print("ready", flush=True)
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(listener)
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    continue
                client.setblocking(False)
                nursery.start_soon(handle, _tuned(client))

    trio.run(main)


class _Pair:
    """Two non-blocking sockets and what each still has to send to the other."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.peer = {a: b, b: a}
        self.pending: dict[socket.socket, bytes] = {a: b"", b: b""}  # to send on the key
        self.ended: set[socket.socket] = set()  # sockets whose reading side ended


def run_selectors(listen_port: int, target_port: int) -> None:
    sel = selectors.DefaultSelector()
    listener = socket.create_server(("127.0.0.1", listen_port), backlog=1024)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    print("ready", flush=True)

    registered: dict[socket.socket, int] = {}

    def close(pair: _Pair) -> None:
        for sock in pair.peer:
            if registered.pop(sock, 0):
                sel.unregister(sock)
            sock.close()

    def update(pair: _Pair, sock: socket.socket) -> None:
        events = 0 if sock in pair.ended or pair.pending[pair.peer[sock]] else selectors.EVENT_READ
        if pair.pending[sock]:
            events |= selectors.EVENT_WRITE
        now = registered.get(sock, 0)
        if events == now:
            return
        if not events:
            sel.unregister(sock)
        elif now:
            sel.modify(sock, events, pair)
        else:
            sel.register(sock, events, pair)
        registered[sock] = events

    def readable(pair: _Pair, sock: socket.socket) -> bool:
        other = pair.peer[sock]
        try:
            data = sock.recv(256 * 1024)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            pair.ended.add(sock)
            update(pair, sock)
            if not pair.pending[other]:
                return _shut(other) and len(pair.ended) < 2
            return len(pair.ended) < 2
        sent = _send_some(other, data)
        if sent is None:
            return False
        pair.pending[other] = data[sent:]
        update(pair, sock)
        update(pair, other)
        return True

    def writable(pair: _Pair, sock: socket.socket) -> bool:
        data = pair.pending[sock]
        if data:
            sent = _send_some(sock, data)
            if sent is None:
                return False
            pair.pending[sock] = data[sent:]
            if not pair.pending[sock] and pair.peer[sock] in pair.ended and not _shut(sock):
                return False
        update(pair, sock)
        update(pair, pair.peer[sock])
        return True

    while True:
        for key, mask in sel.select():
            if key.data is None:
                client, _ = listener.accept()
                try:
                    target = _tuned(socket.create_connection(("127.0.0.1", target_port)))
                except OSError:
                    client.close()
                    continue
                _tuned(client)
                pair = _Pair(client, target)
                for sock in (client, target):
                    sock.setblocking(False)
                    update(pair, sock)
                continue
            pair, ready = key.data, key.fileobj
            if not isinstance(ready, socket.socket) or ready not in registered:
                continue  # closed earlier in this round
            alive = True
            if mask & selectors.EVENT_READ:
                alive = readable(pair, ready)
            if alive and mask & selectors.EVENT_WRITE:
                alive = writable(pair, ready)
            if not alive:
                close(pair)


def main(argv: list[str]) -> int:
    mode, listen_port, target_port = argv[0], int(argv[1]), int(argv[2])
    with contextlib.suppress(KeyboardInterrupt):
        (run_trio if mode == "trio" else run_selectors)(listen_port, target_port)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
