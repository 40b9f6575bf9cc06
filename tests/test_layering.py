"""Imports point one way (CLI -> roles -> I/O -> protocol), and the core is sans-IO."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wstunnel"

# Lowest first. A module may import wstunnel modules of its own rank or lower.
RANKS = {
    "__init__": 0,
    "__version__": 0,
    "errors": 0,
    "addresses": 0,
    "ws": 1,
    "mux": 1,
    "protocol": 2,
    "security": 2,
    "config": 3,
    "net": 5,
    "service": 5,
    "agent": 6,
    "relay": 6,
    "cli": 8,
    "__main__": 9,
}
SANS_IO = ("errors", "ws", "mux", "protocol")
FORBIDDEN_IN_SANS_IO = {
    "trio",
    "socket",
    "ssl",
    "time",
    "yaml",
    "random",
    "asyncio",
    "select",
    "threading",
    "logging",
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _top(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package_parts = ["wstunnel", *path.relative_to(PACKAGE).parts[:-1]]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                if not node.module:
                    found.extend((f"{name}.{alias.name}", node.lineno) for alias in node.names)
                    continue
            else:
                name = node.module or ""
            found.append((name, node.lineno))
    return found


def _internal_top(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "wstunnel" and len(parts) > 1 else None


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    """A module imports only wstunnel modules of its own layer or below."""
    own = _top(path)
    assert own in RANKS, f"{path.name}: add the module {own!r} to RANKS in test_layering.py"
    for name, line in _imports(path):
        target = _internal_top(name)
        if target is None or target == own:
            continue
        assert target in RANKS, f"{path}:{line}: unknown module {target}"
        assert RANKS[target] <= RANKS[own], f"{path}:{line}: {own} must not import {target}"


@pytest.mark.parametrize(
    "path", [p for p in _modules() if _top(p) in SANS_IO], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_sans_io_core_does_no_io(path: Path) -> None:
    """The protocol core imports no I/O, clock, randomness or logging module."""
    own = _top(path)
    for name, line in _imports(path):
        root = name.split(".")[0]
        assert root not in FORBIDDEN_IN_SANS_IO, f"{path}:{line}: sans-IO code imports {name}"
        if own == "mux":
            assert _internal_top(name) != "ws", f"{path}:{line}: mux must not import ws"
        if root not in ("wstunnel", "__future__") and own != "ws":
            assert root in _STDLIB_OK, f"{path}:{line}: sans-IO code imports {name}"
        if own == "ws" and root not in ("wstunnel", "__future__", "h11"):
            assert root in _STDLIB_OK, f"{path}:{line}: ws imports {name}"


_STDLIB_OK = {
    "base64",
    "hashlib",
    "codecs",
    "collections",
    "dataclasses",
    "enum",
    "os",
    "struct",
    "typing",
    "itertools",
    "functools",
    "abc",
    "sys",
    "operator",
    "heapq",
    "math",
    "binascii",
    "re",
    "string",
    "types",
    "__future__",
    "http",
}  # http.HTTPStatus only; http.client would be caught in review


def test_only_cli_calls_trio_run() -> None:
    """Only cli/main.py starts the event loop; everything else is callable from tests."""
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in _modules()
        if "trio.run(" in p.read_text() and p.relative_to(PACKAGE).as_posix() != "cli/main.py"
    ]
    assert offenders == []


def test_no_asyncio() -> None:
    """wstunnel is trio-only."""
    offenders = [
        str(p) for p in _modules() for name, _ in _imports(p) if name.startswith("asyncio")
    ]
    assert offenders == []
