"""Config files as operators write them: YAML merge keys, odd documents, file names
relative to the config file, and values that must be refused at load rather than
at connect time."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from wstunnel.config import AgentConfig, RelayConfig, load_agent_config, load_config
from wstunnel.config.files import check_config
from wstunnel.errors import ConfigError

AGENT_HEAD = "role: agent\nrelay: ws://relay.example:8080/tunnel\n"


def write(tmp_path: Path, text: str, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_merge_key_values_may_be_overridden(tmp_path: Path) -> None:
    """``<<: *base`` then a key of its own overrides the merged one, as in safe_load."""
    config = load_agent_config(write(tmp_path, AGENT_HEAD + textwrap.dedent("""\
        forwards:
          - &base
            listen: 9000
            target: db:5432
            rate_limit: {up: 1MiB}
          - <<: *base
            listen: 9001
    """)))
    assert [(f.listen_port, f.target_host) for f in config.forwards] == [(9000, "db"),
                                                                          (9001, "db")]


def test_a_key_written_twice_beside_a_merge_is_still_a_duplicate(tmp_path: Path) -> None:
    """Only merged values may be overridden; a key written twice stays an error."""
    with pytest.raises(ConfigError) as info:
        load_agent_config(write(tmp_path, AGENT_HEAD + textwrap.dedent("""\
            forwards:
              - &base {listen: 9000, target: db:5432}
              - <<: *base
                listen: 9001
                listen: 9002
        """)))
    assert info.value.line == 7 and info.value.key_path == "forwards[1].listen"
    assert "duplicate key (first set on line 6)" in str(info.value)


def test_an_aliased_mapping_with_an_override_loads_each_time(tmp_path: Path) -> None:
    """A mapping that overrides a merged key may itself be aliased elsewhere."""
    config = load_config(write(tmp_path, AGENT_HEAD + textwrap.dedent("""\
        forwards:
          - &base {listen: 9000, target: db:5432}
          - &second
            <<: *base
            listen: 9001
        headers: {X-A: b}
        proxy: none
    """)))
    assert isinstance(config, AgentConfig) and len(config.forwards) == 2


@pytest.mark.parametrize(("text", "got"), [("- a\n- b\n", "a list"), ("hello\n", '"hello"')])
def test_check_says_a_file_that_is_not_a_mapping_is_not_one(tmp_path: Path, text: str,
                                                             got: str) -> None:
    """A list or a scalar cannot take ``role:``: say what a config file looks like."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert f"expected a mapping of settings (key: value lines), got {got}" in str(info.value)
    assert info.value.line == 1


def test_deep_nesting_is_a_located_error_not_a_traceback(tmp_path: Path) -> None:
    """YAML nested thousands deep is refused with the file named, not a RecursionError."""
    with pytest.raises(ConfigError, match="nested too deeply") as info:
        load_config(write(tmp_path, AGENT_HEAD + "headers: " + "[" * 5000 + "\n"))
    assert info.value.source == str(tmp_path / "agent.yaml")


@pytest.mark.parametrize("key", ["metrics_auth_file", "proxy_password_file"])
def test_read_files_are_relative_to_the_config_file(tmp_path: Path, key: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Like every file name in a config, these are relative to the config's directory,
    whatever the working directory is (systemd starts services in /)."""
    (tmp_path / "secret").write_text("user:password\n")
    monkeypatch.chdir("/")
    config = check_config(write(tmp_path, AGENT_HEAD + textwrap.dedent(f"""\
        forwards: ["9000:db:5432"]
        proxy: http://user@proxy.example:3128
        {key}: secret
    """)))
    assert getattr(config, key) == str(tmp_path / "secret")


def test_relay_metrics_auth_file_is_relative_to_the_config_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay's metrics_auth_file too."""
    (tmp_path / "users").write_text("user:password\n")
    monkeypatch.chdir("/")
    config = load_config(write(tmp_path, "listen: 8080\nmetrics_auth_file: users\n", "r.yaml"))
    assert isinstance(config, RelayConfig) and config.metrics_auth_file == str(tmp_path / "users")


def test_proxy_password_file_may_name_a_systemd_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``$CREDENTIALS_DIRECTORY/NAME`` loads (the agent expands it when it reads the file)."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    config = load_agent_config(write(tmp_path, AGENT_HEAD + textwrap.dedent("""\
        forwards: ["9000:db:5432"]
        proxy: http://user@proxy.example:3128
        proxy_password_file: $CREDENTIALS_DIRECTORY/proxy-pw
    """)))
    assert config.proxy_password_file == "$CREDENTIALS_DIRECTORY/proxy-pw"


def test_a_missing_read_file_is_located(tmp_path: Path) -> None:
    """A file that is not there is still refused at load, with file, line and key."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "listen: 8080\nmetrics_auth_file: nothing-here\n"))
    assert info.value.line == 2 and info.value.key_path == "metrics_auth_file"
    assert str(tmp_path / "nothing-here") in str(info.value)


@pytest.mark.parametrize("value", [r'"x\r\nEvil: 1"', r'"a\tb\u0000"'])
def test_user_agent_with_a_line_break_is_refused_at_load(tmp_path: Path, value: str) -> None:
    """A control character would break the upgrade request at every connect."""
    with pytest.raises(ConfigError) as info:
        load_agent_config(write(tmp_path, AGENT_HEAD + 'forwards: ["9000:db:5432"]\n'
                                f"user_agent: {value}\n"))
    assert info.value.line == 4 and info.value.key_path == "user_agent"
    assert "line break or control character" in str(info.value)


def test_an_aliased_list_item_is_located_where_the_alias_is(tmp_path: Path) -> None:
    """``- *f`` repeats an entry: an error about that entry names the alias's line."""
    with pytest.raises(ConfigError) as info:
        load_agent_config(write(tmp_path, AGENT_HEAD + textwrap.dedent("""\
            forwards:
              - &f {listen: 9000, target: db:5432}
              - *f
        """)))
    assert info.value.line == 5 and info.value.key_path == "forwards[1]"
