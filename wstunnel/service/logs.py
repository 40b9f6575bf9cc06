"""Logging setup for the programs: one line per event, as text or JSON.

Only ``cli.py`` calls ``setup_logging``; every other module just does
``logging.getLogger(__name__)`` and passes structured details as ``extra=``.
Text lines read ``2024-05-01T12:00:00.123Z INFO wstunnel.agent: session up
relay=ws://...``; JSON lines are one object each with ``ts``, ``level``,
``logger``, ``msg`` and every ``extra`` field, so log shippers need no regex.
A traceback, when there is one (bugs only), is indented under the text line
or put in the ``exc`` field of the JSON object.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final, TextIO

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

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
                  stream: TextIO | None = None) -> None:
    """Send the ``wstunnel`` loggers to ``stream`` (stderr) in the chosen format.

    Replaces handlers installed by an earlier call, so tests and repeated
    ``main()`` calls do not duplicate lines. Other libraries' loggers are
    left alone.

    Args:
        level: debug, info, warning or error.
        log_format: text or json.
        stream: where lines go; defaults to ``sys.stderr`` at call time.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger("wstunnel")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
