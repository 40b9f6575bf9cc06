"""An abortive close (net/ending.py) resets the connection whatever stream wraps the socket.

``abort_stream`` is how a carrier says "this connection failed" to the
application at the other end: it must see ECONNRESET, not a clean end of
stream, for trio's socket stream, the relay's and agent's own ws:// and
wss:// streams, and trio's TLS stream over a socket stream.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trio

from wstunnel.net.ending import abort_stream, socket_of, unsent_size
from wstunnel.net.plain_stream import take_over
from wstunnel.net.tls_stream import start_tls
from wstunnel.security.tls import ClientTLS, client_context, self_signed_certificate, server_context

Contexts = tuple[ssl.SSLContext, ssl.SSLContext]


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> Contexts:
    """(server, client) TLS contexts for the name relay.test."""
    folder = tmp_path_factory.mktemp("tls")
    key_pem, cert_pem = self_signed_certificate(["relay.test"])
    (folder / "cert.pem").write_bytes(cert_pem)
    (folder / "key.pem").write_bytes(key_pem)
    return (server_context(str(folder / "cert.pem"), str(folder / "key.pem")),
            client_context(ClientTLS(ca_file=str(folder / "cert.pem"))))


Wrap = Callable[[trio.SocketStream, Contexts], Awaitable[trio.abc.Stream]]


async def _trio(tcp: trio.SocketStream, _: object) -> trio.abc.Stream:
    return tcp


async def _plain(tcp: trio.SocketStream, _: object) -> trio.abc.Stream:
    return take_over(tcp)


async def _tls(tcp: trio.SocketStream, pair: Contexts) -> trio.abc.Stream:
    return await start_tls(tcp, pair[1], server_hostname="relay.test")


async def _trio_tls(tcp: trio.SocketStream, pair: Contexts) -> trio.abc.Stream:
    stream = trio.SSLStream(tcp, pair[1], server_hostname="relay.test")
    await stream.do_handshake()
    return stream


async def _far_end(peer: socket.socket, tls: ssl.SSLContext | None) -> trio.abc.Stream:
    """The peer's end: the raw socket, or TLS over it once the handshake is done."""
    tcp = trio.SocketStream(trio.socket.from_stdlib_socket(peer))
    return tcp if tls is None else await start_tls(tcp, tls, server_side=True)


@pytest.mark.parametrize("wrap", [_trio, _plain, _tls, _trio_tls],
                         ids=["trio", "plain", "tls", "trio-ssl"])
async def test_an_aborted_stream_reaches_the_peer_as_a_reset(
        wrap: Wrap, contexts: Contexts) -> None:
    """After ``abort_stream`` the peer's read fails with ECONNRESET (not a clean end of
    stream), for every kind of stream the tunnel carries a connection or a session on."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    tls = contexts[0] if wrap in (_tls, _trio_tls) else None
    ends: dict[str, trio.abc.Stream] = {}

    async def far() -> None:
        ends["far"] = await _far_end(peer, tls)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(far)
            ends["ours"] = await wrap(trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
                                      contexts)
        # (nothing left unread on our side: closing over unread bytes resets anyway)
        await ends["far"].send_all(b"hello")
        assert await ends["ours"].receive_some(10) == b"hello"
        await abort_stream(ends["ours"])
    far_socket = socket_of(ends["far"])
    assert far_socket is not None
    # (the socket itself: a TLS layer may read a reset as its end, which is its choice)
    with socket.socket(fileno=os.dup(far_socket.fileno())) as raw:
        raw.settimeout(5)
        try:
            with pytest.raises(ConnectionResetError):
                raw.recv(10)
        finally:
            await ends["far"].aclose()


async def test_a_reset_after_data_on_a_plain_stream_comes_after_the_data() -> None:
    """``after_sent`` on the ws:// stream: what was written still arrives whole, then
    the reset (an abortive close at once would discard what the kernel had not sent)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    stream = take_over(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    far = trio.SocketStream(trio.socket.from_stdlib_socket(peer))
    payload = os.urandom(4 << 20)
    received = bytearray()

    async def read_to_the_reset() -> None:
        with pytest.raises(trio.BrokenResourceError) as caught:
            while data := await far.receive_some(1 << 20):
                received.extend(data)
        assert isinstance(caught.value.__cause__, ConnectionResetError)

    with trio.fail_after(10):
        async with far, trio.open_nursery() as nursery:
            left = stream.send_nowait([payload])  # (what the kernel takes, nobody reading)
            taken = len(payload) - sum(map(len, left))
            assert unsent_size(stream.socket) > 0  # (else this would test nothing)
            nursery.start_soon(read_to_the_reset)
            await abort_stream(stream, after_sent=True)
    assert received == payload[:taken]
