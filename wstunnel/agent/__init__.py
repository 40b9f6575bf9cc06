"""The agent: local listeners whose connections ride one session to the relay."""

from .agent import Agent, run_agent

__all__ = ["Agent", "run_agent"]
