"""Shared test setup: hypothesis profiles (CI runs the bounded one)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

# CI is deterministic (same examples every run); "dev" and "deep" explore.
settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("deep", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A skip raised inside a trio nursery reaches pytest-trio wrapped in an exception
    group, and it re-raises a bare ``pytest.skip()``: the reason (which program to
    install) would be lost. Raise the original skip instead."""
    try:
        return (yield)
    except pytest.skip.Exception as skip:
        group = skip.__context__
        if skip.msg or not isinstance(group, BaseExceptionGroup):
            raise
        skips, _ = group.split(pytest.skip.Exception)
        first: BaseException | None = skips
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise (first or skip) from None
