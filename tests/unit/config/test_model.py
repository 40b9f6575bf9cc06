"""What a config holds parsed: built once per load, derived again by ``replace``."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from wstunnel.config import AgentConfig, RelayConfig, parse_config
from wstunnel.security.allow_rule import AllowRule
from wstunnel.security.auth import hash_token, new_token

HASH = str(hash_token(new_token("a1")))
RELAY = f"""\
listen: 127.0.0.1:8080
agents:
  - name: a1
    token_hash: "{HASH}"
    allow: [db.internal:5432, 10.0.0.0/8]
"""


def _relay() -> RelayConfig:
    config = parse_config(RELAY)
    assert isinstance(config, RelayConfig)
    return config


def _agent(**keys: object) -> AgentConfig:
    config = parse_config({"relay": "wss://relay.example:8443/t", "forwards": ["9000:db:1"],
                           **keys})
    assert isinstance(config, AgentConfig)
    return config


def test_an_accounts_policy_is_built_once_and_keeps_its_verdicts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every use of an agent's policy (each OPEN) gets the same object, so a question
    asked before is answered from its verdict cache instead of the rules again."""
    (account,) = _relay().agents
    assert account.policy is account.policy
    asked: list[AllowRule] = []
    matches = AllowRule.matches

    def counting(rule: AllowRule, *args: object, **kwargs: bool) -> bool:
        asked.append(rule)
        return matches(rule, *args, **kwargs)  # type: ignore[arg-type]  # (name, port, address)

    monkeypatch.setattr(AllowRule, "matches", counting)
    target = ipaddress.ip_address("10.1.2.3")
    assert account.policy.allows("10.1.2.3", 22, target)
    assert asked
    asked.clear()
    assert account.policy.allows("10.1.2.3", 22, target)
    assert asked == []


def test_a_changed_config_gets_policies_of_its_own() -> None:
    """A reload (or ``replace``) with other rules gets a policy of those rules."""
    config = _relay()
    (account,) = config.agents
    narrower = dataclasses.replace(account, allow=(AllowRule.parse("db.internal:5432"),))
    address = ipaddress.ip_address("10.1.2.3")
    assert account.policy.allows("10.1.2.3", 22, address)
    assert not narrower.policy.allows("10.1.2.3", 22, address)
    anonymous = dataclasses.replace(config, agents=(), no_auth=True,
                                    allow=(AllowRule.parse("10.0.0.0/8"),))
    assert anonymous.policy is anonymous.policy
    assert anonymous.policy.allows("10.1.2.3", 22, address)
    assert narrower == dataclasses.replace(narrower)  # the policy takes no part in equality


def test_the_relay_url_is_parsed_once_with_the_config() -> None:
    """``relay_url`` is a stored value, derived again when ``relay`` changes."""
    config = _agent()
    assert config.relay_url is config.relay_url
    assert tuple(config.relay_url) == (True, "relay.example", 8443, "/t")
    moved = dataclasses.replace(config, relay="ws://other.example/x")
    assert tuple(moved.relay_url) == (False, "other.example", 80, "/x")


@pytest.mark.parametrize(("proxy", "expected"), [
    (None, None), ("none", None), ("http://agent:pw@proxy.example:3128", "agent"),
])
def test_the_proxy_setting_is_parsed_once(proxy: str | None, expected: str | None) -> None:
    """``proxy_url`` holds the explicit proxy parsed (None: the environment, or direct)."""
    config = _agent(**({"proxy": proxy} if proxy is not None else {}))
    url = config.proxy_url
    assert (url.username if url is not None else None) == expected
    assert "pw" not in repr(config)
