"""Fixtures shared by the integration tests: wstunnel's log lines, a test PKI."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from wstunnel.net import pump
from wstunnel.net.transport import TunnelTransport

from .log_watch import LogWatch
from .real_peers import Pki, make_pki


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    watch = LogWatch()
    logger = logging.getLogger("wstunnel")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=["pump", "splice"])
def carrier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test twice: local sockets carried by the session's socket pump, and by
    splice (two tasks per channel), the fallback where there is no epoll."""
    if request.param == "pump" and not pump.AVAILABLE:
        pytest.skip("no select.epoll here")
    monkeypatch.setattr(TunnelTransport, "use_pump", request.param == "pump")
    return str(request.param)
