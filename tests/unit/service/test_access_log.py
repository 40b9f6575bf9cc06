"""service/access_log.py: the fields of a channel's line, for every way a channel ends.

The channels here are stand-ins with a ChannelStream's public face; the real ones
are in tests/integration/service/test_access_log.py.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from wstunnel import mux
from wstunnel.errors import ChannelRefused, ChannelReset, ConfigError, SessionClosed
from wstunnel.service.access_log import FIELDS, AccessLog
from wstunnel.service.logs import JsonFormatter, ReopeningFileHandler, TextFormatter, setup_logging


@dataclass(eq=False)
class _Channel:
    """What the access log reads of a ChannelStream."""

    channel_id: int = 3
    host: str = "db.internal"
    port: int = 5432
    kind: int = mux.ChannelKind.TCP
    forward: str | None = "db"
    bytes_sent: int = 100
    bytes_received: int = 2000
    error: BaseException | None = None
    accepted: bool = False


def _channel(**fields: Any) -> Any:
    """A stand-in, typed as what the access log takes."""
    return _Channel(**fields)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> _Records:
    return _Records()


def _access_log(records: _Records) -> AccessLog:
    logger = logging.Logger("test.access")
    logger.addHandler(records)
    return AccessLog(logger)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: getattr(record, key) for key in FIELDS}


class _Socket:
    def __init__(self, address: object) -> None:
        self.address = address

    def getpeername(self) -> object:
        if isinstance(self.address, OSError):
            raise self.address
        return self.address


def test_the_opener_names_its_client_and_counts_up_as_sent(records: _Records) -> None:
    """On the side that opened the channel the source is the local client; bytes_up is
    what it sent into the tunnel; nothing was dialled here."""
    log = _access_log(records)
    channel = _channel()
    log.channel_carried(channel, _Socket(("127.0.0.1", 50000)))
    log.channel_closed(channel, 1.23456, None, "wss://relay/t")
    assert [_fields(r) for r in records.records] == [{
        "agent": None, "forward": "db", "kind": "tcp", "channel": 3,
        "source": "127.0.0.1:50000", "host": "db.internal", "port": 5432, "dialled": None,
        "bytes_up": 100, "bytes_down": 2000, "duration": 1.235, "end": "clean",
        "reason": None, "detail": None}]


def test_the_acceptor_names_the_session_and_the_address_it_dialled(records: _Records) -> None:
    """On the side that accepted it (the relay for -L) the source is the session's
    peer, dialled the socket's peer, and up/down are swapped to stay client-relative."""
    log = _access_log(records)
    channel = _channel(accepted=True)
    log.channel_carried(channel, _Socket(("2001:db8::5", 5432)))
    log.channel_closed(channel, 0.5, "alice", "192.0.2.7:40000")
    fields = _fields(records.records[0])
    assert (fields["agent"], fields["source"], fields["dialled"]) == (
        "alice", "192.0.2.7:40000", "[2001:db8::5]:5432")
    assert (fields["bytes_up"], fields["bytes_down"]) == (2000, 100)


@pytest.mark.parametrize(("error", "end", "reason"), [
    (ChannelReset("reset by the peer (connection reset)", mux.ResetCode.CONNECTION_RESET),
     "reset_peer", "connection_reset"),
    (ChannelRefused("connection refused", mux.OpenFailure.REFUSED), "refused", "refused"),
    (SessionClosed("the session ended: ping timeout"), "session_lost", None),
])
def test_how_it_ended_comes_from_the_channels_error(
        records: _Records, error: BaseException, end: str, reason: str | None) -> None:
    """A peer's RESET, a refusal of our OPEN and a lost session each say so, with the
    code's name and the text."""
    log = _access_log(records)
    log.channel_closed(_channel(error=error), 0.0, None, None)
    fields = _fields(records.records[0])
    assert (fields["end"], fields["reason"], fields["detail"]) == (end, reason, str(error))


def test_our_reset_and_our_refusal_are_told_before_the_close(records: _Records) -> None:
    """A RESET we sent (the local socket was reset) and an OPEN we refused leave no
    error on the channel: what we were told is what the line says, once."""
    log = _access_log(records)
    reset, refused = _channel(channel_id=1), _channel(channel_id=2, accepted=True)
    log.channel_reset(reset, mux.ResetCode.CONNECTION_RESET,
                      "the local client reset the connection")
    log.channel_refused(refused, mux.OpenFailure.FORBIDDEN, "no allow rule")
    for channel in (reset, refused):
        log.channel_closed(channel, 0.1, None, None)
    log.channel_closed(reset, 0.1, None, None)  # (forgotten: clean)
    ends = [(f["end"], f["reason"], f["detail"]) for f in map(_fields, records.records)]
    assert ends == [("reset_local", "connection_reset", "the local client reset the connection"),
                    ("refused", "forbidden", "no allow rule"), ("clean", None, None)]


def test_unix_sockets_and_refusals_without_a_channel(records: _Records) -> None:
    """A path kind has no port and a unix peer; an OPEN refused before it became a
    channel (a session limit) still gets its line, host and port split."""
    log = _access_log(records)
    channel = _channel(kind=mux.ChannelKind.UNIX, host="/run/app.sock", port=1, accepted=True)
    log.channel_carried(channel, _Socket("/run/app.sock"))
    log.channel_closed(channel, 0.0, "bob", None)
    log.refused_unopened("bob", "192.0.2.7:1", mux.OpenFailure.LIMIT_REACHED,
                         "max_pending_opens 64 reached", "[2001:db8::1]:443")
    unix, limit = (_fields(r) for r in records.records)
    assert (unix["kind"], unix["port"], unix["dialled"]) == ("unix", None, "unix:/run/app.sock")
    assert (limit["host"], limit["port"], limit["end"], limit["reason"]) == (
        "2001:db8::1", 443, "refused", "limit_reached")


def test_a_socket_already_gone_leaves_the_address_unknown(records: _Records) -> None:
    """getpeername failing (the peer reset first) is no error: the field is empty."""
    log = _access_log(records)
    channel = _channel()
    log.channel_carried(channel, _Socket(OSError(107, "not connected")))
    log.channel_carried(channel, None)
    log.channel_closed(channel, 0.0, None, None)
    assert _fields(records.records[0])["source"] is None


# ------------------------------------------------------------- formats and files

def _record(**fields: Any) -> logging.LogRecord:
    record = logging.LogRecord("wstunnel.access", logging.INFO, "", 0, "channel", None, None)
    record.__dict__.update(dict.fromkeys(FIELDS) | fields)
    return record


def test_text_and_json_lines() -> None:
    """Text: key=value in the fields' order, ``-`` for none, quotes around spaces; JSON:
    one object with null for none."""
    record = _record(agent="alice", port=80, end="refused", detail="no allow rule")
    text = TextFormatter().format(record)
    assert text.endswith(' INFO wstunnel.access: channel agent=alice forward=- kind=- channel=- '
                         'source=- host=- port=80 dialled=- bytes_up=- bytes_down=- '
                         'duration=- end=refused reason=- detail="no allow rule"')
    payload = json.loads(JsonFormatter().format(record))
    assert payload["agent"] == "alice" and payload["forward"] is None and payload["port"] == 80
    assert list(payload)[4:] == list(FIELDS)


@pytest.fixture
def _restore_logging() -> Any:
    saved = []
    for name in ("wstunnel", "wstunnel.access"):
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.level, logger.propagate))
    yield
    for logger, handlers, level, propagate in saved:
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.mark.usefixtures("_restore_logging")
def test_on_writes_into_the_log_stream_whatever_the_level(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`access_log: on` with `log_level: warning`: access lines still come, others not."""
    setup_logging("warning", "text", access_log="on")
    logging.getLogger("wstunnel.agent").info("hidden")
    logging.getLogger("wstunnel.access").info("channel", extra=dict.fromkeys(FIELDS))
    err = capsys.readouterr().err
    assert "hidden" not in err and err.count(" INFO wstunnel.access: channel agent=-") == 1


@pytest.mark.usefixtures("_restore_logging")
def test_a_file_gets_the_lines_and_the_stream_does_not(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file path: the lines go there (JSON here, as log_format says), appended to
    what the file held; the log stream gets none of them."""
    path = tmp_path / "access.log"
    path.write_text("older line\n")
    setup_logging("info", "json", access_log=str(path))
    logging.getLogger("wstunnel.access").info("channel", extra=dict.fromkeys(FIELDS))
    lines = path.read_text().splitlines()
    assert lines[0] == "older line" and json.loads(lines[1])["logger"] == "wstunnel.access"
    assert "wstunnel.access" not in capsys.readouterr().err


def test_reopen_sends_the_next_line_to_a_new_file_and_loses_none(tmp_path: Path) -> None:
    """After a rename (logrotate) and ``reopen``: old lines stay in the renamed file, the
    next go to a new file at the path; a reopen that fails keeps the old file."""
    path = tmp_path / "access.log"
    handler = ReopeningFileHandler(str(path))
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("test.reopen")
    logger.addHandler(handler)
    try:
        logger.info("one")
        path.rename(tmp_path / "access.log.1")
        logger.info("two")  # (still the renamed file: nobody asked to reopen yet)
        handler.reopen()
        logger.info("three")
        handler.baseFilename = str(tmp_path / "missing" / "access.log")
        handler.reopen()  # logs an error, keeps writing where it did
        logger.info("four")
    finally:
        handler.close()
    assert (tmp_path / "access.log.1").read_text() == "one\ntwo\n"
    assert path.read_text() == "three\nfour\n"


@pytest.mark.usefixtures("_restore_logging")
def test_a_file_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    """The error names the key and the file, and says what to do."""
    with pytest.raises(ConfigError, match=r"access_log: cannot open .*missing/a\.log .*"
                                          r"access_log: on"):
        setup_logging("info", "text", access_log=str(tmp_path / "missing" / "a.log"))
