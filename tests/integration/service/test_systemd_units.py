"""The shipped unit files: `systemd-analyze verify` is silent and
`systemd-analyze security` rates both services 2.0 or lower."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[3] / "systemd"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                "(apt-get install systemd)")
SERVICES = {"wstunnel-relay.service": "wstunnel-relay.service",
            "wstunnel-agent@.service": "wstunnel-agent@test.service"}
MAX_EXPOSURE = 2.0


def _install(tmp_path: Path) -> list[Path]:
    """Copies that systemd-analyze can check here: an instance name for the
    template, ExecStart pointing at a program that exists."""
    copies = []
    for source in sorted(UNITS.iterdir()):
        target = tmp_path / SERVICES.get(source.name, source.name)
        text = source.read_text().replace("/opt/wstunnel/bin/wstunnel", "/bin/true")
        target.write_text(text)
        copies.append(target)
    return copies


def test_units_verify_without_warnings(tmp_path: Path) -> None:
    """systemd-analyze verify prints nothing for any shipped unit (it exits 0 even
    on parse warnings, so stderr is what counts)."""
    assert ANALYZE is not None
    units = _install(tmp_path)
    result = subprocess.run([ANALYZE, "verify", *map(str, units)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("name", sorted(SERVICES.values()))
def test_service_exposure_is_at_most_2(tmp_path: Path, name: str) -> None:
    """systemd-analyze security --offline=true rates the service 2.0 or lower."""
    assert ANALYZE is not None
    _install(tmp_path)
    result = subprocess.run([ANALYZE, "security", "--offline=true", str(tmp_path / name)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
