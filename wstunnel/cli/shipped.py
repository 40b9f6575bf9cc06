"""``wstunnel service``: print the systemd units and example configs that ship with wstunnel.

Someone who installed wstunnel with pip has no checkout to copy ``systemd/`` and
``configs/`` from, so the command prints them. There is one copy of each file,
at the top of the repository where the docs and tests use it; the build copies
both folders into the package as ``wstunnel/share/`` (setup.py). Run from a
checkout (an editable install, ``python -m wstunnel``) there is no ``share/``,
and the repository's own folders are read instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Final, TextIO

__all__ = ["CONFIGS", "UNITS", "add_service_actions", "print_shipped", "shipped_file"]

UNITS: Final = {
    "relay": "wstunnel-relay.service",
    "relay-socket": "wstunnel-relay.socket",
    "agent": "wstunnel-agent@.service",
}
CONFIGS: Final = {
    "relay": "relay.yaml",
    "agent": "agent.yaml",
    "agent-token": "example-agent.token",
    "nginx": "nginx-relay.conf",
    "haproxy": "haproxy-relay.cfg",
}
_FOLDERS: Final = {"systemd": UNITS, "configs": CONFIGS}
_PACKAGE: Final = Path(__file__).resolve().parents[1]
_PLACES: Final = (_PACKAGE / "share", _PACKAGE.parent)  # installed wheel, then checkout


def add_service_actions(service: argparse.ArgumentParser) -> None:
    """``print-unit NAME`` and ``print-config NAME`` under ``wstunnel service``."""
    actions = service.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, folder, what in (("print-unit", "systemd", "a systemd unit"),
                                 ("print-config", "configs", "an example config")):
        names = _FOLDERS[folder]
        parser = actions.add_parser(
            action, help=f"print {what} to stdout",
            description=f"Print {what}, NAME, to stdout exactly as shipped.")
        listed = ", ".join(f"{name} ({file})" for name, file in names.items())
        parser.add_argument("name", choices=list(names), metavar="NAME", help=listed)
        parser.set_defaults(folder=folder)


def shipped_file(folder: str, name: str) -> Path:
    """The file ``name`` names in ``folder`` (``systemd`` or ``configs``).

    Raises:
        FileNotFoundError: this copy of wstunnel was installed without them.
    """
    file = _FOLDERS[folder][name]
    for place in _PLACES:
        path = place / folder / file
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{file} is not installed with this wstunnel (looked in "
        f"{' and '.join(str(place / folder) for place in _PLACES)}): install wstunnel from a "
        "wheel or sdist made by `python -m build`, or copy it from the source's "
        f"{folder}/ folder")


def print_shipped(folder: str, name: str, out: TextIO, err: TextIO) -> int:
    """Write the file to ``out`` exactly as shipped; 0, or 1 with a line on ``err``."""
    try:
        text = shipped_file(folder, name).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"wstunnel: error: {exc}", file=err)
        return 1
    out.write(text)
    return 0
