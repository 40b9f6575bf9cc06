"""The real `wstunnel relay` speaking sd_notify to a real AF_UNIX datagram socket,
and taking its listener from systemd-style socket activation."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[3]
_CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


class NotifySocket:
    """A NOTIFY_SOCKET endpoint: bound AF_UNIX datagram socket with SO_PASSCRED."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    async def bind(self) -> None:
        await self.sock.bind(self.path)

    async def receive(self) -> tuple[int, list[str]]:
        """(sender pid from SCM_CREDENTIALS, KEY=VALUE fields) of the next message."""
        data, ancillary, _flags, _addr = await self.sock.recvmsg(
            4096, socket.CMSG_SPACE(_CREDENTIALS.size))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CREDENTIALS.unpack(payload[:_CREDENTIALS.size])[0]
        return pid, data.decode().split("\n")

    async def expect(self, pid: int, key: str) -> list[str]:
        """Read messages until one has ``key``; every one must come from ``pid``."""
        while True:
            sender, fields = await self.receive()
            assert sender == pid, f"message from pid {sender}, expected {pid}: {fields}"
            if any(field.split("=", 1)[0] == key for field in fields):
                return fields


async def test_relay_notifies_ready_watchdog_reloading_and_stopping(tmp_path: Path) -> None:
    """READY=1 (with STATUS) once listening, WATCHDOG=1 at half of WATCHDOG_USEC,
    RELOADING=1 then READY=1 on SIGHUP, STOPPING=1 on SIGTERM; exit code 0."""
    notify = NotifySocket(str(tmp_path / "notify"))
    await notify.bind()
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "wstunnel", "relay", "--listen", "127.0.0.1:0"],
        env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(15):
            ready = await notify.expect(process.pid, "READY")
            assert any(f.startswith("STATUS=listening on 127.0.0.1:") for f in ready)
            start = trio.current_time()
            for _ in range(3):
                assert await notify.expect(process.pid, "WATCHDOG") == ["WATCHDOG=1"]
            assert trio.current_time() - start < 2.0  # about 0.1 s apart, not seconds
            process.send_signal(signal.SIGHUP)
            await notify.expect(process.pid, "RELOADING")
            await notify.expect(process.pid, "READY")
            process.send_signal(signal.SIGTERM)
            await notify.expect(process.pid, "STOPPING")
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        notify.sock.close()


async def test_relay_serves_on_a_socket_activated_listener(tmp_path: Path) -> None:
    """With LISTEN_PID/LISTEN_FDS the relay serves on fd 3 instead of binding:
    GET /health on the socket the test created answers 200."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    fd = listener.fileno()
    launcher = (  # what systemd does between fork and exec
        f"import os, sys; os.dup2({fd}, 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", launcher, "-m", "wstunnel", "relay",
         "--listen", "127.0.0.1:1"],  # ignored: the passed socket is used
        cwd=ROOT, pass_fds=[fd], stderr=subprocess.DEVNULL)
    listener.close()
    try:
        with trio.fail_after(15):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    break
                except OSError:
                    assert process.poll() is None, "the relay exited"
                    await trio.sleep(0.05)
            async with stream:
                await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = await stream.receive_some()
            assert answer.startswith(b"HTTP/1.1 200")
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


