"""TLS straight on the socket (net/tls_stream.py) keeps trio's Stream contract.

The tunnel's wss:// sessions run on this stream on both ends; trio's own
stream conformance checks plus the cases the tunnel relies on: bulk both ways
at once, reads that gather several records, EOF, a close that wakes a blocked
reader, and a failed handshake that leaves no socket behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import struct
import tracemalloc
from pathlib import Path

import pytest
import trio
import trio.testing

from wstunnel.net.tls_stream import TLSSocketStream, start_tls
from wstunnel.security.tls import ClientTLS, client_context, self_signed_certificate, server_context

from ..tunnel_helpers import assert_parts_arrive_joined, assert_receive_into_fills_views


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    folder: Path = tmp_path_factory.mktemp("tls")
    key_pem, cert_pem = self_signed_certificate(["relay.test"])
    (folder / "cert.pem").write_bytes(cert_pem)
    (folder / "key.pem").write_bytes(key_pem)
    server = server_context(str(folder / "cert.pem"), str(folder / "key.pem"))
    client = client_context(ClientTLS(ca_file=str(folder / "cert.pem")))
    return server, client


def socket_streams(tcp: bool = False) -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair: a socketpair, or loopback TCP (where big writes are corked)."""
    if tcp:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            a = socket.create_connection(listener.getsockname())
            b, _ = listener.accept()
    else:
        a, b = socket.socketpair()
    return (trio.SocketStream(trio.socket.from_stdlib_socket(a)),
            trio.SocketStream(trio.socket.from_stdlib_socket(b)))


async def tls_pair(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], server_name: str = "relay.test",
    tcp: bool = False,
) -> tuple[TLSSocketStream, TLSSocketStream]:
    server_ctx, client_ctx = contexts
    raw_client, raw_server = socket_streams(tcp)
    streams: dict[str, TLSSocketStream] = {}

    async def side(name: str, raw: trio.SocketStream, **kwargs: object) -> None:
        streams[name] = await start_tls(raw, **kwargs)  # type: ignore[arg-type]

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: side("client", raw_client, context=client_ctx,
                                            server_hostname=server_name))
            nursery.start_soon(lambda: side("server", raw_server, context=server_ctx,
                                            server_side=True))
    return streams["client"], streams["server"]


async def test_trio_stream_conformance(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """trio.testing's generic checks for a two-way stream (close, EOF, busy, cancellation)."""
    async def maker() -> tuple[TLSSocketStream, TLSSocketStream]:
        return await tls_pair(contexts)

    with trio.fail_after(30):
        await trio.testing.check_two_way_stream(maker, None)


@pytest.mark.parametrize("tcp", [False, True], ids=["socketpair", "tcp-corked"])
async def test_bulk_both_ways_at_once_arrives_intact(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], tcp: bool
) -> None:
    """8 MiB each way concurrently; reads gather many 16 KiB records into one."""
    client, server = await tls_pair(contexts, tcp=tcp)
    payloads = {"up": os.urandom(8 << 20), "down": os.urandom(8 << 20)}
    digests: dict[str, str] = {}
    largest: list[int] = []

    async def send(stream: TLSSocketStream, data: bytes) -> None:
        for start in range(0, len(data), 1 << 20):
            await stream.send_all(data[start:start + (1 << 20)])

    async def receive(stream: TLSSocketStream, name: str, size: int) -> None:
        digest, got = hashlib.sha256(), 0
        while got < size:
            data = await stream.receive_some(256 * 1024)
            assert data
            largest.append(len(data))
            digest.update(data)
            got += len(data)
        digests[name] = digest.hexdigest()

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, client, payloads["up"])
                nursery.start_soon(send, server, payloads["down"])
                nursery.start_soon(receive, server, "up", len(payloads["up"]))
                nursery.start_soon(receive, client, "down", len(payloads["down"]))
        assert digests == {name: hashlib.sha256(data).hexdigest()
                           for name, data in payloads.items()}
        assert max(largest) > 64 * 1024  # many records per read: the buffer grew past 64 KiB
        assert client._cork is tcp  # TCP corks big writes; elsewhere it turned itself off
    finally:
        await client.aclose()
        await server.aclose()


async def test_peer_close_is_eof_and_our_close_wakes_a_reader(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    client, server = await tls_pair(contexts)
    try:
        with trio.fail_after(5):
            await client.send_all(b"last words")
            await client.aclose()
            assert await server.receive_some(100) == b"last words"
            assert await server.receive_some(100) == b""  # no close_notify needed

        blocked, peer = await tls_pair(contexts)
        woken: list[type[BaseException]] = []

        async def read() -> None:
            try:
                await blocked.receive_some(10)
            except trio.ClosedResourceError as exc:
                woken.append(type(exc))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                await blocked.aclose()
        await peer.aclose()
        assert woken == [trio.ClosedResourceError]
    finally:
        await server.aclose()


@pytest.mark.parametrize("read_first", [True, False], ids=["read-then-reset", "data-and-reset"])
async def test_peer_reset_is_a_failure_after_the_data_not_an_eof(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], read_first: bool,
) -> None:
    """OpenSSL reports a TCP reset like a ragged EOF (SSLEOFError, errno lost): the
    stream must still say "reset" as the plain stream does, so a wss:// session's
    log reads "connection lost: ... reset by peer", like ws://, not "closed"; the
    bytes before the reset come first, whether or not they were read before it."""
    client, server = await tls_pair(contexts, tcp=True)
    try:
        with trio.fail_after(5):
            await server.send_all(b"last words")
            if read_first:
                assert await client.receive_some(100) == b"last words"
            server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            await server.aclose()  # RST
            if not read_first:
                assert await client.receive_some(100) == b"last words"
            with pytest.raises(trio.BrokenResourceError) as caught:
                await client.receive_some(100)
        assert isinstance(caught.value.__cause__, ConnectionResetError)
    finally:
        await client.aclose()
        await server.aclose()


async def test_failed_handshake_says_why_and_closes_the_socket(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A certificate for another name: BrokenResourceError caused by the verify error."""
    server_ctx, client_ctx = contexts
    raw_client, raw_server = socket_streams()
    failures: list[BaseException] = []

    async def client_side() -> None:
        try:
            await start_tls(raw_client, client_ctx, server_hostname="other.test")
        except trio.BrokenResourceError as exc:
            failures.append(exc)

    async def server_side() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await start_tls(raw_server, server_ctx, server_side=True)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            nursery.start_soon(server_side)
    assert len(failures) == 1
    assert isinstance(failures[0].__cause__, ssl.SSLCertVerificationError)
    assert raw_client.socket.fileno() == -1  # taken over, and closed with the TLS socket


async def test_records_read_ahead_reach_the_reader_without_new_socket_data(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """OpenSSL reads ahead (openssl_tuning.py): one read() takes several records off the
    socket, and the ones it holds must still be delivered though the socket is empty."""
    client, server = await tls_pair(contexts)
    try:
        with trio.fail_after(5):
            for word in (b"one", b"two", b"three"):
                await client.send_all(word)  # a TLS record each
            assert await server.receive_some(3) == b"one"
            # All three records left the kernel with that first read...
            with pytest.raises(BlockingIOError):
                socket.socket.recv(server._sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            # ...and the two held inside OpenSSL arrive without waiting for the socket.
            assert await server.receive_some(100) == b"twothree"
        assert client._sock.cipher()[0] == "TLS_AES_128_GCM_SHA256"  # as ssh's aes128-gcm
    finally:
        await client.aclose()
        await server.aclose()


async def test_parts_arrive_as_if_joined(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """send_parts (the writer's frame headers and payloads, not joined) delivers
    exactly the concatenation, whatever the mix of small and big parts."""
    client, server = await tls_pair(contexts, tcp=True)
    parts = [b"h" * 10, os.urandom(100_000), b"x", b"y" * 20_000, b"z" * 3, os.urandom(40_000)]
    try:
        await assert_parts_arrive_joined(client, server, parts)
    finally:
        await client.aclose()
        await server.aclose()


async def test_receive_into_reads_into_the_given_view(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """As over ws://: records are decrypted straight into the view, never past it."""
    client, server = await tls_pair(contexts, tcp=True)
    try:
        # The server sends: the client would close with the server's unread session
        # tickets in its socket, and the kernel answers that with a reset that
        # may cut off the end of the data.
        await assert_receive_into_fills_views(server, client)
    finally:
        await client.aclose()
        await server.aclose()


async def test_a_reader_waiting_on_an_idle_connection_holds_no_buffer(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A relay keeps a reader waiting on every idle agent's connection: while nothing
    has come, ``receive_some`` must not hold its 64 KiB receive buffer (1,000 idle
    wss:// agents would cost 64 MiB of it), and it still returns what comes next."""
    client, server = await tls_pair(contexts)
    got: list[bytes | bytearray] = []
    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            async def read() -> None:
                got.append(await server.receive_some())

            before = tracemalloc.get_traced_memory()[0]
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            held = tracemalloc.get_traced_memory()[0] - before
            await client.send_all(b"ping")
    finally:
        tracemalloc.stop()
        await client.aclose()
        await server.aclose()
    assert got == [b"ping"]
    assert held < 16 * 1024, f"{held} bytes held while waiting"


async def test_wait_receivable_waits_only_when_openssl_holds_nothing(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """The session reader waits for bytes after a read that left nothing (an idle
    ping): over TLS that is only when OpenSSL found no whole record left. A read that
    filled its buffer may leave records inside OpenSSL with the socket empty; waiting
    for the socket then would stall the session."""
    client, server = await tls_pair(contexts)
    try:
        with trio.fail_after(5):
            for word in (b"one", b"two"):
                await client.send_all(word)
            assert await server.receive_some(3) == b"one"
            await server.wait_receivable()  # ("two" is inside OpenSSL: no wait)
            assert await server.receive_some(100) == b"two"
            woke = trio.Event()

            async def wait_then_note() -> None:
                await server.wait_receivable()
                woke.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_then_note)
                await trio.testing.wait_all_tasks_blocked()
                assert not woke.is_set()  # (drained: it waits for the socket)
                await client.send_all(b"three")
            assert await server.receive_some(100) == b"three"
    finally:
        await client.aclose()
        await server.aclose()
