"""UDP through the tunnel (-L udp:, -R udp:) with real programs on loopback: dig
against a dnsmasq serving a zone the test writes, and a trio echo server.

What users rely on (docs/PROTOCOL.md 4.2, docs/CONFIG.md): replies reach the
client that asked; a datagram over 65,507 bytes is dropped and the flow goes
on; a destination outside the relay's ``udp:`` rules (a TCP rule never allows
UDP) gets no answer and is logged and counted; an idle flow ends with FIN
after ``udp_idle_timeout``; two clients of one -R udp port each get their own
replies.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
import trio

from benchmarks._cutter import PathCutter
from wstunnel.config import Forward
from wstunnel.config.textforms import REVERSE, UDP, parse_forward
from wstunnel.net import udp_flow
from wstunnel.net.udp_flow import udp_stats
from wstunnel.relay.relay import Relay
from wstunnel.security.allow_rule import AllowRule
from wstunnel.security.listen_policy import ListenRule

from .log_watch import LogWatch
from .tunnel_helpers import (
    agent_config,
    pattern_block,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
)
from .udp_helpers import (
    LOOPBACK,
    ZONE,
    ZONE_ADDRESS,
    answer_address,
    dns_query,
    dnsmasq,
    exchange,
    forge_icmp_unreachable,
    free_udp_port,
    require,
    serve_udp_echo,
)


def udp_forward(target_port: int, *, listen: str = LOOPBACK, idle: float = 60.0) -> Forward:
    return replace(Forward(listen, 0, LOOPBACK, target_port), protocol=UDP,
                   udp_idle_timeout=idle)


@asynccontextmanager
async def udp_tunnel(forward: Forward, allow: list[str],
                     relays: list[Relay] | None = None) -> AsyncIterator[int]:
    """A relay allowing ``allow`` and an agent serving ``forward``; yields the agent's
    UDP port."""
    async with trio.open_nursery() as nursery:
        relay = await start_relay(nursery, relay_config(
            allow=tuple(AllowRule.parse(rule) for rule in allow)))
        agent = await start_agent(nursery, agent_config(relay.ports[0], [],
                                                        forwards=(forward,)))
        try:
            yield agent.ports[0]
        finally:
            nursery.cancel_scope.cancel()


async def dig(port: int, name: str) -> str:
    program = require("dig", "dnsutils")
    done = await trio.run_process(
        [program, f"@{LOOPBACK}", "-p", str(port), "+short", "+tries=3", "+time=1", name],
        capture_stdout=True, check=False)
    return done.stdout.decode().strip()


async def test_dig_through_udp_forward_gets_the_zones_answer() -> None:
    """dig at the agent's -L udp: port is answered by the dnsmasq behind the relay."""
    with dnsmasq() as dns_port:
        async with udp_tunnel(udp_forward(dns_port), [f"udp:{LOOPBACK}:{dns_port}"]) as port:
            with trio.fail_after(15):
                assert await dig(port, f"www.{ZONE}") == ZONE_ADDRESS
                assert await dig(port, f"mail.{ZONE}") == ZONE_ADDRESS


async def test_many_queries_from_one_socket_are_all_answered_in_order_of_ids() -> None:
    """200 queries in flight on one flow: every one is answered, each reply to its id."""
    with dnsmasq() as dns_port:
        async with udp_tunnel(udp_forward(dns_port), [f"udp:{LOOPBACK}:{dns_port}"]) as port:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock, trio.fail_after(15):
                await exchange(sock, (LOOPBACK, port), dns_query(f"warm.{ZONE}", 0))
                for query_id in range(1, 201):
                    await sock.sendto(dns_query(f"q{query_id}.{ZONE}", query_id),
                                      (LOOPBACK, port))
                seen: set[int] = set()
                while len(seen) < 200:
                    query_id, address = answer_address(await sock.recv(4096))
                    assert address == ZONE_ADDRESS
                    seen.add(query_id)
                assert seen == set(range(1, 201))


async def test_datagram_over_the_limit_is_dropped_and_the_flow_goes_on() -> None:
    """A 65,520-byte datagram (possible over IPv6) is dropped and counted as too_big;
    65,507 bytes, the limit, and the next small datagram still cross."""
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(serve_udp_echo)
        forward = udp_forward(echo, listen="::1")
        async with udp_tunnel(forward, [f"udp:{LOOPBACK}:{echo}"]) as port:
            sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            with sock, trio.fail_after(10):
                address = ("::1", port)
                assert await exchange(sock, address, b"first") == b"first"
                before = udp_stats.dropped["too_big"]
                await sock.sendto(b"x" * 65520, address)
                largest = b"y" * 65507
                assert await exchange(sock, address, largest) == largest
                assert udp_stats.dropped["too_big"] == before + 1
                assert await exchange(sock, address, b"after") == b"after"
        nursery.cancel_scope.cancel()


async def test_a_tcp_rule_never_allows_udp_and_the_refusal_is_logged(logs: LogWatch) -> None:
    """The relay allows 127.0.0.1 for TCP only: the UDP flow is refused (FORBIDDEN),
    the client gets no answer, the agent logs it and counts the dropped datagrams."""
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(serve_udp_echo)
        async with udp_tunnel(udp_forward(echo), [f"{LOOPBACK}:{echo}"]) as port:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock, trio.fail_after(10):
                before = udp_stats.dropped["refused"]
                await sock.sendto(b"hello", (LOOPBACK, port))
                line = await logs.wait_for("udp flow from")
                assert "refused" in line and "not allowed" in line
                await sock.sendto(b"again", (LOOPBACK, port))  # held: dropped, no new OPEN
                with trio.move_on_after(0.5) as quiet:
                    await sock.recv(100)
                assert quiet.cancelled_caught, "a refused flow must get no answer"
                assert udp_stats.dropped["refused"] >= before + 2
                assert any("udp 127.0.0.1" in line and "udp: rule" in line
                           for line in logs.lines), "the relay says a udp: rule is needed"
        nursery.cancel_scope.cancel()


async def test_an_idle_flow_ends_with_fin_and_the_next_datagram_opens_a_new_one(
        logs: LogWatch) -> None:
    """udp_idle_timeout 0.3 s: the flow ends cleanly (FIN both ways, no reset), the
    relay's channel is gone, and the client's next datagram is carried by a new flow."""
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(serve_udp_echo)
        async with udp_tunnel(udp_forward(echo, idle=0.3), [f"udp:{LOOPBACK}:{echo}"]) as port:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock, trio.fail_after(10):
                opened = udp_stats.flows_opened
                assert await exchange(sock, (LOOPBACK, port), b"one") == b"one"
                line = await logs.wait_for("ended: idle for 0.3 s")
                assert "udp flow from" in line
                await logs.wait_for("ended: the peer ended the flow")  # the relay's side
                assert not any("reset" in line for line in logs.lines if "channel" in line)
                assert await exchange(sock, (LOOPBACK, port), b"two") == b"two"
                assert udp_stats.flows_opened == opened + 2 * 2  # agent + relay, twice
        nursery.cancel_scope.cancel()


async def _endless_source(stream: trio.SocketStream) -> None:
    """A download that lasts until its client goes away."""
    block = pattern_block(b"bulk")
    async with stream:
        try:
            while True:
                await stream.send_all(block)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _drain(port: int) -> None:
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        while await stream.receive_some(65536):
            pass


async def test_a_light_flow_beside_downloads_at_the_budget_loses_nothing(
        logs: LogWatch) -> None:
    """32 downloads through an 8 MB/s path keep the relay's outbound budget
    (``max_queued_size``, 4 MiB here) full for as long as they run: the agent's
    credit takes every room the writer makes. A flow beside them still gets each
    of 20 datagrams answered, one after another: with nothing queued it takes the
    budget's lane (mux/send_budget.py), not the room left once the downloads end
    (it used to wait for the budget to be half empty, which they never let it
    be: DNS beside many downloads timed out)."""
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(serve_udp_echo)
        source = await serve_target(nursery, _endless_source)
        relay = await start_relay(nursery, relay_config(
            allow=(AllowRule.parse(LOOPBACK), AllowRule.parse(f"udp:{LOOPBACK}:{echo}")),
            max_queued_size=4 * 1024 * 1024))
        path = PathCutter(relay.ports[0])
        path.downstream_rate = 8_000_000
        await nursery.start(path.serve)
        agent = await start_agent(nursery, agent_config(path.port, [source], forwards=(
            udp_forward(echo), Forward(LOOPBACK, 0, LOOPBACK, source))))
        udp_port, bulk_port = agent.ports
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock, trio.fail_after(20):
            await sock.connect((LOOPBACK, udp_port))
            await exchange(sock, (LOOPBACK, udp_port), b"warm")  # (the flow is open)
            for _ in range(32):
                nursery.start_soon(_drain, bulk_port)
            await logs.wait_for("outbound budget full")
            for number in range(20):  # (each reply a new chance to find no room)
                payload = b"datagram %d" % number
                await sock.send(payload)
                reply = b""
                with trio.move_on_after(2):
                    while (reply := await sock.recv(100)) != payload:
                        assert reply == b"warm", reply  # (a late echo of the warm-up)
                assert reply == payload, f"datagram {number} got no answer within 2 s"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("host", "code"), [
    ("::1", 1),  # ICMPv6 administratively prohibited (ip6tables REJECT): EACCES
    (LOOPBACK, 2),  # ICMP protocol unreachable: ENOPROTOOPT
])
async def test_an_icmp_error_for_one_flow_leaves_the_relay_and_every_flow_up(
        host: str, code: int) -> None:
    """An ICMP error about one flow's datagram (a firewall's REJECT, a router) is
    that flow's lost datagram, nothing more: the relay stays up, the flow and the
    flow of another client beside it still carry replies."""
    target = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                socket.SOCK_DGRAM)
    with target:
        await target.bind((host, 0))
        target_address = target.getsockname()[:2]
        forward = replace(udp_forward(target_address[1]), target_host=host)
        allowed = f"udp:[{host}]:{target_address[1]}" if ":" in host else \
            f"udp:{host}:{target_address[1]}"
        async with udp_tunnel(forward, [allowed]) as port:
            clients = [trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
            with clients[0], clients[1], trio.fail_after(10):
                relay_sides = []
                for client in clients:
                    await client.sendto(b"hello", (LOOPBACK, port))
                    relay_sides.append((await target.recvfrom(100))[1][:2])
                forge_icmp_unreachable(relay_sides[0], target_address, code)
                for client, relay_side in zip(clients, relay_sides, strict=True):
                    await target.sendto(b"reply", relay_side)
                    assert await client.recv(100) == b"reply"


async def test_a_socket_error_nobody_foresaw_resets_only_its_flow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A destination socket's error outside the list of ICMP errors (stood in for by
    ENOPROTOOPT taken off the list) resets that one flow: the relay stays up, the
    other client's flow carries on, and the client's next datagram opens a new flow."""
    monkeypatch.setattr(udp_flow, "_TRANSIENT_ERRNOS",
                        udp_flow._TRANSIENT_ERRNOS - {errno.ENOPROTOOPT})
    target = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with target:
        await target.bind((LOOPBACK, 0))
        target_address = target.getsockname()[:2]
        forward = udp_forward(target_address[1])
        async with udp_tunnel(forward, [f"udp:{LOOPBACK}:{target_address[1]}"]) as port:
            clients = [trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
            with clients[0], clients[1], trio.fail_after(10):
                relay_sides = []
                for client in clients:
                    await client.sendto(b"hello", (LOOPBACK, port))
                    relay_sides.append((await target.recvfrom(100))[1][:2])
                forge_icmp_unreachable(relay_sides[0], target_address, 2)  # ENOPROTOOPT
                await target.sendto(b"reply", relay_sides[1])
                assert await clients[1].recv(100) == b"reply"
                while True:  # until a datagram of client 0 comes through a new flow
                    await clients[0].sendto(b"again", (LOOPBACK, port))
                    with trio.move_on_after(0.1):
                        data, source = await target.recvfrom(100)
                        if data == b"again" and source[:2] != relay_sides[0]:
                            break
                await target.sendto(b"welcome back", source)
                assert await clients[0].recv(100) == b"welcome back"


async def test_reverse_udp_routes_replies_to_each_of_two_clients() -> None:
    """-R udp: two clients of the relay's port each get the replies to their own
    datagrams from the server beside the agent, never the other's."""
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(serve_udp_echo)
        relay_port = free_udp_port()
        forward = replace(parse_forward(f"udp:{relay_port}:{LOOPBACK}:{echo}", kind=REVERSE),
                          name="dns-back")
        relay = await start_relay(nursery, relay_config(
            listen_allow=(ListenRule.parse(f"udp:{LOOPBACK}:{relay_port}"),)))
        await start_agent(nursery, agent_config(relay.ports[0], [], forwards=(forward,)))
        clients = [trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        with clients[0], clients[1], trio.fail_after(15):
            for client in clients:
                await client.bind((LOOPBACK, 0))
            for _ in range(100):  # until the lease is up: the first reply
                with trio.move_on_after(0.1):
                    await exchange(clients[0], (LOOPBACK, relay_port), b"ping", 0.1)
                    break
            got: list[list[bytes]] = [[], []]

            async def talk(i: int) -> None:
                for n in range(50):
                    payload = f"client{i}-{n}".encode()
                    await clients[i].sendto(payload, (LOOPBACK, relay_port))
                    while (reply := await clients[i].recv(100)) != payload:
                        assert reply == b"ping", f"client {i} got {reply!r}"
                    got[i].append(reply)

            async with trio.open_nursery() as talking:
                talking.start_soon(talk, 0)
                talking.start_soon(talk, 1)
            for i in (0, 1):
                assert got[i] == [f"client{i}-{n}".encode() for n in range(50)]
        nursery.cancel_scope.cancel()


async def test_reverse_udp_refusal_is_held_per_client(logs: LogWatch) -> None:
    """-R udp: the agent cannot reach its target (a UDP socket cannot be connected to
    the broadcast address) and refuses the flow: the relay logs it once and drops that
    client's next datagrams for a while (counted as refused) instead of opening a flow,
    and the agent a warning, for each, as -L udp: and SOCKS5 UDP do."""
    async with trio.open_nursery() as nursery:
        relay_port = free_udp_port()
        forward = parse_forward(f"udp:{relay_port}:255.255.255.255:9", kind=REVERSE)
        relay = await start_relay(nursery, relay_config(
            listen_allow=(ListenRule.parse(f"udp:{LOOPBACK}:{relay_port}"),)))
        await start_agent(nursery, agent_config(relay.ports[0], [], forwards=(forward,)))
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock, trio.fail_after(10):
            await logs.wait_for("for -R udp:")  # (the agent: the lease is up)
            await sock.sendto(b"one", (LOOPBACK, relay_port))
            line = await logs.wait_for("udp flow from")  # (the relay's)
            assert "cannot reach" in line
            opened, refused = udp_stats.flows_opened, udp_stats.dropped["refused"]
            for payload in (b"two", b"three"):
                await sock.sendto(payload, (LOOPBACK, relay_port))
            with trio.move_on_after(0.5) as quiet:
                await sock.recv(100)
            assert quiet.cancelled_caught, "a refused flow gets no answer"
            assert udp_stats.flows_opened == opened, "no new flow while the refusal holds"
            assert udp_stats.dropped["refused"] == refused + 2
            assert sum("cannot reach" in line and "reverse udp flow" in line
                       for line in logs.lines) == 1, "the agent warns once"
            other = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with other:  # another client: its own flow, refused and held for it alone
                await other.bind((LOOPBACK, 0))
                await other.sendto(b"four", (LOOPBACK, relay_port))
                await logs.wait_for(f"udp flow from {LOOPBACK}:{other.getsockname()[1]}")
                assert udp_stats.flows_opened == opened + 1  # (the relay's: the agent refused)
        nursery.cancel_scope.cancel()


async def socks5_associate(proxy_port: int) -> tuple[trio.SocketStream, tuple[str, int]]:
    """A SOCKS5 UDP ASSOCIATE (no login) on the -D port: the TCP connection that keeps
    the association, and the UDP relay address the agent named."""
    stream = await trio.open_tcp_stream(LOOPBACK, proxy_port)
    await stream.send_all(b"\x05\x01\x00")
    assert await stream.receive_some(2) == b"\x05\x00"
    await stream.send_all(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    reply = b""
    while len(reply) < 10:
        reply += await stream.receive_some(10 - len(reply))
    assert reply[:4] == b"\x05\x00\x00\x01", reply
    return stream, (socket.inet_ntoa(reply[4:8]), int.from_bytes(reply[8:10], "big"))


def socks_udp(host: str, port: int, payload: bytes) -> bytes:
    """RFC 1928 section 7's header (domain name form) and the payload."""
    return b"\x00\x00\x00\x03" + bytes([len(host)]) + host.encode() + port.to_bytes(2, "big") \
        + payload


async def test_socks5_udp_associate_carries_dns_and_refuses_what_the_relay_refuses() -> None:
    """A SOCKS5 client's UDP ASSOCIATE on -D: DNS queries to dnsmasq (named
    "localhost": the relay resolves it) are answered, each reply with the header
    naming its source; a destination no udp: rule allows gets no answer; closing
    the TCP connection ends the association (its relay socket is closed)."""
    with dnsmasq() as dns_port:
        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, relay_config(allow=(
                AllowRule.parse(f"udp:localhost:{dns_port}"),)))
            dynamic = Forward.dynamic(parse_forward("0:h:1").listen)
            agent = await start_agent(nursery, agent_config(relay.ports[0], [],
                                                            forwards=(dynamic,)))
            stream, relay_address = await socks5_associate(agent.ports[0])
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock, trio.fail_after(10):
                header = socks_udp("localhost", dns_port, b"")
                query = socks_udp("localhost", dns_port, dns_query(f"a.{ZONE}", 7))
                reply = await exchange(sock, relay_address, query)
                assert reply.startswith(header)
                assert answer_address(reply[len(header):]) == (7, ZONE_ADDRESS)
                await sock.sendto(socks_udp("localhost", dns_port + 1, dns_query("b.x", 8)),
                                  relay_address)
                with trio.move_on_after(0.5) as quiet:
                    await sock.recv(4096)
                assert quiet.cancelled_caught, "a refused destination gets no answer"
                await stream.aclose()
                await sock.connect(relay_address)  # (so the kernel reports port unreachable)
                with trio.fail_after(5):  # the agent closes the relay socket
                    while True:
                        await sock.send(header + b"late")
                        try:
                            with trio.move_on_after(0.05):
                                await sock.recv(100)
                        except ConnectionRefusedError:
                            break
            nursery.cancel_scope.cancel()


async def test_socks5_udp_refusal_is_logged_once_and_held(logs: LogWatch) -> None:
    """A destination the relay refuses (a TCP rule never allows UDP): the agent logs
    why, and like -L udp: drops the client's next datagrams to it for a while
    (counted as refused) instead of opening a flow for each (docs/PROTOCOL.md 4.2)."""
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(serve_udp_echo)
        relay = await start_relay(nursery, relay_config(allow=(
            AllowRule.parse(f"{LOOPBACK}:{echo}"),)))
        dynamic = Forward.dynamic(parse_forward("0:h:1").listen)
        agent = await start_agent(nursery, agent_config(relay.ports[0], [],
                                                        forwards=(dynamic,)))
        stream, relay_address = await socks5_associate(agent.ports[0])
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock, trio.fail_after(10):
            await sock.sendto(socks_udp(LOOPBACK, echo, b"one"), relay_address)
            line = await logs.wait_for("SOCKS5 udp flow to")
            assert "refused" in line and "not allowed" in line
            opened, refused = udp_stats.flows_opened, udp_stats.dropped["refused"]
            for payload in (b"two", b"three"):
                await sock.sendto(socks_udp(LOOPBACK, echo, payload), relay_address)
            with trio.move_on_after(0.5) as quiet:
                await sock.recv(100)
            assert quiet.cancelled_caught, "a refused destination gets no answer"
            assert udp_stats.flows_opened == opened, "no new flow while the refusal holds"
            assert udp_stats.dropped["refused"] == refused + 2
            await stream.aclose()
        nursery.cancel_scope.cancel()
