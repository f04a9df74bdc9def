"""Logging for the command line: one line per message on stderr, as text or
JSON.  Library modules only log through their module loggers; this module is
the one place that configures handlers.

Cron mails whatever a job prints, so by default only warnings and errors are
shown; ``-v`` adds what happened, ``-vv`` debug detail, ``-q`` keeps errors.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}


class TextFormatter(logging.Formatter):
    """``cronguard: error: ...``; informational lines carry no level word."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            message = f"error: {message}"
        elif record.levelno >= logging.WARNING:
            message = f"warning: {message}"
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        return f"cronguard: {message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(verbosity: int = 0, log_format: str = "text") -> None:
    """Send cronguard's log records to stderr at the level ``verbosity`` asks."""
    level = _LEVELS.get(max(-1, min(verbosity, 2)), logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger("cronguard")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# Syslog, for --syslog.  Loaded only when asked for.

SYSLOG_SOCKET = "/dev/log"


def add_syslog(address: str = SYSLOG_SOCKET, verbosity: int = 0) -> None:
    """Also send cronguard's records to the local syslog, facility cron.

    Syslog gets what happened (``-v``'s level) whatever the stderr level, so
    acquisitions and skips are on record without cron mailing them.  Raises
    ``OSError`` when nothing listens at ``address``.
    """
    import logging.handlers
    import os
    import socket

    # SysLogHandler only reports a missing socket when a record is sent, as a
    # traceback on stderr; connecting first turns it into one clear error.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(address)
        except OSError:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
                stream.connect(address)
    handler = logging.handlers.SysLogHandler(
        address=address, facility=logging.handlers.SysLogHandler.LOG_CRON
    )
    handler.ident = f"cronguard[{os.getpid()}]: "
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logging.DEBUG if verbosity >= 2 else logging.INFO
    handler.setLevel(level)
    root = logging.getLogger("cronguard")
    for existing in root.handlers:
        existing.setLevel(root.level)
    root.addHandler(handler)
    root.setLevel(min(root.level, level))
