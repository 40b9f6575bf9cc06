"""What a new user meets first: ``--help`` texts, ``check`` opening the named files."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from wstunnel.cli import main
from wstunnel.cli.parser import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_option_has_a_help_text() -> None:
    """Every option of the top level and of every subcommand says what it does."""
    parser = build_parser()
    missing = [(name, action.option_strings or action.dest)
               for name, sub in {"wstunnel": parser, **_subcommands(parser)}.items()
               for action in sub._actions
               if not isinstance(action, argparse._SubParsersAction)
               and not (action.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("name", sorted(_subcommands(build_parser())))
def test_every_subcommand_help_has_a_paragraph_and_examples(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``wstunnel SUB --help`` explains the command and shows a runnable example."""
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"  wstunnel {name}" in out.split("examples:", 1)[1]


def test_top_level_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    """``wstunnel --help`` shows how to start a relay and an agent."""
    assert main(["--help"]) == 0
    examples = capsys.readouterr().out.split("examples:", 1)[1]
    assert "wstunnel relay" in examples and "wstunnel agent" in examples


# ------------------------------------------------------------ check: files

def _agent_yaml(tmp_path: Path, token_file: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text("relay: ws://127.0.0.1:8080/tunnel\n"
                    "forwards: ['2222:127.0.0.1:22']\n"
                    f"token_file: {token_file}\n")
    return path


def test_check_reports_a_missing_token_file(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A token_file that does not exist: ``file:line: key: cannot read``, exit 2."""
    path = _agent_yaml(tmp_path, "nope.token")
    assert main(["check", "-c", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert f"{path}:3: token_file: cannot read \"{tmp_path / 'nope.token'}\"" in captured.err


def test_check_accepts_a_readable_token_file(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A token_file beside the config is found relative to the config's directory."""
    (tmp_path / "agent.token").write_text("secret\n")
    assert main(["check", "-c", str(_agent_yaml(tmp_path, "agent.token"))]) == 0
    assert ": OK " in capsys.readouterr().out


def test_check_reports_an_unreadable_certificate(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A tls.cert_file that cannot be read (a directory: even root cannot read it as a file)."""
    (tmp_path / "relay.crt").mkdir()
    (tmp_path / "relay.key").write_text("key\n")
    path = tmp_path / "relay.yaml"
    path.write_text("listen: 127.0.0.1:8443\nno_auth: true\n"
                    "tls:\n  cert_file: relay.crt\n  key_file: relay.key\n")
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:4: tls.cert_file: cannot read" in err and "Traceback" not in err


# ------------------------------------------------------------ README diagram

def _diagram() -> list[str]:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
    block = next(b for b in readme.split("```")[1::2] if "┌" in b)
    return block.strip("\n").splitlines()


def _columns(lines: list[str], chars: str) -> set[int]:
    return {i for line in lines for i, ch in enumerate(line) if ch in chars}


def test_readme_diagram_boxes_line_up() -> None:
    """In a monospace font every box of the README diagram is closed and straight:
    corners over corners, side bars under them, the firewall one column."""
    rows = [line for line in _diagram() if any(ch in line for ch in "┌│└")]
    tops, sides, bottoms = rows[0], rows[1:-1], rows[-1]
    left = _columns([tops], "┌")
    right = _columns([tops], "┐")
    assert left == _columns([bottoms], "└") and right == _columns([bottoms], "┘")
    for side in sides:
        assert _columns([side], "│") == left | right, side
    assert len(_columns(rows, "║╬")) == 1
