"""The agent: local listeners whose connections ride one session to the relay."""

from .agent import Agent
from .run import run_agent

__all__ = ["Agent", "run_agent"]
