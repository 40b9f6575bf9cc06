"""The command line: ``wstunnel relay|agent|check|status|keygen|demo|service``."""

from .main import main, main_entry

__all__ = ["main", "main_entry"]
