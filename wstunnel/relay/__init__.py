"""The relay: accepts agents' sessions and opens the real connections for them."""

from .relay import Relay
from .run import run_relay

__all__ = ["Relay", "run_relay"]
