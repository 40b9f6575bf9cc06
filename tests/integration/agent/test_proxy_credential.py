"""The proxy password can come from a systemd credential, like the token."""

from __future__ import annotations

import base64
from functools import partial
from pathlib import Path

import pytest
import trio

from wstunnel.agent.proxy import ProxyDialer
from wstunnel.config.proxy_url import parse_proxy_url


async def test_proxy_password_file_expands_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """proxy_password_file: $CREDENTIALS_DIRECTORY/NAME is read from systemd's directory."""
    (tmp_path / "proxy-pw").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    seen = bytearray()

    async def proxy(stream: trio.SocketStream) -> None:
        async with stream:
            while b"\r\n\r\n" not in seen:
                seen.extend(await stream.receive_some())
            await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await stream.receive_some()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, proxy, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            dial = ProxyDialer(parse_proxy_url(f"http://agent@127.0.0.1:{port}"),
                               "$CREDENTIALS_DIRECTORY/proxy-pw")
            stream = await dial("relay.example.com", 443)
            await stream.aclose()
            nursery.cancel_scope.cancel()
    expected = base64.b64encode(b"agent:s3cret").decode()
    assert f"Proxy-Authorization: Basic {expected}".lower() in seen.decode().lower()
