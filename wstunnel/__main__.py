"""``python -m wstunnel``: the same as the ``wstunnel`` console script."""

from __future__ import annotations

from .cli import main_entry

if __name__ == "__main__":
    main_entry()
