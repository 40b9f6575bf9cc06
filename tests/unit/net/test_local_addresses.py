"""This host's own addresses, read from the kernel without extra dependencies."""

from __future__ import annotations

import ipaddress
import socket
import sys

import pytest

from wstunnel.net.local_addresses import local_addresses, parse_fib_trie, parse_if_inet6

ip = ipaddress.ip_address

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
        +-- 192.0.2.0/30 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
           |-- 192.0.2.9
              /24 link UNICAST
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 192.0.2.2
              /32 host LOCAL
"""

IF_INET6 = """\
fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
"""


def test_fib_trie_gives_the_local_entries_only() -> None:
    """Every ``/32 host LOCAL`` entry (secondary addresses too), and no network,
    broadcast or route."""
    assert parse_fib_trie(FIB_TRIE) == {ip("127.0.0.1"), ip("192.0.2.2"), ip("192.0.2.9")}


def test_if_inet6_gives_every_address() -> None:
    """Each line's 32 hex digits are one address."""
    assert parse_if_inet6(IF_INET6) == {ip("fd00::2"), ip("::1"), ip("fe80::fc:ff:fe00:1")}


def test_garbage_gives_nothing() -> None:
    """Unexpected text is skipped, never an exception."""
    assert parse_fib_trie("|-- 999.1.2.3\n /32 host LOCAL\n/32 host LOCAL\n") == set()
    assert parse_if_inet6("zz\n" + "g" * 32 + " 01\n\n") == set()


def _source_address(family: int, probe: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address this host sends from towards ``probe`` (no packet is sent)."""
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((probe, 9))
        except OSError as exc:
            pytest.skip(f"no route towards {probe} on this machine ({exc.strerror})")
        return ip(sock.getsockname()[0].split("%")[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
@pytest.mark.parametrize(("family", "probe"), [(socket.AF_INET, "198.51.100.1"),
                                               (socket.AF_INET6, "2001:db8::1")])
def test_the_address_this_host_sends_from_is_listed(family: int, probe: str) -> None:
    """The kernel's own source address (an address of an interface) is among them,
    and so is loopback."""
    found = local_addresses()
    assert _source_address(family, probe) in found
    assert ip("127.0.0.1") in found
