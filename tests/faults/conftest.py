"""Shared helpers for the fault-injection suite (issue 4).

Daemons that are killed by pid (SIGKILL) at teardown unless a test stops them cleanly (a clean
stop costs ~5 s: libmilter notices it only every 5 s), one MTA connection at a time over the
milter protocol, backends that go down and come back on the same port, a listener whose
connect hangs, and a scripted backend that counts what is in flight.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import pytest

from ..conftest import IS_ROOT, RUN_USER, Daemon, user_dir
from ..milterclient import MilterClient, MilterError, Reply
from ..smtpbackend import POLL, ScriptedBackend, release_port

CLIENT_IP = "192.0.2.10"
HELO = "mx.test.example"
PROBE_SENDER = f"postmaster+backscatter@{HELO}"
INVALID_TEXT = "550 5.1.1 User unknown"
TEMPFAIL_PREFIX = "451 4.4.3 "
SYNTAX_PREFIX = "550 5.1.3 "
CACHE_LINE = re.compile(r"[01] [^\s]+ \d+\n")

# BackCatchAllCheck: 0: these tests count the backend's RCPTs; the accept-all probe has its own.
BASE_CONF = ("TimeoutSMTPConnect: 1\nTimeoutSMTPReply: 1\nBackSkipLoopback: no\n"
             f"HeloName: {HELO}\nBackCatchAllCheck: 0\n")


# ---- configuration ----

def route_lines(domain: str, port: int, hosts: Sequence[str] = ("127.0.0.1",)) -> str:
    """Config lines routing `domain` to `hosts` (tried in this order) at `port`.

    Consecutive BackSMTPServer lines before one BackAddrDomain are that domain's failover list
    (issue 4); they share the BackSMTPPort above the BackAddrDomain, so failover tests put their
    backends on different loopback addresses (127.0.0.x) with one port.
    """
    lines = [f"BackSMTPPort: {port}"] + [f"BackSMTPServer: {host}" for host in hosts]
    lines.append(f"BackAddrDomain: {domain}")
    return "\n".join(lines) + "\n"


Route = Union[int, tuple[int, Sequence[str]]]


def conf(routes: dict[str, Route], extra: str = "") -> str:
    """A whole scam.conf: short timeouts, fixed HeloName, the routes, then `extra`.

    A route is a port on 127.0.0.1, or (port, [hosts in failover order]).
    """
    text = BASE_CONF
    for domain, route in routes.items():
        port, hosts = (route, ("127.0.0.1",)) if isinstance(route, int) else route
        text += route_lines(domain, port, hosts)
    return text + extra


# ---- replies ----

def is_invalid(reply: Reply) -> bool:
    return reply.action == "replycode" and reply.text == INVALID_TEXT


def is_syntax(reply: Reply) -> bool:
    return reply.action == "replycode" and reply.text.startswith(SYNTAX_PREFIX)


def is_tempfail(reply: Reply) -> bool:
    return reply.action == "replycode" and reply.text.startswith(TEMPFAIL_PREFIX)


def show(reply: Reply) -> str:
    return f"{reply.action} {reply.text!r}"


# ---- the daemon ----

class FaultDaemon(Daemon):
    """Daemon that waits for *its own* pid in the pid file (a stale one may be left by kill -9),
    can be killed at once, and reports its memory, threads and sockets."""

    def start(self, timeout: float = 20.0) -> "FaultDaemon":
        with open(self.conf, "w") as handle:
            handle.write(self.conf_text)
        if IS_ROOT:
            entry = pwd.getpwnam(RUN_USER)
            os.chown(self.conf, entry.pw_uid, entry.pw_gid)
        log = open(self.logpath, "ab")
        self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                text = Path(self.pidfile).read_text().strip()
            except OSError:
                text = ""
            if text == str(self.proc.pid) and os.path.exists(self.socket):
                self.pid = self.proc.pid
                return self
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.pid = None
                raise RuntimeError(f"scam-back exited {code}: {self.log()[-3000:]}")
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"scam-back did not come up in {timeout} s: {self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL by pid and reap; no clean-up by the daemon."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.pid = None

    def signal_and_wait(self, signum: int, timeout: float = 15.0) -> tuple[Optional[int], float]:
        """Send a signal by pid; return (exit code or None if still running, seconds taken)."""
        assert self.proc is not None and self.pid == self.proc.pid
        started = time.monotonic()
        os.kill(self.pid, signum)
        try:
            code: Optional[int] = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        elapsed = time.monotonic() - started
        if code is None:
            self.kill()
        self.pid = None
        return code, elapsed

    def status(self) -> dict[str, str]:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}

    def rss_kb(self) -> int:
        return int(self.status()["VmRSS"].split()[0])

    def sockets_to(self, ports: Iterable[int]) -> list[str]:
        """This daemon's TCP connections to 127.0.0.1 at any of `ports` (from /proc)."""
        inodes = set()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        wanted = {f"0100007F:{port:04X}" for port in ports}
        found = []
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[2] in wanted and fields[9] in inodes:
                found.append(f"{fields[1]}->{fields[2]} state {fields[3]}")
        return found

    def discard(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def stop_together(daemons: Sequence[FaultDaemon], signum: int = signal.SIGTERM
                  ) -> list[tuple[Optional[int], float]]:
    """Signal several daemons at once (each stop takes ~5 s) and wait for all of them."""
    with ThreadPoolExecutor(max_workers=max(1, len(daemons))) as pool:
        return list(pool.map(lambda d: d.signal_and_wait(signum), daemons))


class DaemonSet:
    """Starts FaultDaemons; discard() kills each by pid and removes its directory."""

    def __init__(self) -> None:
        self.started: list[FaultDaemon] = []

    def __call__(self, conf_text: str, *extra: str, prepare: Optional[Callable[[FaultDaemon], None]]
                 = None) -> FaultDaemon:
        daemon = FaultDaemon(conf_text, tuple(extra))
        self.started.append(daemon)
        if prepare is not None:
            prepare(daemon)
        return daemon.start()

    def discard(self) -> None:
        for daemon in self.started:
            daemon.discard()


@pytest.fixture
def daemons() -> Iterator[DaemonSet]:
    """Start real scam-back daemons for one test; each is killed by pid at the end."""
    started = DaemonSet()
    yield started
    started.discard()


@pytest.fixture(scope="module")
def module_daemons() -> Iterator[DaemonSet]:
    """Like `daemons`, shared by a module's tests."""
    started = DaemonSet()
    yield started
    started.discard()


def chown_to_run_user(path: str) -> None:
    if IS_ROOT:
        entry = pwd.getpwnam(RUN_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


# ---- the MTA side ----

class Mta:
    """One MTA connection: negotiated, connected from a client IP, in a transaction."""

    def __init__(self, daemon: Daemon, sender: Optional[str] = "sender@elsewhere.test",
                 ip: str = CLIENT_IP, timeout: float = 30.0) -> None:
        self.client = MilterClient(daemon.address, timeout=timeout)
        try:
            self.client.negotiate()
            self.client.connect("client.test", "inet", ip, 4321, macros={"{daemon_name}": "MTA"})
            if sender is not None:
                self.mail(sender)
        except BaseException:
            self.client.close()
            raise

    def mail(self, sender: str) -> Reply:
        bare = sender.strip("<>")
        return self.client.mail(f"<{bare}>", macros={"i": "Q1", "{mail_addr}": bare})

    def rcpt(self, address: str, argument: Optional[str] = None) -> Reply:
        return self.client.rcpt(argument if argument is not None else f"<{address}>",
                                macros={"{rcpt_addr}": address})

    def timed_rcpt(self, address: str, argument: Optional[str] = None) -> tuple[Reply, float]:
        started = time.monotonic()
        reply = self.rcpt(address, argument)
        return reply, time.monotonic() - started

    def abort(self) -> None:
        self.client.abort()

    def close(self) -> None:
        try:
            self.client.quit()
        except (MilterError, OSError):
            self.client.close()

    def __enter__(self) -> "Mta":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ask(daemon: Daemon, *recipients: str, ip: str = CLIENT_IP,
        sender: str = "sender@elsewhere.test") -> list[Reply]:
    """One MTA connection asking about each recipient in turn."""
    with Mta(daemon, sender=sender, ip=ip) as mta:
        return [mta.rcpt(r) for r in recipients]


def random_ip(rng: random.Random) -> str:
    """A client address from 10.0.0.0/8, so that no per-client limit links flood connections."""
    return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def verdict_lines(daemon: Daemon, address: str) -> list[str]:
    """The daemon's log lines about one recipient (the README's one-line-per-verdict format)."""
    return [line for line in daemon.log().splitlines() if f"rcpt=<{address}>" in line]


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def cache_entries(path: str) -> dict[str, str]:
    """address -> code ('0' valid, '1' invalid) of a cache file; every line must be well formed."""
    data = Path(path).read_bytes()
    text = data.decode("utf-8", "surrogateescape")
    assert text == "" or text.endswith("\n"), f"{path} does not end with a newline: {text[-80:]!r}"
    entries = {}
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        assert CACHE_LINE.fullmatch(line), f"{path}:{number}: malformed line {line!r}"
        code, address, _ = line.split()
        entries[address] = code
    return entries


# ---- backends ----

def users_replies(users: set[str], rcpt_delay: float = 0.0
                  ) -> Callable[[str, str, int], Optional[object]]:
    """ScriptedBackend replies: RCPT answered 250 for `users`, else 550 5.1.1, after a delay."""
    def answer(verb: str, line: str, number: int) -> Optional[object]:
        if verb != "RCPT":
            return None
        match = re.search(r"<([^>]*)>", line)
        address = (match.group(1) if match else "").lower()
        reply = b"250 2.1.5 Ok\r\n" if address in users else \
            b"550 5.1.1 <" + address.encode("utf-8", "replace") + b">: User unknown\r\n"
        return [(rcpt_delay, reply)] if rcpt_delay else reply
    return answer


class FixedPortBackend(ScriptedBackend):
    """ScriptedBackend on a chosen address and port (0: any), kept across stop() and start():
    a backend that goes down (connections refused) and comes back."""

    def __init__(self, *args: object, port: int = 0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.port = port
        self.running = False

    def start(self) -> "FixedPortBackend":
        if self._threads:
            raise RuntimeError("already running")
        self._stop.clear()
        release_port(self.port)             # a port held refused by refused_port()
        listener = socket.create_server((self.host, self.port))
        listener.settimeout(POLL)
        self.port = int(listener.getsockname()[1])
        self._spawn(self._accept_loop, listener)
        self.running = True
        return self

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        self.running = False

    def rcpts(self) -> list[str]:
        return [line for line in list(self.transcript) if line.upper().startswith("RCPT")]

    def clear(self) -> None:
        """Forget the transcript and the connection count."""
        with self._cond:
            self.transcript.clear()
            self.raw_lines.clear()
            self.connections = 0


class RestartableBackend(FixedPortBackend):
    """FixedPortBackend whose RCPT answer is 250 for `users`, else 550 5.1.1."""

    def __init__(self, users: Iterable[str] = (), port: int = 0, rcpt_delay: float = 0.0,
                 **kwargs: object) -> None:
        self.users = {u.lower() for u in users}
        super().__init__(replies=users_replies(self.users, rcpt_delay), port=port, **kwargs)


class TrackingBackend(ScriptedBackend):
    """ScriptedBackend that counts sessions and RCPTs in flight (RCPT read, reply not yet sent)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._local = threading.local()
        self.in_flight = self.max_in_flight = 0
        self.active = self.max_active = 0

    def _reply(self, line: str, number: int):  # type: ignore[no-untyped-def]
        step = super()._reply(line, number)
        if line.split(" ", 1)[0].upper() == "RCPT":
            with self._cond:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._local.rcpt = True
        return step

    def _send(self, conn: socket.socket, step):  # type: ignore[no-untyped-def]
        try:
            return super()._send(conn, step)
        finally:
            if getattr(self._local, "rcpt", False):
                self._local.rcpt = False
                with self._cond:
                    self.in_flight -= 1

    def _serve(self, conn: socket.socket, number: int) -> None:
        with self._cond:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            super()._serve(conn, number)
        finally:
            with self._cond:
                self.active -= 1


class HangingListener:
    """A listening socket on 127.0.0.1 whose accept queue is full: a new connect hangs (SYN
    dropped) until the client's own timeout."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = int(self.listener.getsockname()[1])
        self.fillers: list[socket.socket] = []

    def start(self) -> "HangingListener":
        for _ in range(3):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(filler)
        time.sleep(0.1)
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", self.port))
        except socket.timeout:
            pass            # as intended: the connect hangs
        else:
            raise RuntimeError("could not make a connect hang (accept queue not full)")
        finally:
            probe.close()
        return self

    def stop(self) -> None:
        for sock in self.fillers + [self.listener]:
            sock.close()

    def __enter__(self) -> "HangingListener":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def private_file(directory: str, name: str, content: bytes) -> str:
    """A file the daemon's user owns (so that a followed symlink *could* change it)."""
    path = os.path.join(directory, name)
    with open(path, "wb") as handle:
        handle.write(content)
    os.chmod(path, 0o644)
    chown_to_run_user(path)
    return path


@pytest.fixture
def outside_dir() -> Iterator[str]:
    """A directory outside the daemon's own, owned by its user."""
    path = user_dir("scam-back-outside-")
    yield path
    shutil.rmtree(path, ignore_errors=True)
