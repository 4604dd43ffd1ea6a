"""Logging: one line per event; readable text on a terminal, JSON for journald/shippers.

Chat text and secrets are never passed to log calls at info level or above: log message
ids, chat ids and reasons, not bodies.

When standard error is the journal (``$JOURNAL_STREAM`` names stderr's device and inode,
as systemd sets it for ``StandardError=journal``), every line starts with the record's
syslog priority, ``<N>`` (sd-daemon(3)): journald strips it and stores ``PRIORITY=N``,
so that ``journalctl -p err`` finds the errors. The text format then leaves out its own
timestamp, since the journal stamps every line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

# Attributes every record has (or gets from other formatters): not repeated as extra fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped):
    ``ts`` (epoch seconds), ``level``, ``logger``, ``msg``, any ``extra=`` fields, and
    ``exc`` with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, *, timestamp: bool = True, instance: str = "") -> None:
        stamp = "%(asctime)s.%(msecs)03dZ " if timestamp else ""
        where = f"[{instance.replace('%', '%%')}] " if instance else ""
        super().__init__(stamp + "%(levelname)-7s " + where + "%(name)s: %(message)s",
                         "%Y-%m-%dT%H:%M:%S")
        self.converter = time.gmtime


def syslog_priority(levelno: int) -> int:
    """The sd-daemon(3) priority of a logging level: DEBUG 7, INFO 6, WARNING 4, ERROR 3,
    CRITICAL 2 (levels between two of these get the more severe one's)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """Wraps a formatter: every line of its output (a traceback's too) starts with ``<N>``."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def stderr_is_journal(stream: TextIO | None = None,
                      environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` (default: stderr) is the journal stream that ``$JOURNAL_STREAM``
    (``DEVICE:INODE``) names; a redirected stderr in a child keeps the variable but not the
    stream, so both must match."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat((sys.stderr if stream is None else stream).fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):  # no such variable, no descriptor
        return False


def setup_logging(fmt: str = "text", level: str = "info", *,
                  environ: Mapping[str, str] | None = None, instance: str = "") -> None:
    """Log to stderr. With ``instance`` (several instances: cluster mode), every line names
    it: ``[name]`` in text, an ``instance`` field in JSON."""
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if stderr_is_journal(sys.stderr, environ):
        formatter = JournalFormatter(JsonFormatter() if fmt == "json"
                                     else TextFormatter(timestamp=False, instance=instance))
    else:
        formatter = JsonFormatter() if fmt == "json" else TextFormatter(instance=instance)
    if instance:
        handler.addFilter(_InstanceFilter(instance))
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aio-pika/aiormq log every broker disconnect as a warning with a traceback; the AMQP
    # transport already logs the loss and each reconnect in one line, so keep only errors.
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


class _InstanceFilter(logging.Filter):
    """Puts the instance's name on every record (the JSON format's ``instance`` field)."""

    def __init__(self, instance: str) -> None:
        super().__init__()
        self.instance = instance

    def filter(self, record: logging.LogRecord) -> bool:
        record.instance = self.instance
        return True


class RateLimited:
    """One log line per kind of failure and ``interval_s``: a fault that hits every message
    (a full disk) logs a line every ``interval_s``, saying how many it did not log, instead
    of a line (and a traceback) per message."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (logged at, suppressed since)

    def warning(self, logger: logging.Logger, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at WARNING unless ``kind`` was logged less than ``interval_s``
        ago; whether it was logged."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last[0] < self.interval_s:
            self._last[kind] = (last[0], last[1] + 1)
            return False
        if len(self._last) > 1024:  # many kinds: forget the old ones
            self._last.clear()
        suppressed = last[1] if last is not None else 0
        self._last[kind] = (now, 0)
        if suppressed:
            msg += f" ({suppressed} more like it in the last {self.interval_s:.0f} s)"
        logger.warning(msg, *args)
        return True
