"""Shared fixtures: real SMTP backends on 127.0.0.1, verifiers, and the real scam-back daemon."""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import Milter
import pytest
from Milter.testctx import TestCtx

from scam_back import config as configmod
from scam_back import routing
from scam_back.cache import VerdictCache
from scam_back.milter import ScamBackMilter
from scam_back.verifier import Verifier

from .smtpbackend import Backend

GOOD = {"good@example.net", "alice@example.net", "b2@b.test", "good@a.test"}
NR_BITS = (Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_MAIL | Milter.P_NR_RCPT |
           Milter.P_NR_DATA | Milter.P_NR_UNKN | Milter.P_NR_EOH | Milter.P_NR_BODY |
           Milter.P_NR_HDR)
RUN_USER = "nobody"
IS_ROOT = os.geteuid() == 0


@pytest.fixture
def backend() -> Iterator[Backend]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that knows the GOOD users."""
    with Backend(users=GOOD) as server:
        yield server


def make_config(text: str, path: str = "/test/scam.conf") -> configmod.Config:
    """A Config from text, with a fixed HeloName unless the text sets one."""
    if "heloname" not in text.lower():
        text += "\nHeloName: mx.test.example\n"
    if "backcatchallcheck" not in text.lower():
        text += "\nBackCatchAllCheck: 0\n"     # tests count RCPTs; accept-all has its own tests
    return configmod.parse_text(text, path)


def make_verifier(text: str, cache: Optional[VerdictCache] = None) -> Verifier:
    """A Verifier for config text (no mailertable)."""
    config = make_config(text)
    router = routing.Router(config)
    if cache is None:
        cache = VerdictCache(config.valid_ttl, config.invalid_ttl, config.cache_max)
    return Verifier(config, router, cache)


@pytest.fixture
def verifiers() -> Iterator[Callable[[str], Verifier]]:
    """Verifiers for config text (mailertable and transport map read, as the daemon does);
    their background workers and pooled backend sessions are stopped at the end."""
    made: list[Verifier] = []

    def make(text: str) -> Verifier:
        config = make_config(text)
        router, _ = routing.build(config)
        verifier = Verifier(config, router, VerdictCache(config.valid_ttl, config.invalid_ttl,
                                                         config.cache_max))
        made.append(verifier)
        return verifier
    yield make
    for verifier in made:
        verifier.refresher.stop()
        verifier.pool.close()


def backend_conf(backend: Backend, extra: str = "", domain: str = "example.net") -> str:
    """Config text routing one domain to a test backend, with short timeouts."""
    return (f"BackSMTPPort: {backend.port}\nBackSMTPServer: 127.0.0.1\nBackAddrDomain: {domain}\n"
            "TimeoutSMTPConnect: 1\nTimeoutSMTPReply: 1\nBackSkipLoopback: no\n"
            "HeloName: mx.test.example\nBackCatchAllCheck: 0\n" + extra)


@pytest.fixture
def milter_ctx(monkeypatch: pytest.MonkeyPatch) -> Callable[[Verifier], TestCtx]:
    """A pymilter TestCtx wired to ScamBackMilter for a verifier (no no-reply bits offered)."""
    monkeypatch.setattr(TestCtx, "default_opts", [Milter.CURR_ACTS, 0x1fffff & ~NR_BITS, 0, 0])

    def make(verifier: Verifier) -> TestCtx:
        monkeypatch.setattr(Milter, "factory", functools.partial(ScamBackMilter, verifier))
        return TestCtx()
    return make


# ---- the real daemon ----

def scam_back_command() -> list[str]:
    """The installed scam-back entry point, or python -m scam_back."""
    exe = Path(sys.executable).with_name("scam-back")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "scam_back"]


def user_dir(prefix: str = "scam-back-test-") -> str:
    """A directory the daemon's -u user can write (pytest's tmp_path is root-only)."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    if IS_ROOT:
        entry = pwd.getpwnam(RUN_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


class Daemon:
    """A running scam-back process on a unix socket in its own directory."""

    def __init__(self, conf_text: str, extra_args: tuple[str, ...] = (), detach: bool = False) -> None:
        self.dir = user_dir()
        self.socket = os.path.join(self.dir, "scam-back.sock")
        self.pidfile = os.path.join(self.dir, "scam-back.pid")
        self.cachefile = os.path.join(self.dir, "backscatter.txt")
        self.conf = os.path.join(self.dir, "scam.conf")
        self.logpath = os.path.join(self.dir, "stderr.log")
        self.conf_text = conf_text
        self.extra_args = extra_args
        self.detach = detach
        self.proc: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    def flags(self) -> list[str]:
        user = ["-u", RUN_USER] if IS_ROOT else []
        return ["-p", self.address, "-f", self.conf, "-P", self.pidfile, "-b", self.cachefile,
                *user, *self.extra_args] + (["-D"] if self.detach else [])

    def args(self) -> list[str]:
        return scam_back_command() + self.flags()

    def start(self, timeout: float = 15.0) -> "Daemon":
        with open(self.conf, "w") as handle:
            handle.write(self.conf_text)
        log = open(self.logpath, "ab")
        self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.socket) and os.path.exists(self.pidfile):
                try:
                    self.pid = int(Path(self.pidfile).read_text().strip())
                    return self
                except ValueError:
                    pass
            if not self.detach and self.proc.poll() is not None:
                raise RuntimeError(f"scam-back exited {self.proc.returncode}: {self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"scam-back did not come up in {timeout} s: {self.log()}")

    def log(self) -> str:
        time.sleep(0.1)     # verdict lines are written from a thread every 20 ms
        try:
            return Path(self.logpath).read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        if self.proc is not None and self.proc.pid == self.pid:
            return self.proc.poll() is None
        return True

    def terminate(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> Optional[int]:
        """SIGTERM (or sig) by pid, wait (libmilter takes up to ~5 s), SIGKILL if it hangs."""
        if self.pid is None:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            return None
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.05)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.pid = None
        return code

    def stop(self) -> None:
        self.terminate()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    """Start real scam-back daemons; each is stopped by pid at the end of the test."""
    started: list[Daemon] = []

    def start(conf_text: str, *extra: str, detach: bool = False) -> Daemon:
        daemon = Daemon(conf_text, tuple(extra), detach)
        started.append(daemon)
        return daemon.start()
    yield start
    for daemon in started:
        daemon.stop()


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run the scam-back command to completion and capture its output."""
    return subprocess.run(scam_back_command() + list(args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
