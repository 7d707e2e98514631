"""A real redis-server on 127.0.0.1 for the shared-cache tests: started on a free port, stopped,
killed, paused (SIGSTOP: a hung Redis) and restarted on the same port, always by its own pid and
with every wait bounded."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (bound, then closed)."""
    with socket.create_server((host, 0)) as sock:
        return int(sock.getsockname()[1])


def _command(*words: str) -> bytes:
    """One command in the RESP protocol (any bytes allowed in the arguments)."""
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RedisServer:
    """redis-server as a subprocess on 127.0.0.1:port, with no persistence, in its own directory."""

    def __init__(self, password: Optional[str] = None, port: int = 0) -> None:
        self.password = password
        self.port = port
        self.host = HOST
        self.dir = tempfile.mkdtemp(prefix="scam-back-redis-")
        self.logpath = os.path.join(self.dir, "redis.log")
        self.proc: Optional[subprocess.Popen] = None
        self.paused = False

    # ---- addresses ----

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def client(self, timeout: float = 5.0, **options: object):  # type: ignore[no-untyped-def]
        """A redis-py client for the test's own look-ups (with the password, if any)."""
        import redis
        return redis.Redis(host=self.host, port=self.port, db=0, password=self.password,
                           socket_timeout=timeout, socket_connect_timeout=timeout, **options)

    # ---- life cycle ----

    def args(self) -> list[str]:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--daemonize", "no",
                "--logfile", ""]
        if self.password is not None:
            args += ["--requirepass", self.password]
        return args

    def start(self, timeout: float = START_TIMEOUT) -> "RedisServer":
        """Start it (on a free port the first time, on the same port after that); wait for PING."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("redis-server already running")
        chosen = self.port == 0
        for _ in range(3 if chosen else 1):
            if chosen:
                self.port = free_port()
            if self._start_once(timeout):
                return self
        raise RuntimeError(f"redis-server did not come up on {self.host}:{self.port}: "
                           f"{self.log()[-2000:]}")

    def _start_once(self, timeout: float) -> bool:
        log = open(self.logpath, "ab")
        try:
            self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None        # e.g. the port was taken meanwhile
                return False
            if self.ping():
                return True
            time.sleep(0.02)
        self._end()
        return False

    def ping(self, timeout: float = 0.5) -> bool:
        """True if it answers PING now (authenticated first when it has a password)."""
        request = b""
        if self.password is not None:
            request += _command("AUTH", self.password)
        request += _command("PING")
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
                sock.sendall(request)
                data = b""
                deadline = time.monotonic() + timeout
                while b"PONG" not in data and time.monotonic() < deadline:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return b"+PONG" in data
        except OSError:
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def _signal_and_reap(self, signum: int) -> bool:
        """Send signum by pid and wait (bounded) for the exit; True if the process ended."""
        assert self.proc is not None
        self._signal(signum)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _end(self) -> None:
        """SIGTERM by pid, wait (bounded), SIGKILL if it is still there; reap."""
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        if not self._signal_and_reap(signal.SIGTERM):
            self._signal_and_reap(signal.SIGKILL)
        self.proc = None

    def stop(self) -> None:
        """Stop the server (the port stays this object's, for a restart)."""
        self._end()

    def kill(self) -> None:
        """SIGKILL by pid, at once (a crashed Redis), and reap."""
        if self.proc is None:
            return
        self._signal_and_reap(signal.SIGKILL)
        self.paused = False
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP by pid: connections are accepted by the kernel, nothing is answered."""
        if not self.running():
            raise RuntimeError("redis-server is not running")
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT by pid."""
        self._signal(signal.SIGCONT)
        self.paused = False

    def restart(self, timeout: float = START_TIMEOUT) -> "RedisServer":
        """Start again on the same port (after kill() or stop())."""
        if self.running():
            self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop it and remove its directory."""
        self._end()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return Path(self.logpath).read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
