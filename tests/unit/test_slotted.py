"""Events and records compare, hash and print by value, as the frozen dataclasses
they replaced did: tests, logs and callers that match events rely on it."""

from __future__ import annotations

import pytest

from wstunnel import mux, ws
from wstunnel.mux import wire
from wstunnel.ws.frames import Frame, Opcode


def test_equal_by_type_and_values() -> None:
    assert mux.ChannelReset(3, 1, "gone") == mux.ChannelReset(3, 1, "gone")
    assert mux.ChannelReset(3, 1, "gone") != mux.ChannelReset(3, 1, "other")
    # Same fields, another kind of fact: never equal.
    assert mux.ChannelOpened(3) != mux.ChannelClosed(3)
    assert mux.ChannelOpened(3) != (3,)
    assert [mux.DataReceived(1, b"x")] == [mux.DataReceived(1, b"x")]


def test_hash_follows_equality() -> None:
    assert len({mux.ChannelClosed(1), mux.ChannelClosed(1), mux.ChannelClosed(2)}) == 2
    assert hash(wire.Fin(7)) == hash(wire.Fin(7))
    assert hash(mux.ChannelOpened(7)) != hash(mux.ChannelClosed(7))


def test_repr_names_every_field_in_order() -> None:
    assert repr(wire.OpenFailed(5, 2)) == "OpenFailed(channel_id=5, reason=2, text='')"
    assert repr(ws.CloseReceived(1000, "bye")) == "CloseReceived(code=1000, reason='bye')"


def test_defaults_and_keywords() -> None:
    frame = Frame(Opcode.BINARY, b"x")
    assert (frame.fin, frame.rsv) == (True, 0)
    assert Frame(opcode=Opcode.TEXT, payload=b"", fin=False) == Frame(Opcode.TEXT, b"", False, 0)
    request = ws.RequestReceived("GET", "/")
    assert request.headers == [] and request.subprotocols == []
    assert request.headers is not ws.RequestReceived("GET", "/").headers  # not shared


def test_slots_only() -> None:
    """No per-instance dict: a misspelt field is an error, not a silent new attribute."""
    event = mux.WindowUpdated(1, 10)
    with pytest.raises(AttributeError):
        event.send_capacty = 5  # type: ignore[attr-defined]
