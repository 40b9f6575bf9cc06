"""A unix socket listener's file: its mode, set without a by-path chmod after bind."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from wstunnel.net.unix_socket import SOCKET_MODE, bind_listener


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mask", [0o022, 0o007, 0o077, 0o002, 0o000])
def test_the_socket_file_is_created_0660_less_the_umask(tmp_path: Path, mask: int) -> None:
    """Owner and (if the umask allows) group may connect, nobody else: 0640 under
    022, 0660 under systemd's 0007; the process's umask is as it was."""
    path = str(tmp_path / "app.sock")
    with _umask(mask):
        sock, socket_file = bind_listener(path)
        try:
            assert os.lstat(path).st_mode & 0o777 == SOCKET_MODE & ~mask
            assert _current_umask() == mask
        finally:
            sock.close()
            socket_file.remove()


def test_a_failed_bind_leaves_the_umask_as_it_was(tmp_path: Path) -> None:
    """A bind that fails (no such directory) restores the process's umask too."""
    with _umask(0o027):
        with pytest.raises(FileNotFoundError):
            bind_listener(str(tmp_path / "missing" / "app.sock"))
        assert _current_umask() == 0o027


def test_a_file_swapped_in_after_bind_is_not_chmodded_through_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a directory others may write to, the socket file can be replaced by a
    symlink right after bind: nothing follows it to change the mode of another
    file, and the socket file already had its final mode when bind created it."""
    path = str(tmp_path / "app.sock")
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    victim.chmod(0o644)
    at_bind: list[int] = []

    class Swapping(socket.socket):
        def bind(self, address: object) -> None:
            super().bind(address)  # type: ignore[arg-type]
            at_bind.append(stat.S_IMODE(os.lstat(path).st_mode))
            os.rename(path, str(tmp_path / "moved.sock"))
            os.symlink(victim, path)

    monkeypatch.setattr(socket, "socket", Swapping)
    with _umask(0o022):
        sock, socket_file = bind_listener(path)
    try:
        assert at_bind == [0o640]  # no moment with looser permissions
        assert stat.S_IMODE(victim.stat().st_mode) == 0o644
        assert victim.read_text() == "not yours"
    finally:
        sock.close()
        socket_file.remove()
