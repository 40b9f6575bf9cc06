"""Masking (RFC 6455 5.3): XOR the payload with a repeating 4-byte key.

Masking is the hot path of a client-to-server stream. Where the optional C
module ``_speedups`` was built at install time (setup.py; it needs a C
compiler), ``mask``, ``mask_int`` and ``mask_lanes`` are its 8-byte XOR loop.
Otherwise the standard library has no vector XOR, so we pick the fastest
stdlib route by size (measured on CPython 3.11): for short payloads one
big-integer XOR, for long ones four ``bytes.translate`` passes over the byte
lanes ``i % 4 == k``, each lane XORed with one key byte through a
precomputed 256-byte table. Both routes give the same bytes (tested).
"""

from __future__ import annotations

from typing import Final

__all__ = ["mask", "mask_int", "mask_lanes", "masked_frame", "new_buffer", "INT_MASK_LIMIT",
           "ACCELERATED"]

# Below this size one big-int XOR beats four translate passes (measured).
INT_MASK_LIMIT: Final = 512


def _xor_table(key_byte: int) -> bytes:
    """The 256-byte translate table mapping ``b`` to ``b ^ key_byte``."""
    identity = int.from_bytes(bytes(range(256)), "big")
    return (identity ^ int.from_bytes(bytes([key_byte]) * 256, "big")).to_bytes(256, "big")


_XOR_TABLES: Final = tuple(_xor_table(k) for k in range(256))


def mask_int(payload: bytes | bytearray | memoryview, mask_key: bytes) -> bytes:
    """XOR ``payload`` with the repeated key as one integer (fast when short)."""
    size = len(payload)
    key = (mask_key * ((size >> 2) + 1))[:size]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(size, "little")


def mask_lanes(buf: bytearray, start: int, mask_key: bytes) -> None:
    """XOR ``buf[start:]`` in place, one translate pass per key byte."""
    a, b, c, d = mask_key
    buf[start::4] = buf[start::4].translate(_XOR_TABLES[a])
    buf[start + 1 :: 4] = buf[start + 1 :: 4].translate(_XOR_TABLES[b])
    buf[start + 2 :: 4] = buf[start + 2 :: 4].translate(_XOR_TABLES[c])
    buf[start + 3 :: 4] = buf[start + 3 :: 4].translate(_XOR_TABLES[d])


def mask(payload: bytes | bytearray | memoryview, mask_key: bytes) -> bytes:
    """Mask or unmask ``payload`` (RFC 6455 5.3; the operation is its own inverse).

    Args:
        payload: the bytes to transform; not modified.
        mask_key: exactly four bytes.

    Returns:
        A new ``bytes`` object of the same length.
    """
    if len(mask_key) != 4:
        raise ValueError("mask_key must be 4 bytes")
    if len(payload) <= INT_MASK_LIMIT:
        return mask_int(payload, mask_key) if payload else b""
    buf = bytearray(payload)
    mask_lanes(buf, 0, mask_key)
    return bytes(buf)


def masked_frame(header: bytes, prefix: bytes, payload: bytes | bytearray | memoryview,
                 mask_key: bytes) -> bytes | bytearray:
    """``header`` followed by ``prefix + payload`` masked, in one new buffer."""
    buf = bytearray(header)
    start = len(buf)
    buf += prefix
    buf += payload
    mask_lanes(buf, start, mask_key)
    return buf


def new_buffer(size: int) -> bytearray:
    """A receive buffer of ``size`` bytes (the C module skips the zeroing)."""
    return bytearray(size)


py_mask, py_mask_int, py_mask_lanes, py_masked_frame = mask, mask_int, mask_lanes, masked_frame

try:
    from ._speedups import mask_into as _mask_into
    from ._speedups import masked as _masked
    from ._speedups import masked_frame as _masked_frame
    from ._speedups import uninitialized as _uninitialized
except ImportError:  # built without a C compiler: the pure-Python route above
    ACCELERATED = False
else:
    ACCELERATED = True

    def new_buffer(size: int) -> bytearray:  # noqa: F811 (a read fills it: zeroing is wasted)
        return _uninitialized(size)

    def mask(payload: bytes | bytearray | memoryview, mask_key: bytes) -> bytes:  # noqa: F811
        return _masked(payload, mask_key)

    mask_int = mask  # noqa: F811 (no size trade-off in C)

    def mask_lanes(buf: bytearray, start: int, mask_key: bytes) -> None:  # noqa: F811
        _mask_into(buf, start, mask_key)

    def masked_frame(header: bytes, prefix: bytes,  # noqa: F811
                     payload: bytes | bytearray | memoryview,
                     mask_key: bytes) -> bytes | bytearray:
        return _masked_frame(header, prefix, payload, mask_key)  # one pass, no bytearray
