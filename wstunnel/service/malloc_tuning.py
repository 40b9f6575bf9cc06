"""Keep freed 1 MiB buffers in the heap instead of handing them back to the kernel.

Every socket read of the tunnel allocates a buffer of up to 1 MiB. glibc
serves such sizes with mmap or trims them off the heap top once freed, so the
next read faults fresh zeroed pages in: on a bulk upload agent and relay took
~47,000 page faults a second each, and CPU per GiB fell by 14-20 % (ws://)
once buffers stayed put (benchmarks/tunnel.py; docs/PERFORMANCE.md).
The price: up to TRIM_THRESHOLD of freed memory stays resident.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from typing import Final

__all__ = ["keep_buffers_in_heap", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

log = logging.getLogger("wstunnel")

_M_TRIM_THRESHOLD: Final = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD: Final = -3
#: Allocations below this come from the heap (read buffers are up to 1 MiB).
MMAP_THRESHOLD: Final = 4 * 1024 * 1024
#: Free heap top kept before it is returned to the kernel.
TRIM_THRESHOLD: Final = 32 * 1024 * 1024


def keep_buffers_in_heap() -> bool:
    """Set glibc's thresholds for this process; False where libc is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        log.debug("mallopt refused the buffer thresholds; running with glibc's defaults")
    return done
