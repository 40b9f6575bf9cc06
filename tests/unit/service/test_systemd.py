"""systemd.py without systemd: environment parsing and the no-op default."""

from __future__ import annotations

import os
import socket

from wstunnel.service.systemd import Notifier, listen_sockets


def test_without_notify_socket_nothing_is_sent() -> None:
    """Outside systemd every notification is a no-op that reports False."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x") and not notifier.watchdog() and not notifier.stopping()
    assert notifier.watchdog_interval is None


def test_abstract_socket_and_watchdog_interval() -> None:
    """@name means the abstract namespace; the watchdog pings at half of WATCHDOG_USEC,
    and not at all when WATCHDOG_PID names another process."""
    env = {"NOTIFY_SOCKET": "@wstunnel-x", "WATCHDOG_USEC": "3000000"}
    notifier = Notifier(env)
    assert notifier.address == b"\0wstunnel-x" and notifier.address_text == "@wstunnel-x"
    assert notifier.watchdog_interval == 1.5
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 1.5
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": "relative"}).address is None


def test_messages_reach_a_datagram_socket(tmp_path: object) -> None:
    """READY/STATUS/RELOADING/STOPPING/WATCHDOG arrive as newline-separated fields."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"wstunnel-unit-{os.getpid()}"
    server.bind(b"\0" + name.encode())
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000"})
        notifier.ready("session up\nto x")
        notifier.reloading()
        notifier.watchdog()
        notifier.stopping()
        notifier.close()
        got = [server.recv(4096).decode().split("\n") for _ in range(4)]
    finally:
        server.close()
    assert got[0] == ["READY=1", "STATUS=session up to x"]
    assert got[1][0] == "RELOADING=1" and got[1][1].startswith("MONOTONIC_USEC=")
    assert got[2:] == [["WATCHDOG=1"], ["STOPPING=1"]]


def test_listen_fds_for_another_process_are_ignored_and_unset() -> None:
    """LISTEN_FDS meant for another pid is ignored; the variables are removed."""
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert listen_sockets(env) == []
    assert env == {}
