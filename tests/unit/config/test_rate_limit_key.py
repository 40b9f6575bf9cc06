"""The relay's rate_limit: per agent (agents[].rate_limit), or global with no_auth."""

from __future__ import annotations

import pytest

from wstunnel.config import AgentConfig, RateLimit, RelayConfig, parse_config
from wstunnel.errors import ConfigError
from wstunnel.security.auth import hash_token, new_token

MiB = 1024 * 1024


def _relay(entry: str) -> str:
    return ("listen: 127.0.0.1:8080\nagents:\n  - name: a1\n"
            f"    token_hash: {hash_token(new_token('a1'))}\n{entry}")


def _parsed(text: str) -> RelayConfig:
    config = parse_config(text)
    assert isinstance(config, RelayConfig)
    return config


def test_sizes_per_agent_with_an_optional_burst() -> None:
    """Rates are sizes per second (10MiB, 5M, 1048576), each way optional."""
    config = _parsed(_relay("    rate_limit: {down: 10MiB, up: 5MiB, burst: 1MiB}\n"))
    assert config.agents[0].rate_limit == RateLimit(10 * MiB, 5 * MiB, MiB)
    config = _parsed(_relay("    rate_limit: {up: 1048576}\n"))
    assert config.agents[0].rate_limit == RateLimit(None, MiB, None)
    assert _parsed(_relay("")).agents[0].rate_limit is None


@pytest.mark.parametrize(("entry", "key_path", "words"), [
    ("    rate_limit: {burst: 1MiB}\n", "agents[0].rate_limit", "down, up or both"),
    ("    rate_limit: {down: 10}\n", "agents[0].rate_limit.down", "from 1024"),
    ("    rate_limit: {dwon: 1MiB}\n", "agents[0].rate_limit.dwon", "did you mean 'down'"),
    ("    rate_limit: 10MiB\n", "agents[0].rate_limit", "a mapping"),
])
def test_mistakes_name_the_key(entry: str, key_path: str, words: str) -> None:
    """A rate_limit without a rate, too small, misspelt or not a section says where."""
    with pytest.raises(ConfigError) as info:
        parse_config(_relay(entry))
    assert info.value.key_path == key_path
    assert words in str(info.value)


def test_the_global_rate_limit_is_for_no_auth_only() -> None:
    """With agents the limit goes under each agent, as allow does."""
    config = _parsed("listen: 127.0.0.1:8080\nno_auth: true\nrate_limit: {down: 2MiB}\n")
    assert config.rate_limit == RateLimit(down=2 * MiB)
    with pytest.raises(ConfigError) as info:
        parse_config(_relay("") + "rate_limit: {down: 2MiB}\n")
    assert info.value.key_path == "rate_limit"
    assert "agents[].rate_limit" in str(info.value)


def test_an_agents_forwards_may_each_carry_a_rate_limit() -> None:
    """forwards[].rate_limit in the mapping forms (-L, -D, -R); the text form has none."""
    config = parse_config(
        "relay: ws://r:1/tunnel\nforwards:\n"
        "  - {listen: 9000, target: 'db:5432', rate_limit: {up: 1MiB}}\n"
        "  - {dynamic: 1080, rate_limit: {down: 2MiB, burst: 512KiB}}\n"
        "  - {reverse: 2222, target: '127.0.0.1:22', rate_limit: {down: 3MiB}}\n"
        "  - '9001:db:5432'\n")
    assert isinstance(config, AgentConfig)
    assert [f.rate_limit for f in config.forwards] == [
        RateLimit(up=MiB), RateLimit(down=2 * MiB, burst=512 * 1024), RateLimit(down=3 * MiB),
        None]
    with pytest.raises(ConfigError) as info:
        parse_config("relay: ws://r:1/tunnel\nforwards:\n"
                     "  - {listen: 9000, target: 'db:5432', rate_limit: {}}\n")
    assert info.value.key_path == "forwards[0].rate_limit"
