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
# The writer's queue append while verdict lines are wanted and queued: one check on the hot path.
_fast_append: Optional[Callable[[object], None]] = None
_ONLY_BYTES = {bytes}


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
    _refresh_fast_append()
    return has_syslog


def _refresh_fast_append() -> None:
    """Recompute _fast_append after the writer, the sinks or the level changed."""
    global _fast_append
    _fast_append = (_writer.lines.append if _writer is not None and _fast_sinks and
                    log.isEnabledFor(logging.INFO) else None)


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
            os.write(stream.fileno(), b"scam-back: " + b"\nscam-back: ".join(lines) + b"\n")
        except (OSError, ValueError):
            pass
    return to_stream


class _VerdictWriter:
    """Renders and writes queued verdict lines every FLUSH_EVERY seconds from one thread.

    A write or send in the MTA's thread releases the GIL, and with many MTA threads that
    hand-off cost more than the decision itself; appending to a deque costs nothing. Lines are
    rendered here too, a chunk at a time, so no MTA thread waits for long behind this one; a
    stream gets one write per chunk (at 30,000 lines a second, a write or two per flush: each
    write gives the GIL away and this thread must queue for it again).
    """

    FLUSH_EVERY = 0.02
    CHUNK = 1024

    def __init__(self) -> None:
        # Bounded: a stalled syslog must cost lines, not memory.
        self.lines: "collections.deque[object]" = collections.deque(maxlen=100_000)
        self._stop = threading.Event()
        self._thread = start_quiet_thread(self._run, "verdict-log")

    def _run(self) -> None:
        while not self._stop.wait(self.FLUSH_EVERY):
            self.flush()

    def flush(self) -> None:
        lines = self.lines
        popleft = lines.popleft
        while lines:
            batch = [popleft() for _ in range(min(len(lines), self.CHUNK))]
            if set(map(type, batch)) != _ONLY_BYTES:     # one C pass: most chunks are ready
                batch = [item if type(item) is bytes else _render(item) for item in batch]
            for sink in _fast_sinks:
                try:
                    sink(batch)
                except Exception:       # the writer thread must outlive any one bad write
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()


def _render(item: object) -> bytes:
    """A queued (render, args) rendered now, as bytes (flush passes ready bytes through)."""
    render, args = item  # type: ignore[misc]
    try:
        text = render(*args)
    except Exception as exc:            # a line that cannot be rendered must not stop the rest
        text = f"verdict line could not be written: {exc!r}"
    return text.encode("utf-8", "backslashreplace")


def enable_fast_verdicts() -> None:
    """Daemon only, after detaching: verdict lines are queued and written in batches."""
    global _writer
    if _writer is None:
        _writer = _VerdictWriter()
    _refresh_fast_append()


def disable_fast_verdicts() -> None:
    """Write what is queued; later verdict lines go through logging again."""
    global _writer
    writer, _writer = _writer, None
    _refresh_fast_append()
    if writer is not None:
        writer.stop()


def verdict(message: str) -> None:
    """Log one verdict line at info level."""
    verdict_later(str, message)


def verdict_bytes(line: bytes) -> None:
    """Log one ready verdict line (UTF-8) at info level: the cheapest way, for cached verdicts."""
    append = _fast_append
    if append is not None:
        append(line)
    elif log.isEnabledFor(logging.INFO):
        log.info("%s", line.decode("utf-8", "backslashreplace"))


def verdict_later(render: Callable[..., str], *args: object) -> None:
    """Log render(*args) at info level; the daemon renders it off the MTA's thread."""
    append = _fast_append
    if append is not None:
        append((render, args))
    elif log.isEnabledFor(logging.INFO):
        log.info("%s", render(*args))


def set_level(level: str) -> None:
    """Change the level after start-up (LogLevel from the config)."""
    log.setLevel(LEVELS.get(level, logging.INFO))
    _refresh_fast_append()
