"""The control socket: a unix socket (mode 0600, the daemon's user) where scam-back-ctl asks.

The protocol is one JSON request line; the answer is "OK" or "ERROR <reason>" on the first line,
then the answer's lines, then the server closes the connection.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import stat
import threading
from typing import Callable, Iterator, Optional

from .threads import start_quiet_thread

log = logging.getLogger("scam-back")

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0        # a client that stops reading a dump does not pin a thread forever
QUIET_ERRORS = ("AdminError", "ReloadError")    # refusals with a reason, already logged

Handler = Callable[[dict], Iterator[str]]


def socket_path(configured: Optional[str], pid_file: str) -> str:
    """ControlSocket, or the pid file's name with .ctl for .pid: one per instance, side by side."""
    if configured:
        return configured
    base = pid_file[:-4] if pid_file.endswith(".pid") else pid_file
    return base + ".ctl"


class ControlError(Exception):
    """The control socket cannot be opened (start-up) or reached (the client)."""


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handle_request_fn: Handler

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        log.exception("control socket: internal error")


class _Connection(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.connection.settimeout(READ_TIMEOUT)
        try:
            line = self.rfile.readline(MAX_REQUEST)
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except (OSError, ValueError):
            self._send(["ERROR bad request (expected one JSON line, as scam-back-ctl sends)"])
            return
        handler = self.server.handle_request_fn  # type: ignore[attr-defined]
        try:
            answer = handler(request)
            first = next(answer, None)
        except Exception as exc:  # AdminError, or a fault: the admin gets the reason
            if type(exc).__name__ not in QUIET_ERRORS:
                log.exception("control: %s failed", request.get("command"))
            self._send([f"ERROR {exc}"])
            return
        self.connection.settimeout(WRITE_TIMEOUT)
        self._send(["OK"] + ([] if first is None else [first]), answer)

    def _send(self, head: list[str], rest: Iterator[str] = iter(())) -> None:
        try:
            self.wfile.write("".join(f"{line}\n" for line in head).encode("utf-8", "replace"))
            batch: list[str] = []
            for line in rest:
                batch.append(line)
                if len(batch) >= 4096:
                    self.wfile.write(("\n".join(batch) + "\n").encode("utf-8", "replace"))
                    batch = []
            if batch:
                self.wfile.write(("\n".join(batch) + "\n").encode("utf-8", "replace"))
        except OSError:
            pass        # the client went away


class ControlServer:
    """Serves admin requests on a unix socket in a background thread."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self._clear_stale(path)
        old_umask = os.umask(0o177)         # 0600 from the start: no moment of group access
        try:
            self._server = _Server(path, _Connection)
        except OSError as exc:
            raise ControlError(f"cannot create control socket {path}: {exc.strerror} (its directory "
                               "must exist and be writable by the daemon's user; or set "
                               "ControlSocket)") from None
        finally:
            os.umask(old_umask)
        self._server.handle_request_fn = handler
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def _clear_stale(path: str) -> None:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"control socket {path} exists and is not a socket; remove it or "
                               "set ControlSocket to another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)         # left by a daemon that was killed
            return
        finally:
            probe.close()
        raise ControlError(f"control socket {path} is in use by a running scam-back (give each "
                           "instance its own -P or ControlSocket)")

    def start(self) -> None:
        self._thread = start_quiet_thread(lambda: self._server.serve_forever(0.5), "control")

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def request(path: str, message: dict, timeout: float = 60.0) -> Iterator[str]:
    """Send one request and yield the answer's lines; the first is OK or ERROR (client side)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot reach scam-back at {path}: {exc.strerror or exc} (is it "
                           "running? pick the instance with -s SOCKET or -f CONFIG)") from None
    try:
        sock.sendall((json.dumps(message) + "\n").encode())
        with sock.makefile("rb") as reader:
            for raw in reader:
                yield raw.decode("utf-8", "replace").rstrip("\n")
    except OSError as exc:
        raise ControlError(f"scam-back at {path} stopped answering: {exc}") from None
    finally:
        sock.close()
