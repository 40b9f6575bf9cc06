"""Logging setup for the programs: one line per event, as text or JSON.

Only ``cli.py`` calls ``setup_logging``; every other module just does
``logging.getLogger(__name__)`` and passes structured details as ``extra=``.
Text lines read ``2024-05-01T12:00:00.123Z INFO wstunnel.agent: session up
relay=ws://...``; JSON lines are one object each with ``ts``, ``level``,
``logger``, ``msg`` and every ``extra`` field, so log shippers need no regex.
A traceback, when there is one (bugs only), is indented under the text line
or put in the ``exc`` field of the JSON object. A field without a value
(None) reads ``-`` in text and ``null`` in JSON.

The access log (``access_log``, service/access_log.py) is the logger
``wstunnel.access``: off, into this stream (``on``; at INFO whatever
``log_level`` says), or a file of its own in the same format, opened for
appending and reopened by ``reopen_log_files`` (the CLI calls it on SIGHUP and
SIGUSR1, after logrotate has renamed the file). Everything is written from the
trio thread, so a reopen happens between two lines and loses none.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final, TextIO

from ..errors import ConfigError

__all__ = ["JsonFormatter", "ReopeningFileHandler", "TextFormatter", "reopen_log_files",
           "setup_logging"]

_ACCESS_LOGGER: Final = "wstunnel.access"  # (access_log.ACCESS_LOGGER)

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items()
            if k not in _STANDARD_ATTRS and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger>: <message> key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{_timestamp(record)} {record.levelname} {record.name}: "
                f"{record.getMessage()}")
        for key, value in _extras(record).items():
            line += f" {key}={_text_value(value)}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    text = str(value)
    if not text or any(c.isspace() or c in "\"=" for c in text):
        return json.dumps(text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, extras (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            payload.setdefault(key, value)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


def setup_logging(level: str = "info", log_format: str = "text",
                  stream: TextIO | None = None, access_log: str = "off") -> None:
    """Send the ``wstunnel`` loggers to ``stream`` (stderr) in the chosen format.

    Replaces handlers installed by an earlier call, so tests and repeated
    ``main()`` calls do not duplicate lines. Other libraries' loggers are
    left alone.

    Args:
        level: debug, info, warning or error.
        log_format: text or json.
        stream: where lines go; defaults to ``sys.stderr`` at call time.
        access_log: off, on (into ``stream``) or a file path (see the module docstring).

    Raises:
        ConfigError: the access log's file cannot be opened.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_formatter(log_format))
    _replace_handlers(logging.getLogger("wstunnel"), handler)
    logger = logging.getLogger("wstunnel")
    logger.setLevel(level.upper())
    logger.propagate = False
    _setup_access_log(access_log, log_format)


def _formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def _replace_handlers(logger: logging.Logger, handler: logging.Handler | None) -> None:
    for old in list(logger.handlers):
        logger.removeHandler(old)
        if isinstance(old, ReopeningFileHandler):
            old.close()  # (ours; a stream handler's stream belongs to the caller)
    if handler is not None:
        logger.addHandler(handler)


def _setup_access_log(access_log: str, log_format: str) -> None:
    logger = logging.getLogger(_ACCESS_LOGGER)
    handler: logging.Handler | None = None
    if access_log not in ("off", "on"):
        try:
            handler = ReopeningFileHandler(access_log)
        except OSError as exc:
            raise ConfigError(f"access_log: cannot open {access_log} for appending "
                              f"({exc.strerror or exc}); fix the path or its directory's "
                              "permissions, or use `access_log: on` to log to stderr") from exc
        handler.setFormatter(_formatter(log_format))
    _replace_handlers(logger, handler)
    logger.setLevel(logging.NOTSET if access_log == "off" else logging.INFO)
    logger.propagate = handler is None  # on: into the wstunnel stream


def reopen_log_files() -> None:
    """Reopen the access log's file (after logrotate renamed it); nothing without one."""
    for handler in logging.getLogger(_ACCESS_LOGGER).handlers:
        if isinstance(handler, ReopeningFileHandler):
            handler.reopen()


class ReopeningFileHandler(logging.FileHandler):
    """A file opened for appending, one line per record, reopened on request.

    The new file is opened before the old one is closed: should that fail (the
    directory went away), lines keep going to the old file and one error says why.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="a", encoding="utf-8")

    def reopen(self) -> None:
        try:
            new = self._open()
        except OSError as exc:
            logging.getLogger("wstunnel.service").error(
                "access_log: cannot reopen %s (%s); still writing to the file that was open",
                self.baseFilename, exc.strerror or exc)
            return
        self.acquire()  # (records come from the trio thread; logging's rule anyway)
        try:
            old, self.stream = self.stream, new
        finally:
            self.release()
        if old is not None:
            old.close()

