"""Benchmark: wstunnel's WebSocket frame codec against wsproto, plus the mux cost.

Why: the codec and multiplexer are the tunnel's hot path, and wsproto is the
baseline we chose to beat (issue 2). Every figure is encode + decode of one
binary frame, the median of several timed repetitions, both codecs in the
same process, their timed rounds interleaved so that load from other
processes hits both alike; time is this process's CPU time, which a busy
machine disturbs less than wall time. Masked frames get a fresh random key
per frame, as a client must send them.

    .venv/bin/python benchmarks/codec.py [--repeat 5] [--check]

``--check`` exits 1 when a target is missed (targets: unmasked >= 5x wsproto,
masked >= 1.2x wsproto, multiplexer <= 3 us per 16 KiB chunk). Where the
optional C masking module is built, the masked rows are timed twice: with it,
and with the pure-Python route it replaces (the target holds for both).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from wsproto.frame_protocol import FrameProtocol

from wstunnel.ws import FrameDecoder, Opcode, encode_frame, frames, masking

CHUNK_SIZE: Final = 16 * 1024
SMALL_SIZE: Final = 64
#: Each timed repetition runs about this long.
REP_SECONDS: Final = 0.15
UNMASKED_TARGET: Final = 5.0
MASKED_TARGET: Final = 1.2
MUX_TARGET_US: Final = 3.0

#: One round: encode and decode ``n`` frames, return seconds per frame.
Round = Callable[[int], float]


def ours(payload: bytes, masked: bool) -> Round:
    """Encode+decode with wstunnel.ws (client->server when masked)."""
    decoder = FrameDecoder(client=not masked, max_frame_size=1 << 20)
    urandom = os.urandom

    def run(n: int) -> float:
        start = time.process_time()
        for _ in range(n):
            key = urandom(4) if masked else None
            decoder.receive_data(encode_frame(Opcode.BINARY, payload, mask_key=key))
            frame = decoder.next_frame()
        elapsed = time.process_time() - start
        assert frame is not None and frame.payload == payload
        return elapsed / n

    return run


def wsproto(payload: bytes, masked: bool) -> Round:
    """Encode+decode with wsproto's frame layer (it masks when ``client``)."""
    sender = FrameProtocol(client=masked, extensions=[])
    receiver = FrameProtocol(client=not masked, extensions=[])

    def run(n: int) -> float:
        frames = []
        start = time.process_time()
        for _ in range(n):
            # wsproto accepts the bytearray it produces; a bytes() copy would be unfair.
            receiver.receive_bytes(cast(bytes, sender.send_data(payload, fin=True)))
            frames = list(receiver.received_frames())
        elapsed = time.process_time() - start
        assert len(frames) == 1 and frames[0].payload == payload
        return elapsed / n

    return run


def _calibrated(round_: Round) -> int:
    """Frames per round so that one round takes about REP_SECONDS."""
    per = min(round_(50) for _ in range(3))
    return max(50, int(REP_SECONDS / max(per, 1e-9)))


def compare(mine: Round, base: Round, repeat: int) -> tuple[float, float, float]:
    """Median seconds per frame for each codec and the median of paired ratios."""
    n_mine, n_base = _calibrated(mine), _calibrated(base)
    pairs = [(mine(n_mine), base(n_base)) for _ in range(repeat)]
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(p[1] / p[0] for p in pairs))


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    ours: float
    theirs: float
    unit: str
    #: How many times faster we are: the median of paired ratios.
    ratio: float
    target: float | None

    @property
    def meets_target(self) -> bool:
        return self.target is None or self.ratio >= self.target


@contextlib.contextmanager
def pure_python_masking() -> Iterator[None]:
    """The codec with the pure-Python masking route, as without a C compiler."""
    names = ("mask", "mask_int", "mask_lanes", "masked_frame")
    saved = [getattr(frames, name) for name in names]
    for name in names:
        setattr(frames, name, getattr(masking, "py_" + name))
    frames.ACCELERATED = False  # type: ignore[misc]
    try:
        yield
    finally:
        frames.ACCELERATED = True  # type: ignore[misc]
        for name, value in zip(names, saved, strict=True):
            setattr(frames, name, value)


def measure_codec(repeat: int) -> list[Row]:
    """Time both codecs on 16 KiB and 64 B frames, masked and unmasked."""
    rows: list[Row] = []
    cases = [(CHUNK_SIZE, False, UNMASKED_TARGET, False), (CHUNK_SIZE, True, MASKED_TARGET, False),
             (SMALL_SIZE, False, None, False), (SMALL_SIZE, True, None, False)]
    if masking.ACCELERATED:
        cases[2:2] = [(CHUNK_SIZE, True, MASKED_TARGET, True)]
        cases.append((SMALL_SIZE, True, None, True))
    for size, masked, target, pure in cases:
        payload = os.urandom(size)
        with pure_python_masking() if pure else contextlib.nullcontext():
            mine, base, ratio = compare(ours(payload, masked), wsproto(payload, masked), repeat)
        kind = "masked" if masked else "unmasked"
        if masked and masking.ACCELERATED:
            kind += ", pure Python" if pure else ", C"
        if size == CHUNK_SIZE:
            rows.append(Row(f"16 KiB {kind}", size / mine / 1e6, size / base / 1e6,
                            "MB/s", ratio, target))
        else:
            rows.append(Row(f"64 B {kind}", mine * 1e6, base * 1e6, "us/frame", ratio, target))
    return rows


def measure_mux() -> tuple[float, float, float]:
    """(both sides, sender, receiver) microseconds per 16 KiB chunk (mux_cost.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mux_cost

    return (mux_cost.measure(), *mux_cost.measure_sides())


def report(rows: list[Row], mux_us: tuple[float, float, float]) -> bool:
    """Print the table; return whether every target was met."""
    print(f"{'encode+decode, median':28} {'wstunnel':>10} {'wsproto':>10} {'unit':>9}"
          f" {'ratio':>7}  target")
    ok = True
    for row in rows:
        target = "" if row.target is None else f">= {row.target:g}x"
        verdict = "" if row.target is None else ("ok" if row.meets_target else "MISSED")
        print(f"{row.label:28} {row.ours:10.2f} {row.theirs:10.2f} {row.unit:>9}"
              f" {row.ratio:6.2f}x  {target} {verdict}".rstrip())
        ok = ok and row.meets_target
    both, sent, received = mux_us
    mux_ok = both <= MUX_TARGET_US
    print(f"mux: {both:.2f} us per 16 KiB chunk, send+receive  target <= {MUX_TARGET_US:g} us "
          f"{'ok' if mux_ok else 'MISSED'}")
    print(f"mux: {sent:.2f} us to send, {received:.2f} us to receive (each process's share)")
    ok = ok and mux_ok
    return ok


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; with ``--check`` exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    ok = report(measure_codec(args.repeat), measure_mux())
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
