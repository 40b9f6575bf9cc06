"""``wstunnel service print-unit|print-config``: every shipped file, exactly as shipped.

Run from the checkout these read systemd/ and configs/ at the top of the
repository; tests/packaging checks the same command from an installed wheel.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wstunnel.cli import main, shipped

ROOT = Path(__file__).resolve().parents[3]
ACTIONS = {"print-unit": ("systemd", shipped.UNITS), "print-config": ("configs", shipped.CONFIGS)}
CASES = [(action, name) for action, (_, names) in ACTIONS.items() for name in names]


@pytest.mark.parametrize("folder", ["systemd", "configs"])
def test_every_shipped_file_has_a_name(folder: str) -> None:
    """A unit or config added to the repository can be printed by an installed wstunnel."""
    names = {"systemd": shipped.UNITS, "configs": shipped.CONFIGS}[folder]
    assert sorted(names.values()) == sorted(p.name for p in (ROOT / folder).iterdir())


@pytest.mark.parametrize(("action", "name"), CASES)
def test_prints_the_file_byte_for_byte(action: str, name: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """What is printed can be redirected into place as it is."""
    folder, names = ACTIONS[action]
    assert main(["service", action, name]) == 0
    assert capsys.readouterr().out == (ROOT / folder / names[name]).read_text()


def test_missing_files_say_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """An install without the files exits 1 naming where it looked and what to do."""
    monkeypatch.setattr(shipped, "_PLACES", (tmp_path,))
    assert main(["service", "print-unit", "relay"]) == 1
    err = capsys.readouterr().err
    assert "wstunnel-relay.service is not installed" in err
    assert str(tmp_path / "systemd") in err and "python -m build" in err


def test_an_unknown_name_lists_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["service", "print-unit", "proxy"]) == 2
    assert "choose from 'relay', 'relay-socket', 'agent'" in capsys.readouterr().err
