"""SessionGuard refuses an OPEN before the multiplexer would, naming the limit."""

from __future__ import annotations

from dataclasses import replace

from wstunnel.addresses import HostPort
from wstunnel.config import RelayConfig
from wstunnel.relay.guard import Identity, SessionGuard
from wstunnel.security.policy import Policy

CONFIG = RelayConfig(listen=HostPort("127.0.0.1", 0), no_auth=True)


def _guard(config: RelayConfig) -> SessionGuard:
    return SessionGuard(Identity("laptop", Policy()), config)


def test_the_default_relay_admits_10240_channels_per_session() -> None:
    """With the defaults the 10,240th channel is admitted and the next one is refused
    by max_channels (the 256 MiB budget covers them at the 16 KiB opening window)."""
    guard = _guard(CONFIG)
    assert guard.admit(10_239) is None
    assert guard.admit(10_240) == "max_channels 10240 reached"


def test_past_three_quarters_of_the_budget_in_opening_windows_the_budget_refuses() -> None:
    """max_channels above what max_buffered_size carries at 16 KiB per channel (3/4 of
    it): the refusal names max_buffered_size, at the multiplexer's own limit."""
    guard = _guard(replace(CONFIG, max_channels=20_000))
    assert guard.admit(12_287) is None
    assert guard.admit(12_288) == ("max_buffered_size 268435456 reached (12288 channels "
                                   "x the 16384-byte window each opens with)")
