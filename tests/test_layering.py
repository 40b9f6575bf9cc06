"""Imports point down the layers, nothing loops, and the protocol core is sans-IO.

The checks read the real import graph, built here from the source with ``ast``:
every import in a file counts (inside ``if TYPE_CHECKING:`` and inside functions
too), relative imports are made absolute, and ``from wstunnel import agent`` or
``from .. import agent`` is an import of the module ``wstunnel.agent``. A *room*
is a top-level module or folder of the package (``ws``, ``net``, ``errors``...);
``wstunnel/__init__.py`` is the room ``__init__``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "wstunnel"

# Rooms by layer, lowest first; the tree at the top of docs/ARCHITECTURE.md groups
# them the same way (checked below). A module imports its own room or rooms of lower
# layers; rooms sharing a layer are peers and never import each other (agent and
# relay; ws, mux and security; ...).
LAYERS: tuple[tuple[str, ...], ...] = (
    # The version string only: every import of a submodule runs this file first.
    ("__init__",),
    ("errors", "addresses", "slotted", "pieces"),
    ("ws", "mux", "security"),
    # records in a byte stream (the HTTP transports' carrier, uses ws events); the
    # resumption log (numbered records, acknowledgements, replay)
    ("framing", "replay"),
    ("protocol", "config"),
    ("net",),
    ("service",),
    ("agent", "relay"),
    ("cli",),
    ("__main__",),
)

# Bytes in, events and bytes out: no I/O, clock, randomness, threads or logging.
SANS_IO_ROOMS = frozenset({"__init__", "errors", "addresses", "slotted", "pieces", "ws", "mux",
                           "framing", "replay", "protocol"})
NEVER_REACHABLE_FROM_SANS_IO = frozenset({
    "trio", "socket", "_socket", "ssl", "_ssl", "time", "yaml", "logging", "random",
    "select", "threading", "asyncio",
})
# What sans-IO code may import directly besides its own layers: pure stdlib modules.
SANS_IO_STDLIB = frozenset({
    "__future__", "abc", "base64", "binascii", "codecs", "collections", "dataclasses",
    "enum", "functools", "hashlib", "heapq", "ipaddress", "itertools", "math", "operator",
    "re", "string", "struct", "types", "typing",
    "os",  # os.urandom only: the default masking-key and handshake-key source (injectable)
})
# ws/ parses the HTTP/1.1 upgrade with h11: a sans-IO library itself (it is the
# model STYLE.md names), and test_sans_io_never_reaches_io proves it loads no I/O.
SANS_IO_THIRD_PARTY = {"ws": frozenset({"h11"})}

# trio.lowlevel is for what trio's high-level streams cannot do. Path: why.
TRIO_LOWLEVEL_ALLOWED = {
    "net/pump.py": "waits on its own epoll descriptor (wait_readable): no high-level API",
    "net/plain_stream.py": "ws:// on a bare socket instead of trio.SocketStream (faster churn)",
    "net/tls_stream.py": "wss:// with OpenSSL on the socket: waits for readiness itself",
    "agent/forwards.py": "accepts on the stdlib listener once per wake-up (less CPU per conn)",
    "net/accepting.py": "the same accept loop, shared with the relay's reverse listeners",
    "agent/stdio.py": "stdin/stdout as streams (FdStream): trio has no high-level API for fds",
}
# Process-wide setup belongs to the entry point: only cli/ starts the event loop,
# configures logging or installs signal handlers.
PROCESS_SETUP = frozenset({
    "trio.run", "signal.signal", "signal.set_wakeup_fd", "signal.siginterrupt",
    "trio.open_signal_receiver", "logging.basicConfig", "logging.captureWarnings",
    "logging.config", "wstunnel.service.logs.setup_logging",
})
LOGGER_SETUP_METHODS = frozenset({"addHandler", "removeHandler", "setLevel"})
# setup_logging lives with the log formats and builds the handler; cli/ calls it
# (any other caller is caught through PROCESS_SETUP).
LOGGING_SETUP_MODULE = "service/logs.py"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name; a C extension by its ``.pyi`` stub."""
    found = {_module_name(p): p for p in PACKAGE.rglob("*.pyi")}
    found.update({_module_name(p): p for p in PACKAGE.rglob("*.py")})
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _rel(module: str) -> str:
    return _modules()[module].relative_to(PACKAGE).as_posix()


def _resolve(module: str, level: int, name: str | None) -> str:
    """The absolute dotted name of ``from <level dots><name>`` written in ``module``."""
    if not level:
        return name or ""
    package = module.split(".")
    if _modules()[module].name != "__init__.py":
        package.pop()
    base = package[: len(package) - level + 1]
    return ".".join(base + ([name] if name else []))


def _imported(module: str) -> Iterator[tuple[str, int, str | None]]:
    """(dotted name, line, local alias or None) of each name the module imports.

    ``import a.b`` gives ``a.b``; ``from a import b`` gives ``a.b`` whether ``b`` is a
    module or a name in ``a``: the graph decides which (``_target``).
    """
    tree = ast.parse(_modules()[module].read_text(), filename=str(_modules()[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if alias.asname or top == alias.name:
                    yield alias.name, node.lineno, alias.asname or top
                else:  # `import a.b` loads a.b and binds `a`
                    yield alias.name, node.lineno, None
                    yield top, node.lineno, top
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module)
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno, alias.asname or alias.name


def _target(dotted: str) -> str | None:
    """The wstunnel module an imported dotted name loads (its longest module prefix)."""
    parts = dotted.split(".")
    if parts[0] != "wstunnel":
        return None
    while ".".join(parts) not in _modules():
        parts.pop()
    return ".".join(parts)


@cache
def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported wstunnel module: first line}, self-imports left out."""
    graph: dict[str, dict[str, int]] = {}
    for module in _modules():
        edges = graph.setdefault(module, {})
        for dotted, line, _ in _imported(module):
            target = _target(dotted)
            if target is not None and target != module:
                edges.setdefault(target, line)
    return graph


def _where(module: str, target: str) -> str:
    return f"{_rel(module)}:{_graph()[module][target]}: {module} imports {target}"


def _layer(room: str) -> int:
    return next(i for i, rooms in enumerate(LAYERS) if room in rooms)


def test_every_room_has_a_layer() -> None:
    """A new folder or top-level module is placed in LAYERS before anything imports it."""
    rooms = {_room(m) for m in _modules()}
    listed = {room for layer in LAYERS for room in layer}
    assert rooms - listed == set(), "add these rooms to LAYERS in tests/test_layering.py"
    assert listed - rooms == set(), "these rooms in LAYERS no longer exist: remove them"


def test_imports_point_down() -> None:
    """Every import between rooms goes to a lower layer; peers never import each other."""
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            own, other = _room(module), _room(target)
            if own != other and _layer(other) >= _layer(own):
                where = "a peer of" if _layer(other) == _layer(own) else "above"
                wrong.append(f"{_where(module, target)} ({other} is {where} {own})")
    assert wrong == [], "imports that do not point down:\n" + "\n".join(wrong)


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in _graph()[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_agent_and_relay_never_import_each_other() -> None:
    """The two roles share only lower layers, directly or through any chain of imports."""
    for role, other in (("agent", "relay"), ("relay", "agent")):
        modules = [m for m in _modules() if _room(m) == role]
        reached = sorted(t for m in modules for t in _reachable(m) if _room(t) == other)
        assert reached == [], f"{role} reaches {other} (see test_imports_point_down)"


def _cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in _graph()[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = [stack.pop()]
            while component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(_graph()):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    """No module reaches itself through imports, type-only ones included: a loop there
    means two modules know each other, whatever the order Python happens to load them in."""
    described = [
        f"{len(cycle)} modules: {', '.join(cycle)}; the shortest loop:\n  "
        + "\n  ".join(_where(a, b) for a, b in _shortest_loop(cycle))
        for cycle in _cycles()
    ]
    assert described == [], "import cycles:\n" + "\n".join(described)


def _shortest_loop(component: list[str]) -> list[tuple[str, str]]:
    """The import edges of a shortest loop through the component's first module."""
    start = component[0]
    came_from: dict[str, str] = {}
    todo = [start]
    while start not in came_from:
        module = todo.pop(0)
        for target in _graph()[module]:
            if target in component and target not in came_from:
                came_from[target] = module
                todo.append(target)
    edges = [(came_from[start], start)]
    while edges[0][0] != start:
        edges.insert(0, (came_from[edges[0][0]], edges[0][0]))
    return edges


_PROBE = """
import json, sys
sys.path[:0] = {paths!r}
forbidden = {forbidden!r}
# The interpreter loads some of these at start-up (time): forget them so that an
# import by wstunnel shows up again.
for name in [m for m in sys.modules if m.split(".")[0] in forbidden]:
    del sys.modules[name]
for name in {modules!r}:
    __import__(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in forbidden)))
"""


def test_sans_io_never_reaches_io() -> None:
    """Importing every sans-IO module, and all they import (h11 too), loads no I/O, clock,
    randomness, thread, logging or trio module. Run in a fresh interpreter."""
    modules = sorted(
        m for m, path in _modules().items() if _room(m) in SANS_IO_ROOMS and path.suffix == ".py"
    )
    # -S: no site hooks (.pth files) importing things of their own; the path is ours.
    code = _PROBE.format(paths=[str(ROOT), *sys.path], forbidden=set(NEVER_REACHABLE_FROM_SANS_IO),
                         modules=modules)
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [], f"loaded by importing {', '.join(modules)}"


def test_sans_io_imports_only_pure_modules() -> None:
    """Sans-IO code imports only sans-IO wstunnel modules, a short list of pure stdlib
    modules and, in ws/, h11: type-only imports too, which the probe above cannot see."""
    wrong = []
    for module in (m for m in _modules() if _room(m) in SANS_IO_ROOMS):
        allowed = SANS_IO_STDLIB | SANS_IO_THIRD_PARTY.get(_room(module), frozenset())
        for dotted, line, _ in _imported(module):
            target = _target(dotted)
            if target is None and dotted.split(".")[0] not in allowed:
                wrong.append(f"{_rel(module)}:{line}: imports {dotted}")
            elif target is not None and _room(target) not in SANS_IO_ROOMS:
                wrong.append(f"{_rel(module)}:{line}: imports {target}")
    assert wrong == [], "sans-IO code imports:\n" + "\n".join(wrong)


def _references(module: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import and of every name or attribute chain that
    starts with an imported name: ``from trio import run`` and a later ``run(...)`` are
    both ``trio.run``. A method call named in LOGGER_SETUP_METHODS counts as
    ``logging.Logger.<method>``, whatever object it is called on."""
    aliases: dict[str, str] = {}
    for dotted, line, local in _imported(module):
        yield line, dotted
        if local is not None:
            aliases[local] = dotted
    for node in ast.walk(ast.parse(_modules()[module].read_text())):
        if not isinstance(node, (ast.Attribute, ast.Name)):
            continue
        chain: list[str] = []
        inner: ast.expr = node
        while isinstance(inner, ast.Attribute):
            chain.insert(0, inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name) and inner.id in aliases:
            yield node.lineno, ".".join([aliases[inner.id], *chain])
        elif chain and chain[-1] in LOGGER_SETUP_METHODS:
            yield node.lineno, f"logging.Logger.{chain[-1]}"


def _uses(names: frozenset[str]) -> dict[str, list[tuple[int, str]]]:
    """Module path -> (line, dotted name) wherever it uses one of ``names`` or a name
    inside one."""
    found: dict[str, list[tuple[int, str]]] = {}
    for module in _modules():
        for line, dotted in _references(module):
            if any(dotted == n or dotted.startswith(n + ".") for n in names):
                found.setdefault(_rel(module), []).append((line, dotted))
    return found


def test_trio_lowlevel_only_where_listed() -> None:
    """trio.lowlevel appears only in the files of TRIO_LOWLEVEL_ALLOWED, each with a reason;
    a file that stops using it leaves the list."""
    users = set(_uses(frozenset({"trio.lowlevel"})))
    assert users - set(TRIO_LOWLEVEL_ALLOWED) == set(), "add a reason or use trio's streams"
    assert set(TRIO_LOWLEVEL_ALLOWED) - users == set(), "no longer used: drop from the list"


def test_only_cli_sets_up_the_process() -> None:
    """Only cli/ calls trio.run, configures logging or installs signal handlers, so every
    other module can be driven from a test or another program."""
    setup = PROCESS_SETUP | {f"logging.Logger.{m}" for m in LOGGER_SETUP_METHODS}
    wrong = {}
    for path, places in _uses(setup).items():
        if path == LOGGING_SETUP_MODULE:
            places = [(line, name) for line, name in places if not name.startswith("logging.")]
        if places and not path.startswith("cli/"):
            wrong[path] = places
    assert wrong == {}


def test_no_asyncio() -> None:
    """wstunnel is trio-only."""
    assert _uses(frozenset({"asyncio"})) == {}


def _documented_tree() -> tuple[set[str], list[set[str]]]:
    """The tree at the top of docs/ARCHITECTURE.md: the file paths it names (relative to
    wstunnel/), and its rooms by layer (the ``# N`` lines; before the first one, layer 0)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("```\nwstunnel/\n", 1)[1].split("```", 1)[0]
    paths: set[str] = set()
    layers: list[set[str]] = [set()]
    folder = ""
    for line in filter(str.strip, block.splitlines()):
        name = line.split()[0]
        if name == "#":
            layers.append(set())
        elif line.startswith("    "):
            paths.add(folder + name)
        else:
            folder = name if name.endswith("/") else ""
            if not folder:
                paths.add(name)
            layers[-1].add(name.removesuffix("/").removesuffix(".py"))
    return paths, layers


def test_the_architecture_tree_is_the_package() -> None:
    """docs/ARCHITECTURE.md opens with the package tree, one line per module, grouped by
    layer: it names every module and no module that is gone, in the layers used here."""
    on_disk = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*")
               if p.suffix in (".py", ".c")}
    documented, layers = _documented_tree()
    assert sorted(on_disk - documented) == [], "add a line for each to docs/ARCHITECTURE.md"
    assert sorted(documented - on_disk) == [], "gone: remove them from docs/ARCHITECTURE.md"
    assert layers == [set(rooms) for rooms in LAYERS], "the tree's `# N` groups differ from LAYERS"


def test_the_graph_sees_every_import() -> None:
    """No module is imported by a computed name, which the graph above could not see."""
    assert _uses(frozenset({"importlib.import_module", "importlib.__import__"})) == {}
    for module in _modules():
        tree = ast.parse(_modules()[module].read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "__import__"]
        assert calls == [], f"{_rel(module)}: __import__"
