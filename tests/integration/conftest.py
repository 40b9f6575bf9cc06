"""Fixtures shared by the integration tests: wstunnel's log lines, a test PKI."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

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
