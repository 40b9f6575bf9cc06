"""Mux record encoding and decoding (wstunnel.mux.wire)."""

from __future__ import annotations

import struct

import pytest

from wstunnel.errors import LocalProtocolError, RemoteProtocolError
from wstunnel.mux.wire import (
    DEFAULT_INITIAL_WINDOW,
    DEFAULT_MAX_CHUNK_SIZE,
    MAX_HOST_SIZE,
    MAX_TEXT_SIZE,
    MAX_WINDOW,
    Data,
    ErrorCode,
    Fin,
    GoAway,
    Open,
    OpenFailed,
    OpenOk,
    Record,
    RecordType,
    Reset,
    Settings,
    Window,
    decode_record,
    encode_data_header,
    encode_record,
)

EXAMPLES: list[Record] = [
    Settings(1, 1 << 20, 64 * 1024),
    Open(1, 1, "db.internal", 5432),
    Open(0xFFFF_FFFF, 1, "ünïcode.example", 65535),
    OpenOk(3),
    OpenFailed(5, 3, "no such host"),
    Data(7, b"hello"),
    Window(9, 65536),
    Fin(11),
    Reset(13, 2, ""),
    GoAway(15, 0, "bye"),
]


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_round_trip(record: Record) -> None:
    """Every record type decodes to exactly what was encoded."""
    assert decode_record(encode_record(record)) == record


def test_data_layout_is_type_id_payload() -> None:
    """DATA is 1 type byte, a 4-byte big-endian channel id, then the payload."""
    assert encode_record(Data(0x01020304, b"xy")) == b"\x05\x01\x02\x03\x04xy"
    assert encode_data_header(0x01020304) == b"\x05\x01\x02\x03\x04"


def test_fixed_layouts() -> None:
    """The fixed-size records have the byte layouts docs/PROTOCOL.md shows."""
    assert encode_record(Window(2, 258)) == b"\x06\x00\x00\x00\x02\x00\x00\x01\x02"
    assert encode_record(Fin(2)) == b"\x07\x00\x00\x00\x02"
    assert encode_record(OpenOk(2)) == b"\x03\x00\x00\x00\x02"
    assert encode_record(Open(1, 1, "h", 80)) == b"\x02\x00\x00\x00\x01\x01\x00\x50h"
    assert encode_record(Reset(1, 2, "x")) == b"\x08\x00\x00\x00\x01\x00\x02x"
    assert encode_record(Settings(1, 0x40000, 0x4000)) == (
        b"\x01\x01" b"\x00\x01\x00\x04\x00\x00" b"\x00\x02\x00\x00\x40\x00")


def test_settings_ignores_unknown_keys_and_defaults_missing_ones() -> None:
    """Unknown SETTINGS keys are skipped (extensibility); missing ones take defaults."""
    record = b"\x01\x01" + struct.pack("!HI", 99, 7) + struct.pack("!HI", 1, 1 << 20)
    assert decode_record(record) == Settings(1, 1 << 20, DEFAULT_MAX_CHUNK_SIZE)
    assert decode_record(b"\x01\x01") == Settings(1, DEFAULT_INITIAL_WINDOW,
                                                  DEFAULT_MAX_CHUNK_SIZE)


def test_settings_of_another_version_is_not_parsed_further() -> None:
    """A SETTINGS of an unknown version decodes to its version alone, whatever follows."""
    assert decode_record(b"\x01\x02garbage").version == 2  # type: ignore[union-attr]


BAD_RECORDS = {
    "empty": b"",
    "unknown type": b"\x00\x00\x00\x00\x01",
    "unknown high type": b"\xff",
    "empty DATA": b"\x05\x00\x00\x00\x01",
    "truncated DATA header": b"\x05\x00\x00",
    "short WINDOW": b"\x06\x00\x00\x00\x01\x00\x00\x01",
    "long WINDOW": b"\x06\x00\x00\x00\x01\x00\x00\x00\x01\x00",
    "zero WINDOW": b"\x06\x00\x00\x00\x01\x00\x00\x00\x00",
    "huge WINDOW": b"\x06\x00\x00\x00\x01" + struct.pack("!I", MAX_WINDOW + 1),
    "long FIN": b"\x07\x00\x00\x00\x01\x00",
    "short OPEN_OK": b"\x03\x00\x00\x01",
    "OPEN without host": b"\x02\x00\x00\x00\x01\x01\x00\x50",
    "OPEN port 0": b"\x02\x00\x00\x00\x01\x01\x00\x00h",
    "OPEN host too long": b"\x02\x00\x00\x00\x01\x01\x00\x50" + b"h" * (MAX_HOST_SIZE + 1),
    "OPEN host not UTF-8": b"\x02\x00\x00\x00\x01\x01\x00\x50\xff",
    "RESET truncated": b"\x08\x00\x00\x00\x01\x00",
    "RESET text not UTF-8": b"\x08\x00\x00\x00\x01\x00\x01\xc3",
    "GOAWAY text too long": b"\x09\x00\x00\x00\x00\x00\x00" + b"t" * (MAX_TEXT_SIZE + 1),
    "SETTINGS truncated": b"\x01",
    "SETTINGS odd pair": b"\x01\x01\x00\x01\x00",
    "SETTINGS too many pairs": b"\x01\x01" + struct.pack("!HI", 9, 0) * 65,
}


@pytest.mark.parametrize("record", list(BAD_RECORDS.values()), ids=list(BAD_RECORDS))
def test_malformed_records_are_remote_protocol_errors(record: bytes) -> None:
    """Truncated, oversized, unknown or ill-typed records raise RemoteProtocolError."""
    with pytest.raises(RemoteProtocolError) as info:
        decode_record(record)
    assert info.value.code in {int(code) for code in ErrorCode}
    assert info.value.code != ErrorCode.NO_ERROR


def test_every_type_byte_is_known_or_rejected() -> None:
    """Each of the 256 possible type bytes is a known record type or a clean error."""
    known = {int(t) for t in RecordType}
    for type_byte in range(256):
        record = bytes([type_byte]) + bytes(8)
        if type_byte in known:
            continue
        with pytest.raises(RemoteProtocolError):
            decode_record(record)


@pytest.mark.parametrize("record", [
    Open(1, 1, "", 80),
    Open(1, 1, "h" * (MAX_HOST_SIZE + 1), 80),
    Open(1, 1, "h", 0),
    Open(1, 1, "h", 65536),
    Open(1 << 32, 1, "h", 80),
    Window(1, 0),
    Window(1, MAX_WINDOW + 1),
    Reset(1, 1 << 16),
    Data(1, b""),
    Fin(-1),
    Settings(256),
], ids=repr)
def test_encoding_bad_fields_is_a_local_error(record: Record) -> None:
    """Encoding our own record with an out-of-range field is a LocalProtocolError."""
    with pytest.raises(LocalProtocolError):
        encode_record(record)


def test_long_text_is_cut_at_a_character_boundary() -> None:
    """Diagnostic text longer than MAX_TEXT_SIZE is cut without splitting a character."""
    record = encode_record(Reset(1, 1, "é" * MAX_TEXT_SIZE))
    decoded = decode_record(record)
    assert isinstance(decoded, Reset)
    assert decoded.text == "é" * (MAX_TEXT_SIZE // 2)
