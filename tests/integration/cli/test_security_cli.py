"""The real relay program serving wss:// with token auth; SIGHUP swaps the certificate."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

from wstunnel.agent.connect import open_websocket
from wstunnel.config import parse_relay_url
from wstunnel.security.auth import hash_token, new_token
from wstunnel.security.tls import ClientTLS, client_context

from ..security_helpers import write_self_signed

ROOT = Path(__file__).resolve().parents[3]


async def _read_until(process: trio.Process, pattern: bytes, seen: bytearray) -> re.Match[bytes]:
    assert process.stderr is not None
    while (match := re.search(pattern, seen)) is None:
        data = await process.stderr.receive_some()
        assert data, f"relay exited: {seen.decode(errors='replace')}"
        seen.extend(data)
    return match


async def _login(port: int, pin: str, token: str) -> None:
    url = parse_relay_url(f"wss://127.0.0.1:{port}/tunnel")
    stream, _ = await open_websocket(
        url, ssl_context=client_context(ClientTLS(relay_fingerprint=pin)), pin=pin,
        headers=[("Authorization", f"Bearer {token}")])
    await stream.aclose()


async def test_relay_process_with_tls_and_tokens_reloads_on_sighup(tmp_path: Path) -> None:
    """`wstunnel relay -c` with tls and agents accepts a pinned, authenticated agent, and
    after the files change and SIGHUP arrives it serves the new certificate."""
    first = write_self_signed(tmp_path, "relay", ["127.0.0.1"])
    token = new_token("a1")
    config = tmp_path / "relay.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ntls: {{cert_file: relay.crt, key_file: relay.key}}\n"
                      f"agents:\n  - name: a1\n    token_hash: {hash_token(token)}\n")
    assert token not in config.read_text()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "wstunnel", "relay", "-c", str(config)],
        stderr=subprocess.PIPE, cwd=ROOT)
    seen = bytearray()
    try:
        with trio.fail_after(15):
            match = await _read_until(process, rb"listening on 127\.0\.0\.1:(\d+)", seen)
            port = int(match.group(1))
            await _login(port, first.fingerprint, token)
            second = write_self_signed(tmp_path, "relay", ["127.0.0.1"])
            process.send_signal(signal.SIGHUP)
            await _read_until(process, rb"TLS certificate reloaded", seen)
            await _login(port, second.fingerprint, token)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
