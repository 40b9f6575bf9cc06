"""The addresses of this host's own interfaces, so the relay can refuse to dial itself.

A channel to one of them reaches services that listen on the relay host (an
sshd, the relay's own metrics) from the inside, as loopback would; policy.py
refuses them unless a rule names them exactly. No extra dependency, and no
shelling out to ``ip``:

* IPv4 on Linux: the ``host LOCAL`` entries of ``/proc/net/fib_trie`` (every
  address, secondary ones included); when that file is missing, the
  ``SIOCGIFCONF`` ioctl (one address per interface label);
* IPv6 on Linux: ``/proc/net/if_inet6``;
* elsewhere: what the host name resolves to, plus the source address the
  kernel would use towards an outside address (a UDP ``connect`` sends no
  packet). That misses addresses of other interfaces, so the relay says so
  in its log.

The answer is read once at start and again on every reload: an address
added later is protected only from the next reload (SIGHUP) on.
"""

from __future__ import annotations

import array
import contextlib
import ipaddress
import logging
import re
import socket
import struct
import sys
from collections.abc import Callable
from typing import Final

from ..addresses import IPAddress, parse_ip

__all__ = ["local_addresses", "parse_fib_trie", "parse_if_inet6"]

log = logging.getLogger("wstunnel.relay")

FIB_TRIE: Final = "/proc/net/fib_trie"
IF_INET6: Final = "/proc/net/if_inet6"
_SIOCGIFCONF: Final = 0x8912  # Linux
_IFREQ_SIZE: Final = 40  # struct ifreq on 64-bit Linux: 16 bytes of name, 24 of union
_MAX_INTERFACES: Final = 1024
_FIB_ADDRESS: Final = re.compile(r"^\s*\|-- (\d+\.\d+\.\d+\.\d+)\s*$")  # a leaf
_FIB_LOCAL: Final = re.compile(r"^\s*/32 host LOCAL")
# Where to point a UDP socket to learn the source address (documentation ranges:
# the route lookup is all that happens, no packet is sent).
_PROBES: Final = ((socket.AF_INET, "198.51.100.1"), (socket.AF_INET6, "2001:db8::1"))


def local_addresses() -> frozenset[IPAddress]:
    """Every address of this host's interfaces, loopback included (best effort:
    see the module docstring; never raises)."""
    if sys.platform.startswith("linux"):
        v4 = _read(FIB_TRIE, parse_fib_trie)
        if v4 is None:
            v4 = _from_ioctl()
        v6 = _read(IF_INET6, parse_if_inet6)
        if v4 is not None and v6 is not None:
            return frozenset(v4 | v6)
        return frozenset((v4 or set()) | (v6 or set()) | _from_name_and_routes())
    found = _from_name_and_routes()
    log.info("this host's own addresses come from its name and routes only on %s: %s; "
             "other interfaces' addresses are not known to the relay", sys.platform,
             ", ".join(sorted(map(str, found))) or "none found")
    return frozenset(found)


def parse_fib_trie(text: str) -> set[IPAddress]:
    """The local IPv4 addresses in ``/proc/net/fib_trie`` (``/32 host LOCAL`` entries)."""
    found: set[IPAddress] = set()
    last: str | None = None
    for line in text.splitlines():
        entry = _FIB_ADDRESS.match(line)
        if entry is not None:
            last = entry.group(1)
        elif last is not None and _FIB_LOCAL.match(line):
            address = parse_ip(last)
            if address is not None:
                found.add(address)
    return found


def parse_if_inet6(text: str) -> set[IPAddress]:
    """The IPv6 addresses in ``/proc/net/if_inet6`` (32 hex digits first on each line)."""
    found: set[IPAddress] = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            with contextlib.suppress(ValueError):
                found.add(ipaddress.IPv6Address(int(fields[0], 16)))
    return found


def _read(path: str, parse: Callable[[str], set[IPAddress]]) -> set[IPAddress] | None:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return parse(file.read())
    except OSError as exc:
        log.debug("cannot read %s (%s); asking the kernel another way", path, exc.strerror)
        return None


def _from_ioctl() -> set[IPAddress] | None:
    """IPv4 addresses from ``SIOCGIFCONF`` (Linux), or None if that fails."""
    import fcntl  # (not on Windows; only reached on Linux)

    buffer = array.array("B", bytes(_IFREQ_SIZE * _MAX_INTERFACES))
    pointer, size = buffer.buffer_info()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            answer = fcntl.ioctl(sock.fileno(), _SIOCGIFCONF, struct.pack("iL", size, pointer))
    except OSError as exc:
        log.debug("SIOCGIFCONF failed: %s", exc)
        return None
    used = struct.unpack("iL", answer)[0]
    data = buffer.tobytes()[:used]
    found: set[IPAddress] = set()
    for start in range(0, used - _IFREQ_SIZE + 1, _IFREQ_SIZE):
        address = parse_ip(socket.inet_ntoa(data[start + 20:start + 24]))
        if address is not None:
            found.add(address)
    return found


def _from_name_and_routes() -> set[IPAddress]:
    """The host name's addresses and the default source addresses; may miss some."""
    found: set[IPAddress] = set()
    with contextlib.suppress(OSError):
        for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None):
            address = parse_ip(str(sockaddr[0]).split("%")[0])
            if address is not None:
                found.add(address)
    for family, probe in _PROBES:
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((probe, 9))
            address = parse_ip(str(sock.getsockname()[0]).split("%")[0])
            if address is not None and not address.is_unspecified:
                found.add(address)
    return found
