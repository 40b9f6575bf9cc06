"""Mux records: encode and decode (the byte layouts live in docs/PROTOCOL.md).

One record is one binary WebSocket message, so records carry no length prefix:
the message boundary is the record boundary.  Every record starts with a
one-byte type; all but GOAWAY and SETTINGS follow it with a 4-byte channel id.
Fixed parts come first and any variable part (host, text, payload) runs to
the end of the record, so a DATA header is one ``struct.pack`` of 5 bytes.

Decoding is strict: a wrong length, an unknown type, invalid UTF-8 or an
out-of-range value raises :class:`RemoteProtocolError` with the mux error code
to put in the GOAWAY.  Encoding our own records with bad arguments raises
:class:`LocalProtocolError`.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from ..errors import LocalProtocolError, RemoteProtocolError
from ..slotted import Slotted

__all__ = [
    "VERSION",
    "PATH_KIND_PORT",
    "DEFAULT_INITIAL_WINDOW",
    "MIN_WINDOW",
    "MAX_WINDOW",
    "DEFAULT_MAX_CHUNK_SIZE",
    "DEFAULT_SOLO_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_CHANNEL_ID",
    "MAX_HOST_SIZE",
    "MAX_TEXT_SIZE",
    "DATA_HEADER_SIZE",
    "RecordType",
    "ChannelKind",
    "OpenFailure",
    "ResetCode",
    "ErrorCode",
    "SettingId",
    "Settings",
    "Open",
    "OpenOk",
    "OpenFailed",
    "Data",
    "Window",
    "Fin",
    "Reset",
    "GoAway",
    "Record",
    "encode_record",
    "encode_data_header",
    "decode_record",
    "check_peer_settings",
]

VERSION: Final = 1
#: Receive window per channel and direction, granted implicitly by OPEN.
DEFAULT_INITIAL_WINDOW: Final = 256 * 1024
#: The smallest window anyone may announce -- and so the credit a sender
#: assumes for its channels until the peer's SETTINGS arrive.
MIN_WINDOW: Final = 16 * 1024
MAX_WINDOW: Final = 16 * 1024 * 1024
#: Largest DATA payload a side accepts (and cuts), announced in SETTINGS.
DEFAULT_MAX_CHUNK_SIZE: Final = 16 * 1024
#: Largest DATA a channel cuts while no other channel has data ready (when the
#: peer accepts it, and within the I/O layer's write size): on a fast link one
#: record per write instead of 64 (docs/PERFORMANCE.md). TunnelProtocol caps
#: it to what the WebSocket message limit leaves room for (1 MiB by default).
DEFAULT_SOLO_CHUNK_SIZE: Final = 1024 * 1024
#: The smallest chunk limit anyone may announce: what a sender assumes before
#: the peer's SETTINGS arrive.
MIN_CHUNK_SIZE: Final = 1024
#: The largest: the WebSocket message limit must then exceed it by the header.
MAX_CHUNK_SIZE: Final = 1 << 20
MAX_CHANNEL_ID: Final = (1 << 32) - 1
MAX_HOST_SIZE: Final = 255
MAX_TEXT_SIZE: Final = 512
DATA_HEADER_SIZE: Final = 5


class RecordType(enum.IntEnum):
    """First byte of every record."""

    SETTINGS = 0x01
    OPEN = 0x02
    OPEN_OK = 0x03
    OPEN_FAILED = 0x04
    DATA = 0x05
    WINDOW = 0x06
    FIN = 0x07
    RESET = 0x08
    GOAWAY = 0x09


class ChannelKind(enum.IntEnum):
    """What an OPEN asks the peer to do (PROTOCOL.md section 4.1).

    A connect kind from the opener's side; from the relay, for a connection
    accepted on a listener an agent asked for, the kind and address of that
    listener. The path kinds carry a path as the host and port 1 (ignored).
    """

    TCP = 1
    UDP = 2  # one UDP flow; its stream is length-prefixed datagrams (mux/datagram.py)
    UNIX = 3
    TCP_LISTEN = 4
    UNIX_LISTEN = 5
    UDP_LISTEN = 6  # the relay binds a UDP socket for the agent (-R udp:)


#: The port a path kind's OPEN carries (any non-zero value: older peers refuse port 0).
PATH_KIND_PORT: Final = 1


class OpenFailure(enum.IntEnum):
    """Why an OPEN was refused (OPEN_FAILED reason)."""

    REFUSED = 1
    UNREACHABLE = 2
    DNS_FAILURE = 3
    TIMEOUT = 4
    FORBIDDEN = 5
    LIMIT_REACHED = 6
    GOING_AWAY = 7
    UNSUPPORTED_KIND = 8
    INTERNAL_ERROR = 9


class ResetCode(enum.IntEnum):
    """Why a channel was aborted (RESET code)."""

    CANCELLED = 1
    CONNECTION_RESET = 2
    SESSION_CLOSING = 3
    PROTOCOL_ERROR = 4
    INTERNAL_ERROR = 5
    TIMEOUT = 6


class ErrorCode(enum.IntEnum):
    """Session-level codes carried by GOAWAY (and by our ProtocolErrors)."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    FLOW_CONTROL_ERROR = 2
    RECORD_SIZE_ERROR = 3
    UNSUPPORTED_VERSION = 4
    INTERNAL_ERROR = 5


class SettingId(enum.IntEnum):
    """Keys of the SETTINGS key/value list; unknown keys are ignored."""

    INITIAL_WINDOW = 1
    MAX_CHUNK_SIZE = 2


class Settings(Slotted):
    __slots__ = ("version", "initial_window", "max_chunk_size")

    def __init__(
        self, version: int = VERSION, initial_window: int = DEFAULT_INITIAL_WINDOW,
        max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE
    ) -> None:
        self.version: Final = version
        self.initial_window: Final = initial_window
        self.max_chunk_size: Final = max_chunk_size


class Open(Slotted):
    __slots__ = ("channel_id", "kind", "host", "port")

    def __init__(self, channel_id: int, kind: int, host: str, port: int) -> None:
        self.channel_id: Final = channel_id
        self.kind: Final = kind
        self.host: Final = host
        self.port: Final = port


class OpenOk(Slotted):
    __slots__ = ("channel_id",)

    def __init__(self, channel_id: int) -> None:
        self.channel_id: Final = channel_id


class OpenFailed(Slotted):
    __slots__ = ("channel_id", "reason", "text")

    def __init__(self, channel_id: int, reason: int, text: str = "") -> None:
        self.channel_id: Final = channel_id
        self.reason: Final = reason
        self.text: Final = text


class Data(Slotted):
    __slots__ = ("channel_id", "payload")

    def __init__(self, channel_id: int, payload: bytes) -> None:
        self.channel_id: Final = channel_id
        self.payload: Final = payload


class Window(Slotted):
    __slots__ = ("channel_id", "increment")

    def __init__(self, channel_id: int, increment: int) -> None:
        self.channel_id: Final = channel_id
        self.increment: Final = increment


class Fin(Slotted):
    __slots__ = ("channel_id",)

    def __init__(self, channel_id: int) -> None:
        self.channel_id: Final = channel_id


class Reset(Slotted):
    __slots__ = ("channel_id", "code", "text")

    def __init__(self, channel_id: int, code: int, text: str = "") -> None:
        self.channel_id: Final = channel_id
        self.code: Final = code
        self.text: Final = text


class GoAway(Slotted):
    __slots__ = ("last_channel_id", "code", "text")

    def __init__(self, last_channel_id: int, code: int, text: str = "") -> None:
        self.last_channel_id: Final = last_channel_id
        self.code: Final = code
        self.text: Final = text


Record = Settings | Open | OpenOk | OpenFailed | Data | Window | Fin | Reset | GoAway

_ID: Final = struct.Struct("!BI")  # type, channel id (DATA, OPEN_OK, FIN)
_ID_U32: Final = struct.Struct("!BII")  # WINDOW: type, id, increment
_ID_U16: Final = struct.Struct("!BIH")  # OPEN_FAILED, RESET, GOAWAY: type, id, code
_OPEN: Final = struct.Struct("!BIBH")  # type, id, kind, port; host follows
_SETTINGS: Final = struct.Struct("!BB")  # type, version; key/value pairs follow
_PAIR: Final = struct.Struct("!HI")
_MAX_SETTINGS: Final = 64

DATA_TYPE: Final = int(RecordType.DATA)


def encode_data_header(channel_id: int) -> bytes:
    """Return the 5-byte DATA header; the payload is appended by the caller."""
    return _ID.pack(DATA_TYPE, channel_id)


# -- encoding ----------------------------------------------------------------


def _check_u(value: int, bits: int, what: str) -> None:
    if not 0 <= value < (1 << bits):
        raise LocalProtocolError(f"{what} {value} does not fit in {bits} bits")


def _text_bytes(text: str) -> bytes:
    """Encode diagnostic text, cut at a character boundary to MAX_TEXT_SIZE."""
    raw = text.encode("utf-8")
    if len(raw) > MAX_TEXT_SIZE:
        raw = raw[:MAX_TEXT_SIZE].decode("utf-8", "ignore").encode("utf-8")
    return raw


def _encode_settings(r: Settings) -> bytes:
    _check_u(r.version, 8, "version")
    _check_u(r.initial_window, 32, "initial window")
    _check_u(r.max_chunk_size, 32, "max chunk size")
    return b"".join((
        _SETTINGS.pack(RecordType.SETTINGS, r.version),
        _PAIR.pack(SettingId.INITIAL_WINDOW, r.initial_window),
        _PAIR.pack(SettingId.MAX_CHUNK_SIZE, r.max_chunk_size),
    ))


def _encode_open(r: Open) -> bytes:
    _check_u(r.channel_id, 32, "channel id")
    _check_u(r.kind, 8, "kind")
    if not 1 <= r.port <= 0xFFFF:
        raise LocalProtocolError(f"port {r.port} out of range 1-65535")
    host = r.host.encode("utf-8")
    if not 1 <= len(host) <= MAX_HOST_SIZE:
        raise LocalProtocolError(f"host must be 1-{MAX_HOST_SIZE} bytes of UTF-8")
    return _OPEN.pack(RecordType.OPEN, r.channel_id, r.kind, r.port) + host


def _encode_coded(rtype: RecordType, ident: int, code: int, text: str) -> bytes:
    _check_u(ident, 32, "channel id")
    _check_u(code, 16, "code")
    return _ID_U16.pack(rtype, ident, code) + _text_bytes(text)


def _encode_window(r: Window) -> bytes:
    _check_u(r.channel_id, 32, "channel id")
    if not 1 <= r.increment <= MAX_WINDOW:
        raise LocalProtocolError(f"window increment {r.increment} out of range")
    return _ID_U32.pack(RecordType.WINDOW, r.channel_id, r.increment)


def _encode_id_only(rtype: RecordType, channel_id: int) -> bytes:
    _check_u(channel_id, 32, "channel id")
    return _ID.pack(rtype, channel_id)


def encode_record(record: Record) -> bytes:
    """Serialize one record (the hot DATA path uses encode_data_header instead).

    Raises:
        LocalProtocolError: a field is out of range.
    """
    if isinstance(record, Data):
        if not record.payload:
            raise LocalProtocolError("DATA payload must not be empty")
        return _encode_id_only(RecordType.DATA, record.channel_id) + record.payload
    if isinstance(record, Window):
        return _encode_window(record)
    if isinstance(record, OpenOk):
        return _encode_id_only(RecordType.OPEN_OK, record.channel_id)
    if isinstance(record, Fin):
        return _encode_id_only(RecordType.FIN, record.channel_id)
    if isinstance(record, Open):
        return _encode_open(record)
    if isinstance(record, OpenFailed):
        return _encode_coded(RecordType.OPEN_FAILED, record.channel_id, record.reason, record.text)
    if isinstance(record, Reset):
        return _encode_coded(RecordType.RESET, record.channel_id, record.code, record.text)
    if isinstance(record, GoAway):
        return _encode_coded(RecordType.GOAWAY, record.last_channel_id, record.code, record.text)
    return _encode_settings(record)


# -- decoding ----------------------------------------------------------------


def _bad(message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=int(code))


def _text(raw: bytes, what: str) -> str:
    if len(raw) > MAX_TEXT_SIZE:
        raise _bad(f"{what} text longer than {MAX_TEXT_SIZE} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"{what} text is not valid UTF-8") from exc


def _exact(record: bytes, size: int, name: str) -> None:
    if len(record) != size:
        raise _bad(f"{name} record must be {size} bytes, got {len(record)}",
                   ErrorCode.RECORD_SIZE_ERROR)


def _at_least(record: bytes, size: int, name: str) -> None:
    if len(record) < size:
        raise _bad(f"{name} record truncated ({len(record)} bytes)", ErrorCode.RECORD_SIZE_ERROR)


def _decode_settings(record: bytes) -> Settings:
    _at_least(record, _SETTINGS.size, "SETTINGS")
    version = record[1]
    if version != VERSION:  # the rest of the layout is the version's business
        return Settings(version, 0, 0)
    body = len(record) - _SETTINGS.size
    if body % _PAIR.size or body // _PAIR.size > _MAX_SETTINGS:
        raise _bad("SETTINGS key/value list has a bad length", ErrorCode.RECORD_SIZE_ERROR)
    values = {SettingId.INITIAL_WINDOW: DEFAULT_INITIAL_WINDOW,
              SettingId.MAX_CHUNK_SIZE: DEFAULT_MAX_CHUNK_SIZE}
    for key, value in _PAIR.iter_unpack(record[_SETTINGS.size:]):
        if key in values:  # unknown keys are ignored: room for extensions
            values[SettingId(key)] = value
    return Settings(version, values[SettingId.INITIAL_WINDOW], values[SettingId.MAX_CHUNK_SIZE])


def _decode_open(record: bytes) -> Open:
    _at_least(record, _OPEN.size + 1, "OPEN")
    _, channel_id, kind, port = _OPEN.unpack_from(record)
    host = record[_OPEN.size:]
    if len(host) > MAX_HOST_SIZE or port == 0:
        raise _bad("OPEN has a bad host length or port 0")
    try:
        text = host.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad("OPEN host is not valid UTF-8") from exc
    return Open(channel_id, kind, text, port)


def _decode_coded(record: bytes, name: str) -> tuple[int, int, str]:
    _at_least(record, _ID_U16.size, name)
    _, ident, code = _ID_U16.unpack_from(record)
    return ident, code, _text(record[_ID_U16.size:], name)


def _decode_window(record: bytes) -> Window:
    _exact(record, _ID_U32.size, "WINDOW")
    _, channel_id, increment = _ID_U32.unpack(record)
    if not 1 <= increment <= MAX_WINDOW:
        raise _bad(f"WINDOW increment {increment} out of range", ErrorCode.FLOW_CONTROL_ERROR)
    return Window(channel_id, increment)


def _decode_data(record: bytes) -> Data:
    _at_least(record, DATA_HEADER_SIZE + 1, "DATA")
    return Data(_ID.unpack_from(record)[1], bytes(record[DATA_HEADER_SIZE:]))


def decode_record(record: bytes) -> Record:
    """Parse one whole record.

    Raises:
        RemoteProtocolError: the record is malformed; ``code`` is an ErrorCode.
    """
    if not record:
        raise _bad("empty record", ErrorCode.RECORD_SIZE_ERROR)
    rtype = record[0]
    if rtype == DATA_TYPE:
        return _decode_data(record)
    if rtype == RecordType.WINDOW:
        return _decode_window(record)
    if rtype == RecordType.OPEN_OK or rtype == RecordType.FIN:
        _exact(record, _ID.size, RecordType(rtype).name)
        cid = _ID.unpack(record)[1]
        return OpenOk(cid) if rtype == RecordType.OPEN_OK else Fin(cid)
    if rtype == RecordType.OPEN:
        return _decode_open(record)
    if rtype == RecordType.OPEN_FAILED:
        return OpenFailed(*_decode_coded(record, "OPEN_FAILED"))
    if rtype == RecordType.RESET:
        return Reset(*_decode_coded(record, "RESET"))
    if rtype == RecordType.GOAWAY:
        return GoAway(*_decode_coded(record, "GOAWAY"))
    if rtype == RecordType.SETTINGS:
        return _decode_settings(record)
    raise _bad(f"unknown record type 0x{rtype:02x}")


def check_peer_settings(record: Record) -> Settings:
    """Validate the peer's first record: SETTINGS of our version, values in range.

    A sender assumes the minimums until SETTINGS arrive (docs/PROTOCOL.md,
    "Before SETTINGS"), so a value below them would break that assumption.

    Raises:
        RemoteProtocolError: not SETTINGS, another version, or a value out of range.
    """
    if not isinstance(record, Settings):
        raise _bad("the first record must be SETTINGS")
    if record.version != VERSION:
        raise _bad(f"unsupported mux version {record.version}", ErrorCode.UNSUPPORTED_VERSION)
    for name, value, low, high in (
            ("initial window", record.initial_window, MIN_WINDOW, MAX_WINDOW),
            ("max chunk size", record.max_chunk_size, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)):
        if not low <= value <= high:
            raise _bad(f"SETTINGS {name} {value} out of range {low}-{high}")
    return record
