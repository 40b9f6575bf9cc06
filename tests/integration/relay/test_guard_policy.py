"""The relay asks an agent's policy on every OPEN: it must be the account's one Policy."""

from __future__ import annotations

import dataclasses

from wstunnel.config import RelayConfig, parse_config
from wstunnel.relay.guard import Gatekeeper, Identity
from wstunnel.security.allow_rule import AllowRule
from wstunnel.security.auth import hash_token, new_token

HASH = str(hash_token(new_token("a1")))
RELAY = f"listen: 127.0.0.1:0\nagents: [{{name: a1, token_hash: '{HASH}', allow: [db:1]}}]\n"


def _config() -> RelayConfig:
    config = parse_config(RELAY)
    assert isinstance(config, RelayConfig)
    return config


def test_every_open_gets_the_accounts_one_policy() -> None:
    """current_policy (asked per OPEN) hands out the Policy built at load, never a new
    one, so its verdict cache serves every channel; a reload brings the new rules."""
    config = _config()
    gate = Gatekeeper(config)
    (account,) = config.agents
    identity = Identity("a1", account.policy)
    assert gate.current_policy(identity) is gate.current_policy(identity) is account.policy
    reloaded = dataclasses.replace(
        config, agents=(dataclasses.replace(account, allow=(AllowRule.parse("db:2"),)),))
    gate.reconfigure(reloaded)
    policy = gate.current_policy(identity)
    assert policy is reloaded.agents[0].policy and policy is gate.current_policy(identity)
    assert policy is not None and policy.allows("db", 2) and not policy.allows("db", 1)
