"""Line-aware YAML loading for configuration files.

``yaml.safe_load`` forgets where each value came from, and a config error is
only useful if it names the line. So we let PyYAML's SafeLoader *compose* the
document into nodes (which carry ``start_mark``), then build plain Python
values ourselves, recording the 1-based line of every key path
(``forwards[0].target``) as we go. Scalars are still constructed by the
SafeLoader, so types match ``safe_load`` (with one deliberate exception:
YAML 1.1 "sexagesimal" numbers such as ``10:22``, which nobody writing a
host:port means, stay strings). Duplicate keys, which ``safe_load`` silently
collapses, are errors here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..errors import ConfigError

__all__ = ["Document", "join_index", "join_key", "load_document", "parent_path",
           "parse_document"]


def join_key(path: str, key: str) -> str:
    """Key path of mapping entry ``key`` under ``path``."""
    return f"{path}.{key}" if path else key


def join_index(path: str, index: int) -> str:
    """Key path of sequence item ``index`` (0-based) under ``path``."""
    return f"{path}[{index}]"


@dataclass(frozen=True)
class Document:
    """A loaded file: plain values plus the line each key path starts on."""

    source: str
    data: object
    lines: dict[str, int] = field(default_factory=dict)

    def line_of(self, path: str) -> int | None:
        """Line of ``path``, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = parent_path(path)
        return self.lines.get("")

    def error(self, path: str, message: str) -> ConfigError:
        """A ``ConfigError`` for ``path`` naming this file and the line."""
        return ConfigError(message, source=self.source, line=self.line_of(path),
                           key_path=path or None)

    # The schema asks these instead of reading ``lines`` itself, so that a
    # document merged from a file and command-line flags (config/flags.py)
    # can answer for the values the flags gave.

    def missing(self, path: str, what: str) -> ConfigError:
        """The error for a required key absent at ``path`` inside ``what``."""
        return self.error(path, f"required key is missing from {what}")

    def given(self, path: str) -> bool:
        """Whether ``path`` was written down rather than left to its default."""
        return path in self.lines

    def name(self, path: str) -> str:
        """How a message about another entry refers to the one at ``path``."""
        return path

    def in_file(self, path: str) -> bool:
        """Whether ``path``'s value came from a file, so a relative file name in it
        is relative to that file's directory."""
        return not self.source.startswith("<")


_MERGE_TAG: Final = "tag:yaml.org,2002:merge"


def parent_path(path: str) -> str:
    """Key path of the mapping or list holding ``path`` ("" for a top-level key)."""
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else ""


def load_document(path: str | Path) -> Document:
    """Read and parse a YAML file.

    Raises:
        ConfigError: unreadable file, YAML syntax error, empty document,
            duplicate or non-string keys.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read the file: {reason}", source=source) from exc
    return parse_document(text, source)


def parse_document(text: str, source: str) -> Document:
    """Parse YAML ``text``; ``source`` names it in error messages."""
    import yaml  # type: ignore[import-untyped, unused-ignore]  # (slow; only with a file)

    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:  # control characters are rejected up front
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError(f"not valid YAML: character U+{char:04X} is not allowed",
                          source=source, line=line) from exc
    try:
        aliases = _note_aliases(loader)
        node = loader.get_single_node()
        if node is None:
            raise ConfigError("the file is empty; expected a mapping of settings",
                              source=source, line=1)
        builder = _Builder(loader, source, aliases)
        data = builder.build(node, "")
        return Document(source, data, builder.lines)
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, source) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=source) from exc
    except RecursionError as exc:  # (PyYAML composes, and we build, recursively)
        raise ConfigError("the YAML is nested too deeply; a config needs a few levels, "
                          "check the brackets", source=source) from exc
    finally:
        loader.dispose()


def _note_aliases(loader: Any) -> dict[tuple[int, object], int]:
    """Where each alias was written, by (id of its list node, position): PyYAML gives an
    alias the anchored node itself, which only knows where the anchor is."""
    import yaml  # type: ignore[import-untyped, unused-ignore]

    lines: dict[tuple[int, object], int] = {}
    compose = loader.compose_node

    def compose_node(parent: Any, index: object) -> Any:
        if loader.check_event(yaml.AliasEvent):
            lines[(id(parent), index)] = loader.peek_event().start_mark.line + 1
        return compose(parent, index)

    loader.compose_node = compose_node
    return lines


def _syntax_error(exc: Any, source: str) -> ConfigError:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else None
    problem = exc.problem or "syntax error"
    if exc.context:
        problem = f"{exc.context}, {problem}"
    if "alias" in problem or "anchor" in problem:
        problem += ' (values starting with * or & need quotes, e.g. "*.example.com")'
    return ConfigError(f"YAML syntax error: {problem}", source=source, line=line)


class _Builder:
    """Turns composed nodes into plain values, remembering lines per key path."""

    def __init__(self, loader: Any, source: str, aliases: dict[tuple[int, object], int]) -> None:
        self._loader = loader
        self._source = source
        self._aliases = aliases  # (list node id, index) -> line of an alias item
        self._active: set[int] = set()  # node ids on the current path: alias loops
        self._merged: dict[int, int] = {}  # mapping node id -> how many pairs "<<" merged in
        self.lines: dict[str, int] = {}

    def build(self, node: Any, path: str) -> object:
        import yaml  # type: ignore[import-untyped, unused-ignore]

        self.lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in self._active:
            raise self._error(node, path, "a YAML alias refers to itself")
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return [self._item(node, i, item, path) for i, item in enumerate(node.value)]
            return self._scalar(node)
        finally:
            self._active.discard(id(node))

    def _item(self, node: Any, index: int, item: Any, path: str) -> object:
        child = join_index(path, index)
        alias_line = self._aliases.get((id(node), index))
        if alias_line is not None:
            self.lines[child] = alias_line
        return self.build(item, child)

    def _mapping(self, node: Any, path: str) -> dict[str, object]:
        import yaml  # type: ignore[import-untyped, unused-ignore]

        merged = self._flatten(node)
        result: dict[str, object] = {}
        written: set[str] = set()  # keys of this mapping's own (a merged one may be overridden)
        for index, (key_node, value_node) in enumerate(node.value):
            key = self._scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise self._error(key_node, path, "keys must be plain names (strings)")
            child = join_key(path, key)
            if key in written:
                first = self.lines.get(child)
                raise self._error(key_node, child, f"duplicate key (first set on line {first})")
            if index >= merged:
                written.add(key)
            self.lines[child] = key_node.start_mark.line + 1
            result[key] = self.build(value_node, child)
        return result

    def _flatten(self, node: Any) -> int:
        """Resolve "<<" merge keys like safe_load, once per node (an alias meets it
        again); the number of merged pairs, which come first and may be overridden."""
        if id(node) not in self._merged:
            own = sum(key.tag != _MERGE_TAG for key, _ in node.value)
            self._loader.flatten_mapping(node)
            self._merged[id(node)] = len(node.value) - own
        return self._merged[id(node)]

    def _scalar(self, node: Any) -> object:
        value = self._loader.construct_object(node, deep=True)
        if isinstance(value, (int, float)) and node.style is None and ":" in node.value:
            return node.value  # YAML 1.1 base-60 number: the user meant text
        return value

    def _error(self, node: Any, path: str, message: str) -> ConfigError:
        return ConfigError(message, source=self._source, line=node.start_mark.line + 1,
                           key_path=path or None)
