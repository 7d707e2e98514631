"""Logging: syslog (facility mail, ident scam-back), and stderr before detaching or without syslog."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

NOTICE = 25
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": NOTICE,
          "warning": logging.WARNING, "error": logging.ERROR}
SYSLOG_SOCKET = "/dev/log"

log = logging.getLogger("scam-back")


class QuietSysLogHandler(logging.handlers.SysLogHandler):
    """A syslog handler that drops a record it cannot send instead of printing a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class QuietStreamHandler(logging.StreamHandler):
    """A stderr handler that never prints a traceback per failed record (stderr may be closed)."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def setup(level: str = "info", stderr: bool = True, syslog_socket: str = SYSLOG_SOCKET) -> bool:
    """Route the scam-back logger to syslog when a socket exists, and to stderr when asked.

    Returns True when syslog is in use. Without syslog, stderr is always kept.
    """
    # One line per verdict is on the hot path: skip the per-record work nobody reads (caller's
    # file and line, thread and process names).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.addLevelName(NOTICE, "NOTICE")
    QuietSysLogHandler.priority_map.setdefault("NOTICE", "notice")
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(LEVELS.get(level, logging.INFO))
    log.propagate = False
    has_syslog = False
    if os.path.exists(syslog_socket):
        try:
            handler = QuietSysLogHandler(address=syslog_socket,
                                         facility=logging.handlers.SysLogHandler.LOG_MAIL)
            handler.ident = f"scam-back[{os.getpid()}]: "
            log.addHandler(handler)
            has_syslog = True
        except OSError:
            pass
    if stderr or not has_syslog:
        handler = QuietStreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("scam-back: %(message)s"))
        log.addHandler(handler)
    return has_syslog


def set_level(level: str) -> None:
    """Change the level after start-up (LogLevel from the config)."""
    log.setLevel(LEVELS.get(level, logging.INFO))
