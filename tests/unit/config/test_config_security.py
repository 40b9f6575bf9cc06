"""Security keys in agent and relay configs: types, contradictions, file paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from wstunnel.cli import main
from wstunnel.config import load_agent_config, load_relay_config
from wstunnel.errors import ConfigError
from wstunnel.security.auth import hash_token, new_token, scrypt_hash

HASH = str(hash_token(new_token("a1")))
OLD_HASH = str(scrypt_hash(new_token("a1"), n=1 << 10))
AGENT = "relay: wss://relay.example/tunnel\nforwards: ['9000:db:5432']\n"
RELAY = "listen: 127.0.0.1:8080\n"


def _file(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_relay_agents_tls_and_limits_load(tmp_path: Path) -> None:
    """agents with hashes (keygen's and the older scrypt form) and rules, a tls section
    (paths beside the file) and limits."""
    config = load_relay_config(_file(tmp_path, RELAY + f"""\
agents:
  - name: a1
    token_hash: {HASH}
    allow: [db.internal:5432]
  - name: a2
    token_hash: {OLD_HASH}
tls: {{cert_file: relay.crt, key_file: /etc/k.key}}
max_pending_opens: 8
max_buffered_size: 64MiB
max_sessions_per_agent: 2
idle_timeout: 600
""", "relay.yaml"))
    entry, older = config.agents
    assert entry.name == "a1" and str(entry.token_hash) == HASH
    assert str(older.token_hash) == OLD_HASH
    assert [str(r) for r in entry.allow] == ["db.internal:5432"]
    assert config.tls is not None
    assert (config.tls.cert_file, config.tls.key_file) == (str(tmp_path / "relay.crt"),
                                                           "/etc/k.key")
    assert (config.max_pending_opens, config.max_buffered_size) == (8, 64 << 20)
    assert (config.max_sessions_per_agent, config.idle_timeout) == (2, 600.0)


@pytest.mark.parametrize("text, key, fragment", [
    ("allow: [10.0.0.0/8]\n", "allow", "applies only with no_auth"),
    (f"no_auth: true\nagents: [{{name: a1, token_hash: '{HASH}'}}]\n", "no_auth",
     "remove it or the agents list"),
    (f"agents: [{{name: a1, token_hash: '{HASH}'}}, {{name: a1, token_hash: '{HASH}'}}]\n",
     "agents[1]", "listed twice"),
    ("agents: [{name: a1}]\n", "agents[0]", "could never log in"),
    ("agents: [{name: a1, token_hash: a1.c2VjcmV0}]\n", "agents[0].token_hash",
     "looks like a token"),
    ("agents: [{name: 'a b', token_hash: x}]\n", "agents[0].name", "agent name"),
    ("tls: {cert_file: c}\n", "tls.key_file", "required key is missing"),
    ("no_auth: yes please\n", "no_auth", "expected true or false"),
])
def test_relay_security_mistakes(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    """Contradictions and bad values name the key and say what to change."""
    with pytest.raises(ConfigError, match=fragment) as info:
        load_relay_config(_file(tmp_path, RELAY + text, "relay.yaml"))
    assert info.value.key_path == key


def test_agent_security_keys_load(tmp_path: Path) -> None:
    """Token source, pin (normalized), SNI name and client certificate beside the file."""
    config = load_agent_config(_file(tmp_path, AGENT + """\
token_file: agent.token
relay_fingerprint: "SHA256:""" + "AB" * 32 + """"
server_name: relay.internal
client_cert_file: agent.crt
""", "agent.yaml"))
    assert config.token_file == str(tmp_path / "agent.token")
    assert config.relay_fingerprint == "sha256:" + "ab" * 32
    assert config.server_name == "relay.internal"
    assert config.client_tls.client_cert_file == str(tmp_path / "agent.crt")


@pytest.mark.parametrize("text, key, fragment", [
    ("token_file: a\ntoken_env: B\n", "token_env", "one token source"),
    ("ca_file: a\ninsecure_skip_verify: true\n", "insecure_skip_verify", "choose one"),
    ('relay_fingerprint: "sha256:12"\n', "relay_fingerprint", "64 hex digits"),
    ("client_key_file: k\n", "client_key_file", "needs client_cert_file"),
])
def test_agent_security_mistakes(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    """Two ways to check the relay, two token sources, a bad pin: errors naming the key."""
    with pytest.raises(ConfigError, match=fragment) as info:
        load_agent_config(_file(tmp_path, AGENT + text, "agent.yaml"))
    assert info.value.key_path == key


def test_tls_options_need_wss(tmp_path: Path) -> None:
    """A pin on a ws:// relay would silently protect nothing, so it is an error."""
    text = AGENT.replace("wss://", "ws://") + 'relay_fingerprint: "sha256:' + "00" * 32 + '"\n'
    with pytest.raises(ConfigError, match="needs a wss:// relay URL"):
        load_agent_config(_file(tmp_path, text, "agent.yaml"))


def test_flags_get_the_same_checks(capsys: pytest.CaptureFixture[str]) -> None:
    """--allow without --no-auth and a pin on ws:// are refused from the command line too."""
    assert main(["relay", "--listen", "127.0.0.1:0", "--allow", "10.0.0.0/8"]) == 2
    assert "applies only with no_auth" in capsys.readouterr().err
    assert main(["agent", "--relay", "ws://r/t", "-L", "1:h:2",
                 "--relay-fingerprint", "sha256:" + "00" * 32]) == 2
    assert "needs a wss://" in capsys.readouterr().err
    assert main(["relay", "--listen", "127.0.0.1:0", "--tls-cert-file", "c"]) == 2
    assert "--tls-key-file" in capsys.readouterr().err


def test_unusable_security_files_stop_the_start_with_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing TLS certificate, CA file or token file is one line naming it, exit 2."""
    missing = str(tmp_path / "missing")
    assert main(["relay", "--listen", "127.0.0.1:0", "--tls-cert-file", missing,
                 "--tls-key-file", missing]) == 2
    assert f"cannot load the TLS certificate {missing}" in capsys.readouterr().err
    assert main(["agent", "--relay", "wss://127.0.0.1:1/t", "-L", "0:h:1",
                 "--ca-file", missing]) == 2
    assert f"ca_file: cannot load {missing}" in capsys.readouterr().err
    assert main(["agent", "--relay", "ws://127.0.0.1:1/t", "-L", "0:h:1",
                 "--token-file", missing]) == 2
    assert "token_file: cannot read the token" in capsys.readouterr().err
