"""The relay's outbound connect: resolve, check policy per address, race.

The destination check runs after DNS, against each address we would connect
to, and only checked addresses are dialled (no second lookup that a DNS
rebinding could answer differently). Before DNS, a name that no rule could
allow whatever it resolves to is refused without a lookup
(``Policy.refusal_before_dns``): no DNS queries of an agent's choosing.
Addresses are raced happy-eyeballs style (RFC 8305: a new attempt every
250 ms, first success wins).

An IP literal needs neither DNS nor a race, so it has a task-free path for
the relay to run right where the OPEN is read (``start_connect``): the
policy check and a non-blocking ``connect``; on loopback and on a LAN the
connection is usually complete (or refused) by the time we look, and
``finish_connect`` waits in a task only when it is not.

``Connector`` is what the relay asks for each admitted OPEN: turn it into a
connected socket, at once when it can (no task), else as the rest to await
in a task. ``TcpConnector`` (the above) is the one kind today; another
channel kind (a unix socket, UDP) is another class with the same method.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import select
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol

import trio

from .. import mux
from ..net.dialing import race_connect
from ..net.ending import set_abortive

if TYPE_CHECKING:
    from ..security.policy import Policy

__all__ = ["Connector", "Connecting", "TcpConnector", "DialError", "dial", "dns_failure",
           "forbidden", "literal_address", "refuse_before_dns", "start_connect",
           "finish_connect"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Why an address is refused (one line), or None: ``Policy.refusal`` for one host:port.
Explain = Callable[[Address], "str | None"]


#: The rest of a connect that could not finish at once: await it (in a task) for the
#: connected socket. Raises DialError; closes what it opened unless it returns it.
Connecting = Callable[[], Awaitable[socket.socket]]


class Connector(Protocol):
    """Turns an admitted OPEN of one channel kind into a connected socket."""

    def connect(self, host: str, port: int, policy: Policy, *,
                timeout: float) -> socket.socket | Connecting:
        """Start connecting to host:port, only through addresses ``policy`` allows,
        in the caller's task (it must not block). Returns the connected
        non-blocking socket when it is ready at once, else the rest to await
        (within ``timeout``).

        Raises:
            DialError: refused at once (policy, connection refused).
        """


class TcpConnector:
    """A TCP destination: an IP literal is checked and connected at once where it
    can be; a host name is resolved, checked per address and raced in the rest."""

    def connect(self, host: str, port: int, policy: Policy, *,
                timeout: float) -> socket.socket | Connecting:
        def allows(address: Address) -> bool:
            return policy.allows(host, port, address)

        def explain(address: Address) -> str | None:
            return policy.refusal(host, port, address)

        address = literal_address(host)
        if address is None:
            refuse_before_dns(host, port, policy.refusal_before_dns(host, port))
            return partial(_dial_socket, host, port, allows, explain, timeout)
        sock, connected = start_connect(host, address, port, allows=allows, explain=explain)
        if connected:
            return sock
        return partial(finish_connect, sock, host, port, timeout=timeout)


async def _dial_socket(host: str, port: int, allows: Callable[[Address], bool],
                       explain: Explain, timeout: float) -> socket.socket:
    """``dial``, as a non-blocking standard-library socket (what the pump carries)."""
    stream = await dial(host, port, allows=allows, explain=explain, timeout=timeout)
    return socket.socket(fileno=stream.socket.detach())


class DialError(Exception):
    """Why a destination could not be opened, as an OPEN_FAILED reason."""

    def __init__(self, reason: mux.OpenFailure, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text


async def dial(
    host: str, port: int, *, allows: Callable[[Address], bool], timeout: float,
    explain: Explain | None = None,
) -> trio.SocketStream:
    """Connect to host:port through addresses that ``allows`` accepts.

    ``explain`` (the policy's ``refusal``) says why an address is refused; the
    DialError of a forbidden destination then carries that reason.

    Raises:
        DialError: forbidden, DNS failure, refused, unreachable or timeout.
    """
    addresses = await _resolve(host, port)
    permitted = _permitted(host, port, addresses, allows, explain)
    with trio.move_on_after(timeout):
        return await _race(_interleave(permitted), port)
    raise _timed_out(host, port, timeout)


def _permitted(
    host: str, port: int, addresses: list[Address], allows: Callable[[Address], bool],
    explain: Explain | None = None,
) -> list[Address]:
    permitted = [a for a in addresses if allows(a)]
    if not permitted:
        shown = ", ".join(str(a) for a in addresses[:3])
        why = explain(addresses[0]) if explain is not None and addresses else None
        raise forbidden(f"{host}:{port}", why, f"resolves to {shown}")
    return permitted


def refuse_before_dns(host: str, port: int, why: str | None, *, udp: bool = False) -> None:
    """Refuse host:port before resolving ``host`` when the policy already says why
    (``Policy.refusal_before_dns``): no lookup for a name no rule could allow.

    Raises:
        DialError: FORBIDDEN, when ``why`` is not None.
    """
    if why is not None:
        raise forbidden(f"{'udp ' if udp else ''}{host}:{port}", why)


def forbidden(destination: str, why: str | None, resolved: str | None = None) -> DialError:
    """The DialError of a destination the policy refuses (the agent sees its text);
    ``resolved``: what the name resolved to, when it was resolved."""
    return DialError(
        mux.OpenFailure.FORBIDDEN,
        f"{destination} is not allowed by the relay's policy"
        + (f" ({resolved})" if resolved else "") + (f": {why}" if why else ""),
    )


def _timed_out(host: str, port: int, timeout: float) -> DialError:
    return DialError(
        mux.OpenFailure.TIMEOUT, f"connecting to {host}:{port} timed out after {timeout:g} s"
    )


@functools.lru_cache(maxsize=256)
def literal_address(host: str) -> Address | None:
    """``host`` as an address when it is an IP literal (no DNS needed), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def start_connect(
    host: str, address: Address, port: int, *, allows: Callable[[Address], bool],
    explain: Explain | None = None,
) -> tuple[socket.socket, bool]:
    """Check ``address`` (the literal ``host``) against the policy and start a
    non-blocking connect, without a task: (socket, True) when it is already
    connected, (socket, False) while in progress (pass it to ``finish_connect``).

    ``explain``: as for ``dial``.

    Raises:
        DialError: forbidden, or the connect failed at once (e.g. refused).
    """
    _permitted(host, port, [address], allows, explain)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:  # e.g. out of file descriptors
        raise _classify([exc]) from exc
    set_abortive(sock)  # (closed before it is carried, as when a session ends: a reset)
    try:
        sock.setblocking(False)
        code = sock.connect_ex((str(address), port))
        if code == errno.EINPROGRESS:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if not poller.poll(0):
                return sock, False
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, _strerror(code))
    except OSError as exc:
        sock.close()
        raise _classify([exc]) from exc
    return sock, True


async def finish_connect(
    sock: socket.socket, host: str, port: int, *, timeout: float
) -> socket.socket:
    """Wait for a connect that ``start_connect`` left in progress; ``sock`` is
    closed unless this returns it.

    Raises:
        DialError: refused, unreachable or timeout.
    """
    try:
        with trio.move_on_after(timeout):
            await trio.socket.from_stdlib_socket(sock).wait_writable()
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise _classify([OSError(code, _strerror(code))])
            return sock
        raise _timed_out(host, port, timeout)
    except BaseException:
        sock.close()
        raise


def _strerror(code: int) -> str:
    try:
        return os.strerror(code)
    except ValueError:
        return f"error {code}"


async def _resolve(host: str, port: int) -> list[Address]:
    address = literal_address(host)
    if address is not None:
        return [address]
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise dns_failure(host, exc) from exc
    seen: dict[Address, None] = {}
    for _family, _type, _proto, _name, sockaddr in infos:
        seen[ipaddress.ip_address(str(sockaddr[0]).split("%")[0])] = None
    return list(seen)


def dns_failure(host: str, exc: socket.gaierror | UnicodeError) -> DialError:
    """The DialError of a name that did not resolve; UnicodeError: the name cannot
    even be encoded for DNS (an empty label, one over 63 characters)."""
    why = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid DNS name"
    return DialError(mux.OpenFailure.DNS_FAILURE, f"cannot resolve {host}: {why}")


def _interleave(addresses: list[Address]) -> list[Address]:
    """Alternate families, IPv6 first (RFC 8305 §4)."""
    v6 = [a for a in addresses if a.version == 6]
    v4 = [a for a in addresses if a.version == 4]
    out: list[Address] = []
    for i in range(max(len(v6), len(v4))):
        out.extend(x[i] for x in (v6, v4) if i < len(x))
    return out


async def _race(addresses: list[Address], port: int) -> trio.SocketStream:
    stream, errors = await race_connect(
        [(socket.AF_INET6 if address.version == 6 else socket.AF_INET, (str(address), port))
         for address in addresses])
    if stream is None:
        raise _classify(errors)
    return stream


def _classify(errors: list[OSError]) -> DialError:
    codes = {e.errno for e in errors}
    text = errors[-1].strerror if errors else "no address to try"
    if errno.ECONNREFUSED in codes:
        return DialError(mux.OpenFailure.REFUSED, "connection refused")
    if codes & {errno.ETIMEDOUT}:
        return DialError(mux.OpenFailure.TIMEOUT, "connection timed out")
    return DialError(mux.OpenFailure.UNREACHABLE, (text or "unreachable").lower())
