"""In-memory wiring for mux Sessions: no sockets, no trio."""

from __future__ import annotations

from typing import Any, TypeVar

from wstunnel.mux import DataReceived, Event, Role, Session

T = TypeVar("T")


def session_pair(**options: Any) -> tuple[Session, Session]:
    """Return (agent, relay) Sessions built with the same options."""
    return Session(Role.AGENT, **options), Session(Role.RELAY, **options)


def transfer(source: Session, sink: Session, limit: int | None = None) -> int:
    """Move up to ``limit`` records from ``source`` into ``sink``; return the count."""
    moved = 0
    while limit is None or moved < limit:
        record = source.next_record()
        if record is None:
            break
        sink.receive_record(record)
        moved += 1
    return moved


def pump(a: Session, b: Session, max_rounds: int = 100_000) -> int:
    """Move records both ways until neither side has anything to send."""
    total = 0
    for _ in range(max_rounds):
        moved = transfer(a, b) + transfer(b, a)
        total += moved
        if not moved:
            return total
    raise AssertionError("pump did not settle")


def connected_pair(**options: Any) -> tuple[Session, Session]:
    """A pair that has exchanged SETTINGS, with the SettingsReceived events drained."""
    agent, relay = session_pair(**options)
    pump(agent, relay)
    agent.events_received()
    relay.events_received()
    return agent, relay


def events_of(session: Session, kind: type[T]) -> list[T]:
    """Drain ``session``'s events and return those of type ``kind``."""
    return [event for event in session.events_received() if isinstance(event, kind)]


def open_accepted(opener: Session, acceptor: Session, early_data: bytes = b"") -> int:
    """Open a channel from ``opener``, accept it at ``acceptor``, drain both; return the id."""
    channel_id = opener.open_channel("target.invalid", 80, early_data=early_data)
    pump(opener, acceptor)
    acceptor.accept_channel(channel_id)
    pump(opener, acceptor)
    opener.events_received()
    acceptor.events_received()
    return channel_id


def received_bytes(events: list[Event], channel_id: int) -> bytes:
    """Concatenate the DataReceived payloads for ``channel_id``."""
    return b"".join(e.data for e in events
                    if isinstance(e, DataReceived) and e.channel_id == channel_id)
