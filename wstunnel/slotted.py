"""``Slotted``: the base of the protocol's events and records.

Why not ``@dataclass(frozen=True, slots=True)``, which they were: building such
a class at import runs several generated methods through ``exec`` and, for the
slots, builds the class twice, about 0.4 ms each on the test VM. The 31 of them
in ws/ and mux/ were some 15-20 ms of ``agent --stdio``'s start-up, which every
ssh through ``ProxyCommand`` waits for (docs/PERFORMANCE.md, "--stdio
start-up"). And the frozen ``__init__`` sets each field through
``object.__setattr__``: 0.6 us per event against 0.15 us for a plain one, paid
once or twice per record on the data path.

A subclass names its fields in ``__slots__`` (the order of ``repr`` and
equality) and writes a plain ``__init__`` that declares them ``Final``: they
are read-only by contract, which mypy enforces and nothing pays for at run
time. Equality and hashing are by type and field values, as a frozen
dataclass's.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Slotted"]


class Slotted:
    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__qualname__}({fields})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Slotted)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))
