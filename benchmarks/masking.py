"""Masking alternatives in pure Python (RFC 6455 5.3), timed on one payload size.

Why: masking is the per-byte cost of every upload (the agent masks, the relay
unmasks), and the standard library has no vector XOR. This prints the time
per call of the route wstunnel uses (four ``bytes.translate`` lane passes)
beside whole-buffer integer XOR variants and the parts they are made of.

    .venv/bin/python benchmarks/masking.py            # 16 KiB
    .venv/bin/python benchmarks/masking.py --size 65536
"""

from __future__ import annotations

import argparse
import os
import timeit
from collections.abc import Callable

from wstunnel.ws.masking import mask

_ONES: dict[int, int] = {}


def int_xor_multiplied(payload: bytes, key: bytes) -> bytes:
    """Key repeated by one big-int multiplication (cached 0x00000001... per size), one XOR."""
    size = len(payload)
    words = (size + 3) // 4
    ones = _ONES.get(words)
    if ones is None:
        ones = _ONES[words] = int.from_bytes(b"\x01\x00\x00\x00" * words, "little")
    keystream = int.from_bytes(key, "little") * ones
    return (int.from_bytes(payload, "little") ^ keystream).to_bytes(words * 4, "little")[:size]


def int_xor_repeated(payload: bytes, key: bytes) -> bytes:
    """Key repeated as bytes, both converted to ints, one XOR."""
    size = len(payload)
    keystream = (key * (size // 4 + 1))[:size]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(keystream, "little")
    return value.to_bytes(size, "little")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16 * 1024)
    size = parser.parse_args().size
    payload, key = os.urandom(size), os.urandom(4)
    assert mask(payload, key) == int_xor_multiplied(payload, key) == \
        int_xor_repeated(payload, key)
    lane = bytearray(payload)[0::4]
    table = bytes(range(256))
    value = int.from_bytes(payload, "little")
    candidates: dict[str, Callable[[], object]] = {
        "translate, 4 lanes (used)": lambda: mask(payload, key),
        "int XOR, key by multiplication": lambda: int_xor_multiplied(payload, key),
        "int XOR, key repeated": lambda: int_xor_repeated(payload, key),
        "  part: int.from_bytes": lambda: int.from_bytes(payload, "little"),
        "  part: int.to_bytes": lambda: value.to_bytes(size, "little"),
        "  part: one lane slice": lambda: bytearray(payload)[0::4],
        "  part: one lane translate": lambda: lane.translate(table),
    }
    for name, call in candidates.items():
        seconds = min(timeit.repeat(call, number=2000, repeat=5)) / 2000
        print(f"{name:34s} {seconds * 1e6:8.2f} us  {size / seconds / 1e6:7.0f} MB/s")


if __name__ == "__main__":
    main()
