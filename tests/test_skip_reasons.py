"""A test that skips inside a trio nursery (a missing program) shows why it skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

CONFTEST = Path(__file__).with_name("conftest.py").read_text()


def test_a_skip_inside_a_nursery_keeps_its_reason(pytester: pytest.Pytester) -> None:
    """pytest-trio re-raises such a skip without its text; our hook restores it."""
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner='''
import pytest
import trio

async def test_needs_a_program() -> None:
    async with trio.open_nursery():
        pytest.skip("frobnicator is not installed (apt-get install frobnicator)")
''')
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*frobnicator is not installed (apt-get install frobnicator)*"])
