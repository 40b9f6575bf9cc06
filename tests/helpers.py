"""Shared test helpers for sans-IO objects (no trio, no sockets)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Protocol

from wstunnel.ws import Role, WebSocketConnection


class _Receiver(Protocol):
    def receive_data(self, data: bytes) -> None: ...


class _Peer(_Receiver, Protocol):
    def data_to_send(self) -> bytes: ...


def feed_bytewise(receiver: _Receiver, data: bytes) -> None:
    """Feed ``data`` one byte per ``receive_data`` call."""
    for i in range(len(data)):
        receiver.receive_data(data[i : i + 1])


def feed_chunks(receiver: _Receiver, data: bytes, cuts: Iterable[int]) -> None:
    """Feed ``data`` split at the given offsets (sorted, duplicates ignored)."""
    start = 0
    for cut in sorted(set(cuts)):
        if 0 < cut < len(data):
            receiver.receive_data(data[start:cut])
            start = cut
    receiver.receive_data(data[start:])


def counting_random_bytes(seed: int = 0) -> Callable[[int], bytes]:
    """A deterministic stand-in for ``os.urandom``: 0, 1, 2, ... mod 256."""
    counter = itertools.count(seed)

    def random_bytes(size: int) -> bytes:
        return bytes(next(counter) % 256 for _ in range(size))

    return random_bytes


def ws_pair(
    *, max_message_size: int = 1 << 20, seed: int = 0
) -> tuple[WebSocketConnection, WebSocketConnection]:
    """A client and a server connection with deterministic masking keys."""
    client = WebSocketConnection(
        Role.CLIENT, max_message_size=max_message_size, random_bytes=counting_random_bytes(seed)
    )
    server = WebSocketConnection(Role.SERVER, max_message_size=max_message_size)
    return client, server


def pump(a: _Peer, b: _Peer, *, max_rounds: int = 100) -> int:
    """Move ``data_to_send()`` between two peers until both are quiet.

    Returns:
        The number of bytes moved.

    Raises:
        AssertionError: the peers were still talking after ``max_rounds``.
    """
    moved = 0
    for _ in range(max_rounds):
        a_out = a.data_to_send()
        if a_out:
            b.receive_data(a_out)
        b_out = b.data_to_send()
        if b_out:
            a.receive_data(b_out)
        if not a_out and not b_out:
            return moved
        moved += len(a_out) + len(b_out)
    raise AssertionError(f"peers still talking after {max_rounds} rounds")
