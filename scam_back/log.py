"""Logging: syslog (facility mail, ident scam-back), and stderr before detaching or without syslog."""

from __future__ import annotations

import collections
import logging
import logging.handlers
import os
import sys
import threading
from typing import Callable, Optional

from .threads import start_quiet_thread

NOTICE = 25
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": NOTICE,
          "warning": logging.WARNING, "error": logging.ERROR}
SYSLOG_SOCKET = "/dev/log"

log = logging.getLogger("scam-back")
# Writers for verdict lines, which bypass the logging machinery once the daemon asks for it.
_fast_sinks: list[Callable[[list[bytes]], None]] = []
_writer: "Optional[_VerdictWriter]" = None


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
    _fast_sinks[:] = [_fast_sink(h) for h in log.handlers]
    return has_syslog


def _fast_sink(handler: logging.Handler) -> Callable[[list[bytes]], None]:
    """A writer of verdict lines to the same place, in the same form, as the handler's."""
    if isinstance(handler, logging.handlers.SysLogHandler):
        head = f"<{handler.encodePriority(handler.facility, 'info')}>{handler.ident}".encode()

        def to_syslog(lines: list[bytes]) -> None:
            for line in lines:
                data = head + line + b"\000"
                try:
                    handler.socket.send(data)
                except OSError:
                    # syslogd restarted: reconnect once, as SysLogHandler.emit does.
                    try:
                        with handler.lock:
                            handler.socket.close()
                            handler._connect_unixsocket(handler.address)
                        handler.socket.send(data)
                    except OSError:
                        pass
        return to_syslog
    stream = getattr(handler, "stream", sys.stderr)

    def to_stream(lines: list[bytes]) -> None:
        try:
            os.write(stream.fileno(), b"".join(b"scam-back: " + line + b"\n" for line in lines))
        except (OSError, ValueError):
            pass
    return to_stream


class _VerdictWriter:
    """Writes queued verdict lines every FLUSH_EVERY seconds from one thread.

    A write or send in the MTA's thread releases the GIL, and with many MTA threads that
    hand-off cost more than the decision itself; appending to a deque costs nothing.
    """

    FLUSH_EVERY = 0.02

    def __init__(self) -> None:
        # Bounded: a stalled syslog must cost lines, not memory.
        self.lines: "collections.deque[bytes]" = collections.deque(maxlen=100_000)
        self._stop = threading.Event()
        self._thread = start_quiet_thread(self._run, "verdict-log")

    def _run(self) -> None:
        while not self._stop.wait(self.FLUSH_EVERY):
            self.flush()

    def flush(self) -> None:
        batch: list[bytes] = []
        try:
            while True:
                batch.append(self.lines.popleft())
        except IndexError:
            pass
        if batch:
            for sink in _fast_sinks:
                try:
                    sink(batch)
                except Exception:       # the writer thread must outlive any one bad write
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()


def enable_fast_verdicts() -> None:
    """Daemon only, after detaching: verdict lines are queued and written in batches."""
    global _writer
    if _writer is None:
        _writer = _VerdictWriter()


def disable_fast_verdicts() -> None:
    """Write what is queued; later verdict lines go through logging again."""
    global _writer
    writer, _writer = _writer, None
    if writer is not None:
        writer.stop()


def verdict(message: str) -> None:
    """Log one verdict line at info level."""
    if not log.isEnabledFor(logging.INFO):
        return
    writer = _writer
    if writer is not None and _fast_sinks:
        writer.lines.append(message.encode("utf-8", "backslashreplace"))
    else:
        log.info("%s", message)


def set_level(level: str) -> None:
    """Change the level after start-up (LogLevel from the config)."""
    log.setLevel(LEVELS.get(level, logging.INFO))
