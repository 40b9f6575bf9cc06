"""The relay's task-free connect to an IP literal (relay/dial.py) and its task fallback."""

from __future__ import annotations

import ipaddress
import socket
from functools import partial
from typing import NoReturn

import pytest
import trio

from wstunnel import mux
from wstunnel.agent.connect import open_websocket
from wstunnel.config import parse_relay_url
from wstunnel.net import pump
from wstunnel.protocol import TunnelProtocol
from wstunnel.relay import dial, run_relay
from wstunnel.relay.dial import (
    DialError,
    TcpConnector,
    finish_connect,
    literal_address,
    start_connect,
)
from wstunnel.relay.dial_udp import UdpConnector
from wstunnel.security.allow_rule import AllowRule
from wstunnel.security.policy import HostSelf, Listener, Policy
from wstunnel.service.metrics import TunnelStats

from ..security_helpers import watch_logs
from ..tunnel_helpers import LOOPBACK, echo_exact, echo_handler, relay_config, tunnel

ADDRESS = ipaddress.ip_address(LOOPBACK)


def _allow_all(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return True


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def test_literal_address_only_for_ip_literals() -> None:
    """IP literals (v4, v6) need no DNS; names do."""
    assert literal_address("10.0.0.1") == ipaddress.ip_address("10.0.0.1")
    assert literal_address("::1") == ipaddress.ip_address("::1")
    assert literal_address("localhost") is None


def test_start_connect_on_loopback_is_complete_at_once() -> None:
    """A loopback connect is finished (or refused) by the time we look: no task needed."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        sock, connected = start_connect(LOOPBACK, ADDRESS, listener.getsockname()[1],
                                        allows=_allow_all)
        with sock:
            assert connected
            peer, _ = listener.accept()
            peer.close()


def test_start_connect_refused_and_forbidden_raise_dial_errors() -> None:
    """Refused and forbidden are OPEN_FAILED reasons with the same texts as dial()."""
    port = _closed_port()
    with pytest.raises(DialError) as refused:
        start_connect(LOOPBACK, ADDRESS, port, allows=_allow_all)
    assert (refused.value.reason, refused.value.text) == (
        mux.OpenFailure.REFUSED, "connection refused")
    with pytest.raises(DialError) as forbidden:
        start_connect(LOOPBACK, ADDRESS, port, allows=lambda address: False)
    assert forbidden.value.reason is mux.OpenFailure.FORBIDDEN
    assert forbidden.value.text == (
        f"{LOOPBACK}:{port} is not allowed by the relay's policy (resolves to {LOOPBACK})")


def _connect_started(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex((LOOPBACK, port))
    return sock


async def test_finish_connect_waits_for_the_connection_or_classifies_the_failure() -> None:
    """A connect left in progress completes in finish_connect, or fails as REFUSED."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        sock = _connect_started(listener.getsockname()[1])
        with trio.fail_after(5):
            assert await finish_connect(sock, LOOPBACK, 1, timeout=5) is sock
        sock.close()
    sock = _connect_started(_closed_port())
    with trio.fail_after(5), pytest.raises(DialError) as refused:
        await finish_connect(sock, LOOPBACK, 1, timeout=5)
    assert refused.value.reason is mux.OpenFailure.REFUSED
    assert sock.fileno() == -1  # closed


async def test_finish_connect_times_out(autojump_clock: trio.abc.Clock) -> None:
    """A connect that never completes (the listener's queue is full, SYNs are dropped)
    ends as TIMEOUT after the timeout, with dial()'s text, and the socket closed."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [_connect_started(port) for _ in range(3)]
        try:
            sock = _connect_started(port)
            with pytest.raises(DialError) as timed_out:
                await finish_connect(sock, LOOPBACK, port, timeout=7)
        finally:
            for filler in fillers:
                filler.close()
    assert timed_out.value.reason is mux.OpenFailure.TIMEOUT
    assert timed_out.value.text == f"connecting to {LOOPBACK}:{port} timed out after 7 s"
    assert sock.fileno() == -1


@pytest.mark.skipif(not pump.AVAILABLE, reason="no select.epoll here")
async def test_connect_still_in_progress_finishes_in_a_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the connect is not complete at once (a remote destination), the relay
    finishes it in a task and the channel carries data as usual."""
    calls: list[bool] = []

    def in_progress(*args: object, **kwargs: object) -> tuple[socket.socket, bool]:
        sock, _connected = start_connect(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(True)
        return sock, False

    monkeypatch.setattr(dial, "start_connect", in_progress)  # (TcpConnector's)
    with trio.fail_after(10):
        async with tunnel([echo_handler]) as (ports, _relay, _agent):
            for _ in range(3):
                async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as stream:
                    assert await echo_exact(stream, b"hello" * 100) == b"hello" * 100
    assert len(calls) == 3


def test_start_connect_without_a_socket_is_a_dial_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """No socket to be had (out of file descriptors) refuses the channel; it never
    raises into the session's reader."""

    def no_socket(*args: object) -> socket.socket:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(socket, "socket", no_socket)
    with pytest.raises(DialError) as failed:
        start_connect(LOOPBACK, ADDRESS, 1, allows=_allow_all)
    assert failed.value.reason is mux.OpenFailure.UNREACHABLE
    assert failed.value.text == "too many open files"


async def test_tcp_connector_literal_at_once_name_in_a_task_forbidden_refused() -> None:
    """The relay's Connector for TCP: an allowed IP literal comes back connected at
    once (no task); a host name comes back as the rest to await, which resolves,
    checks and connects; a literal the policy forbids is a DialError at once."""
    connector = TcpConnector()
    with socket.create_server((LOOPBACK, 0)) as listener:
        port = listener.getsockname()[1]
        policy = Policy([f"{LOOPBACK}:{port}"])
        now = connector.connect(LOOPBACK, port, policy, timeout=5)
        assert isinstance(now, socket.socket)
        later = connector.connect("localhost", port, policy, timeout=5)
        assert not isinstance(later, socket.socket)
        with trio.fail_after(5):
            connected = await later()
        try:
            for sock in (now, connected):
                assert sock.getpeername()[:2] == (LOOPBACK, port)
        finally:
            now.close()
            connected.close()
        with pytest.raises(DialError) as forbidden:
            connector.connect(LOOPBACK, port + 1 if port < 65535 else port - 1, policy, timeout=5)
    assert forbidden.value.reason is mux.OpenFailure.FORBIDDEN


def _loopback_zone() -> int:
    try:
        return socket.if_nametoindex("lo")
    except OSError:
        pytest.skip("no interface named lo to give ::1 a zone")


async def test_a_zone_id_does_not_reach_the_relays_own_port() -> None:
    """``::1%1`` connects to ``::1`` (the kernel ignores the zone there): with loopback
    allowed, the relay's own port on ::1 is refused with a zone as without one."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    zone = _loopback_zone()
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback")
    with listener:
        port = listener.getsockname()[1]
        own = HostSelf(listeners=(Listener(ipaddress.ip_address("::1"), port, "tunnel port"),))
        policy = Policy(["::1"], host=own)
        for host in ("::1", f"::1%{zone}"):
            with pytest.raises(DialError) as forbidden:
                TcpConnector().connect(host, port, policy, timeout=5)
            assert forbidden.value.reason is mux.OpenFailure.FORBIDDEN, host
            assert "this relay's own tunnel port" in forbidden.value.text


@pytest.mark.parametrize("connector", [TcpConnector(), UdpConnector()])
@pytest.mark.parametrize("host", ["a..example.com", "x" * 64 + ".example.com"])
async def test_a_name_dns_cannot_encode_is_a_dns_failure(
    connector: TcpConnector | UdpConnector, host: str
) -> None:
    """A name the resolver refuses to encode (an empty or over-long label) is an
    OPEN_FAILED for that one channel, not an exception out of the relay's task."""
    policy = Policy(["*.example.com", "udp:*.example.com"])
    later = connector.connect(host, 80, policy, timeout=5)
    assert not isinstance(later, socket.socket)
    with trio.fail_after(5), pytest.raises(DialError) as failed:
        await later()
    assert failed.value.reason is mux.OpenFailure.DNS_FAILURE
    assert f"cannot resolve {host}" in failed.value.text


class _Answers(trio.abc.HostnameResolver):
    """A resolver whose every lookup of a name is counted and answered with ``answers``."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.lookups = 0

    async def getaddrinfo(self, host: bytes | None | str, port: object, family: int = 0,
                          type: int = 0, proto: int = 0, flags: int = 0) -> list[
                              tuple[int, int, int, str, tuple[str, int]]]:
        self.lookups += 1
        assert isinstance(port, int)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in self.answers]

    async def getnameinfo(self, sockaddr: tuple[str, int] | tuple[str, int, int, int],
                          flags: int) -> tuple[str, str]:
        raise NotImplementedError


async def test_a_name_is_resolved_once_and_only_allowed_answers_are_dialled() -> None:
    """Of the answers for a name, a forbidden one (127.0.0.1: a name rule is no loopback
    rule) is never dialled, even listed first; the allowed one is; DNS is asked once."""
    with socket.create_server((LOOPBACK, 0)) as forbidden:
        port = forbidden.getsockname()[1]
        try:
            allowed = socket.create_server(("127.0.0.2", port))
        except OSError:
            pytest.skip("127.0.0.2 is not usable here")
        with allowed:
            resolver = _Answers([LOOPBACK, "127.0.0.2"])
            previous = trio.socket.set_custom_hostname_resolver(resolver)
            try:
                policy = Policy(["multi.example", f"127.0.0.2:{port}"])
                later = TcpConnector().connect("multi.example", port, policy, timeout=5)
                assert not isinstance(later, socket.socket)
                with trio.fail_after(5):
                    sock = await later()
            finally:
                trio.socket.set_custom_hostname_resolver(previous)
            with sock:
                assert sock.getpeername()[:2] == ("127.0.0.2", port)
            assert resolver.lookups == 1
            forbidden.setblocking(False)
            with pytest.raises(BlockingIOError):
                forbidden.accept()


class _Lookups(trio.abc.HostnameResolver):
    """A resolver that records every name it is asked and answers none of them."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def getaddrinfo(self, host: bytes | None | str, port: object, family: int = 0,
                          type: int = 0, proto: int = 0, flags: int = 0) -> NoReturn:
        self.names.append(host.decode() if isinstance(host, bytes) else str(host))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(self, sockaddr: tuple[str, int] | tuple[str, int, int, int],
                          flags: int) -> tuple[str, str]:
        raise NotImplementedError


_NO_NAME_RULE = ["db.internal:5432", "10.0.0.0/8:22", "udp:10.0.0.53:53"]


async def _connect_or_refusal(connector: TcpConnector | UdpConnector, host: str, port: int,
                              policy: Policy) -> DialError:
    """The DialError ``connector`` ends with for host:port, at once or after its task."""
    with trio.fail_after(5), pytest.raises(DialError) as failed:
        later = connector.connect(host, port, policy, timeout=5)
        assert not isinstance(later, socket.socket)
        await later()
    return failed.value


@pytest.mark.parametrize(("connector", "port", "shown"), [
    (TcpConnector(), 80, "secret-1234.exfil.example:80 is not allowed by the relay's "
     "policy: no allow rule matches secret-1234.exfil.example port 80"),
    (TcpConnector(), 53, "secret-1234.exfil.example:53 is not allowed by the relay's "
     "policy: no allow rule matches secret-1234.exfil.example port 53"),
    (UdpConnector(), 5353, "udp secret-1234.exfil.example:5353 is not allowed by the "
     "relay's policy: no allow rule matches udp secret-1234.exfil.example port 5353 (UDP "
     "needs a udp: rule, e.g. udp:secret-1234.exfil.example:5353; TCP rules never allow "
     "UDP)"),
])
async def test_a_name_no_rule_could_allow_is_refused_without_a_lookup(
    connector: TcpConnector | UdpConnector, port: int, shown: str
) -> None:
    """No DNS side channel: a name that no name or pattern rule matches, on a port
    (and protocol) no IP/CIDR rule covers, is refused as forbidden without the relay
    ever resolving it, so an agent cannot make the relay look up names of its choice."""
    resolver = _Lookups()
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        refused = await _connect_or_refusal(connector, "secret-1234.exfil.example", port,
                                            Policy(_NO_NAME_RULE))
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    assert resolver.names == []
    assert (refused.reason, refused.text) == (mux.OpenFailure.FORBIDDEN, shown)


@pytest.mark.parametrize(("connector", "host", "port"), [
    (TcpConnector(), "db.internal", 5432),  # a name rule matches: its address is checked
    (TcpConnector(), "anything.example", 22),  # 10.0.0.0/8:22 may match what it resolves to
    (UdpConnector(), "anything.example", 53),  # udp:10.0.0.53:53 likewise
])
async def test_a_name_a_rule_may_allow_is_resolved_then_checked(
    connector: TcpConnector | UdpConnector, host: str, port: int
) -> None:
    """What still needs DNS (default deny after DNS): a name that a name rule matches,
    or any name on a port an IP/CIDR rule covers, is looked up, once."""
    resolver = _Lookups()
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        failed = await _connect_or_refusal(connector, host, port, Policy(_NO_NAME_RULE))
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    assert resolver.names == [host]
    assert failed.reason is mux.OpenFailure.DNS_FAILURE


async def test_the_relay_refuses_such_a_name_as_forbidden_and_logs_it_unresolved() -> None:
    """Through a running relay: the agent's OPEN to a name no rule could allow gets
    OPEN_FAILED forbidden with the policy's reason, the relay logs the refusal with
    the destination and the reason, it is counted, and the name is never looked up."""
    resolver = _Lookups()
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    stats = TunnelStats("relay")
    try:
        with watch_logs() as logs, trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                config = relay_config(allow=tuple(AllowRule.parse(r) for r in _NO_NAME_RULE))
                bound = await nursery.start(partial(run_relay, config,
                                                    shutdown=trio.Event(), stats=stats))
                url = parse_relay_url(f"ws://{LOOPBACK}:{bound[0][1]}/tunnel")
                stream, trailing = await open_websocket(url)
                agent = TunnelProtocol(mux.Role.AGENT, trailing_data=trailing)
                agent.open_channel("secret-1234.exfil.example", 80)
                await stream.send_all(agent.data_to_send())
                (failed,) = await _open_failures(stream, agent)
                (line,) = await logs.wait_for("wstunnel.relay",
                                              "refused channel to secret-1234.exfil.example:80")
                await stream.aclose()
                nursery.cancel_scope.cancel()
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    why = ("secret-1234.exfil.example:80 is not allowed by the relay's policy: no allow "
           "rule matches secret-1234.exfil.example port 80")
    assert (failed.reason, failed.text) == (mux.OpenFailure.FORBIDDEN, why)
    assert line.endswith(f"refused channel to secret-1234.exfil.example:80: {why}")
    assert stats.open_failures["forbidden"] == 1
    assert resolver.names == []


async def _open_failures(stream: trio.abc.Stream,
                         agent: TunnelProtocol) -> list[mux.ChannelOpenFailed]:
    """Read until the relay answers the OPEN; its OPEN_FAILED events."""
    while True:
        data = await stream.receive_some()
        assert data, "the relay closed the session"
        agent.receive_data(data)
        events = agent.events_received()
        if failed := [e for e in events if isinstance(e, mux.ChannelOpenFailed)]:
            return failed
        assert not any(isinstance(e, mux.ChannelOpened) for e in events)
        if out := agent.data_to_send():
            await stream.send_all(out)
