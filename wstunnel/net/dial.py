"""The relay's outbound connect: resolve, check policy per address, race.

The destination check runs after DNS, against each address we would connect
to, and only checked addresses are dialled (no second lookup that a DNS
rebinding could answer differently). Addresses are raced happy-eyeballs style
(RFC 8305: a new attempt every 250 ms, first success wins).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable

import trio

from .. import mux

__all__ = ["DialError", "dial"]

ATTEMPT_DELAY = 0.25

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class DialError(Exception):
    """Why a destination could not be opened, as an OPEN_FAILED reason."""

    def __init__(self, reason: mux.OpenFailure, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text


async def dial(
    host: str, port: int, *, allows: Callable[[Address], bool], timeout: float
) -> trio.SocketStream:
    """Connect to host:port through addresses that ``allows`` accepts.

    Raises:
        DialError: forbidden, DNS failure, refused, unreachable or timeout.
    """
    addresses = await _resolve(host, port)
    permitted = [a for a in addresses if allows(a)]
    if not permitted:
        shown = ", ".join(str(a) for a in addresses[:3])
        raise DialError(
            mux.OpenFailure.FORBIDDEN,
            f"{host}:{port} is not allowed by the relay's policy (resolves to {shown})",
        )
    with trio.move_on_after(timeout):
        return await _race(_interleave(permitted), port)
    raise DialError(
        mux.OpenFailure.TIMEOUT, f"connecting to {host}:{port} timed out after {timeout:g} s"
    )


async def _resolve(host: str, port: int) -> list[Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DialError(
            mux.OpenFailure.DNS_FAILURE, f"cannot resolve {host}: {exc.strerror}"
        ) from exc
    seen: dict[Address, None] = {}
    for _family, _type, _proto, _name, sockaddr in infos:
        seen[ipaddress.ip_address(str(sockaddr[0]).split("%")[0])] = None
    return list(seen)


def _interleave(addresses: list[Address]) -> list[Address]:
    """Alternate families, IPv6 first (RFC 8305 §4)."""
    v6 = [a for a in addresses if a.version == 6]
    v4 = [a for a in addresses if a.version == 4]
    out: list[Address] = []
    for i in range(max(len(v6), len(v4))):
        out.extend(x[i] for x in (v6, v4) if i < len(x))
    return out


async def _race(addresses: list[Address], port: int) -> trio.SocketStream:
    winner: list[trio.SocketStream] = []
    errors: list[OSError] = []
    async with trio.open_nursery() as nursery:
        for address in addresses:
            failed = trio.Event()
            nursery.start_soon(
                _attempt, address, port, winner, errors, failed, nursery.cancel_scope
            )
            with trio.move_on_after(ATTEMPT_DELAY):
                await failed.wait()
            if winner:
                break
    if winner:
        return winner[0]
    raise _classify(errors)


async def _attempt(
    address: Address,
    port: int,
    winner: list[trio.SocketStream],
    errors: list[OSError],
    failed: trio.Event,
    scope: trio.CancelScope,
) -> None:
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((str(address), port))
    except OSError as exc:
        sock.close()
        errors.append(exc)
        failed.set()
        return
    except BaseException:
        sock.close()
        raise
    if winner:
        sock.close()
        return
    winner.append(trio.SocketStream(sock))
    scope.cancel()


def _classify(errors: list[OSError]) -> DialError:
    codes = {e.errno for e in errors}
    text = errors[-1].strerror if errors else "no address to try"
    if errno.ECONNREFUSED in codes:
        return DialError(mux.OpenFailure.REFUSED, "connection refused")
    if codes & {errno.ETIMEDOUT}:
        return DialError(mux.OpenFailure.TIMEOUT, "connection timed out")
    return DialError(mux.OpenFailure.UNREACHABLE, (text or "unreachable").lower())
