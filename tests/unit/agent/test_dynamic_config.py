"""The -D forward as YAML (``{dynamic: "[bind:]port", users_file: FILE}``) and as flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from wstunnel.cli.main import agent_config_from_args, main
from wstunnel.cli.parser import build_parser
from wstunnel.config import load_agent_config
from wstunnel.config.textforms import DYNAMIC, LOCAL
from wstunnel.errors import ConfigError

RELAY = "relay: ws://relay.example:8080/tunnel\n"


def _agent_file(tmp_path: Path, forwards: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(RELAY + "forwards:\n" + forwards)
    return path


def test_yaml_dynamic_forward_with_users_file(tmp_path: Path) -> None:
    """``{dynamic: ...}`` is a -D forward; its users_file is read relative to the
    config file, one user:password a line, comments and blank lines skipped."""
    (tmp_path / "socks-users").write_text("# who may use the proxy\nalice:s3cret\n\nbob:a:b\n")
    path = _agent_file(tmp_path, "  - 5432:db:5432\n  - {dynamic: 1080}\n"
                                 "  - {dynamic: '0.0.0.0:1081', users_file: socks-users}\n")
    config = load_agent_config(path)
    assert [f.kind for f in config.forwards] == [LOCAL, DYNAMIC, DYNAMIC]
    assert (config.forwards[1].listen_host, config.forwards[1].listen_port) == ("127.0.0.1", 1080)
    assert config.forwards[1].users is None
    assert config.forwards[2].users == frozenset({("alice", "s3cret"), ("bob", "a:b")})
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize(("entry", "users", "message"), [
    ("{dynamic: 1080, target: 'a:1'}", None, "forwards[0].target: unknown key 'target'"),
    ("{dynamic: 'x:y:z'}", None, "forwards[0].dynamic: expected [bind:]port"),
    ("{dynamic: 1080, users_file: users}", "alice\n", "forwards[0].users_file: "),
    ("{dynamic: 1080, users_file: missing}", None, "cannot read"),
])
def test_bad_dynamic_forwards_name_the_key(tmp_path: Path, entry: str, users: str | None,
                                            message: str) -> None:
    """Mistakes in a dynamic forward are config errors naming the key (and the line)."""
    if users is not None:
        (tmp_path / "users").write_text(users)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_agent_config(_agent_file(tmp_path, f"  - {entry}\n"))


def test_dash_d_flags_add_to_dash_l_and_are_named_in_errors() -> None:
    """-D entries follow the -L ones; a bad -D value is reported as -D, not -L."""
    parser = build_parser()
    args = parser.parse_args(["agent", "--relay", "ws://r:1/t", "-L", "1:h:2", "-D", "1080"])
    assert [f.kind for f in agent_config_from_args(args).forwards] == [LOCAL, DYNAMIC]
    args = parser.parse_args(["agent", "--relay", "ws://r:1/t", "-L", "1:h:2", "-D", "10x"])
    with pytest.raises(ConfigError, match=r"^-D: expected a port number"):
        agent_config_from_args(args)
    args = parser.parse_args(["agent", "--relay", "ws://r:1/t", "-L", "1080:h:2", "-D", "1080"])
    with pytest.raises(ConfigError, match=r"^-D: listen address 127.0.0.1:1080 is already "
                                          r"used by -L 1080:h:2"):
        agent_config_from_args(args)


def test_check_validates_dynamic_forwards(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``wstunnel check`` accepts a dynamic forward and refuses a broken one (exit 2)."""
    good = _agent_file(tmp_path, "  - {dynamic: 1080}\n")
    assert main(["check", "-c", str(good)]) == 0
    assert "1 forward" in capsys.readouterr().out
    bad = _agent_file(tmp_path, "  - {dynamic: 1080, users_file: nowhere}\n")
    assert main(["check", "-c", str(bad)]) == 2
