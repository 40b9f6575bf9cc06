"""Shared test setup: hypothesis profiles (CI runs the bounded one)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI is deterministic (same examples every run); "dev" and "deep" explore.
settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("deep", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
