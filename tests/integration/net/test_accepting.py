"""net/accepting.py: what accept() errors do to the accept loop."""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio

from wstunnel.net import accepting

from ..log_watch import LogWatch


class _ShortOfDescriptors(socket.socket):
    """A listener whose first ``failures`` accepts find no free descriptor."""

    failures = 0

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return super().accept()


async def test_a_long_descriptor_shortage_is_logged_once_and_then_accepts(
    monkeypatch: pytest.MonkeyPatch, logs: LogWatch,
) -> None:
    """Out of descriptors for many retries: one log line, not one per retry (an hour
    of EMFILE would be 36 000 lines); the waiting connection is accepted after."""
    monkeypatch.setattr(accepting, "_RETRY_INTERVAL", 0.001)
    listener = _ShortOfDescriptors()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    listener.failures = 20
    accepted = trio.Event()

    def on_accept(sock: socket.socket) -> None:
        sock.close()
        accepted.set()

    client = trio.socket.socket()
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accepting.accept_forever, listener, on_accept)
                await client.connect(listener.getsockname())
                await accepted.wait()
                nursery.cancel_scope.cancel()
    finally:
        client.close()
    assert listener.failures == 0
    assert len([line for line in logs.lines if "accept returned EMFILE" in line]) == 1
