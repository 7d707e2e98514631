"""Files (issue 4): a damaged cache file is survived (bad lines skipped and counted, good lines
loaded); the cache and pid files are mode 0600 and a symlink planted at their paths is never
followed; the unix milter socket is mode 0660, never world-writable."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import stat
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from ..conftest import IS_ROOT, RUN_USER
from ..smtpbackend import ScriptedBackend, refused_port
from .conftest import (FaultDaemon, ask, chown_to_run_user, conf, is_invalid, is_tempfail,
                       private_file, show, stop_together, user_dir, wait_until)

DOMAIN = "files.test"
MB = 1024 * 1024


def good_lines() -> bytes:
    expiry = int(time.time()) + 86400
    return (f"0 keep-good@{DOMAIN} {expiry}\n1 keep-bad@{DOMAIN} {expiry}\n").encode()


def corrupt() -> bytes:
    bad = [b"7 junk@files.test 123\n", b"0\n", b"1 a b c d\n", b"0 no-at-sign\n",
           b"x keep-good@files.test\n", b"0 <evil>@files.test\n", b"1 x@files.test notanumber\n"]
    return good_lines() + b"".join(bad)


def truncated() -> bytes:
    return good_lines() + f"1 other@{DOMAIN} {int(time.time()) + 86400}\n0 trun".encode()


def binary() -> bytes:
    return good_lines() + os.urandom(MB) + b"\n" + os.urandom(MB)


def huge_garbage() -> bytes:
    return good_lines() + os.urandom(50 * MB)


def huge_single_line() -> bytes:
    return good_lines() + b"0 " + b"a" * (20 * MB)


DAMAGE: dict[str, tuple[Callable[[], bytes], int]] = {   # content, exact malformed count or -1
    "corrupt-lines": (corrupt, 7),
    "truncated": (truncated, 1),
    "binary": (binary, -1),
    "huge-50MB-garbage": (huge_garbage, -1),
    "huge-20MB-single-line": (huge_single_line, -1),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cache_file_is_survived_and_its_good_lines_loaded(daemons, damage: str) -> None:
    make, malformed = DAMAGE[damage]

    def prepare(daemon: FaultDaemon) -> None:
        with open(daemon.cachefile, "wb") as handle:
            handle.write(make())
        chown_to_run_user(daemon.cachefile)
    daemon = daemons(conf({DOMAIN: refused_port()}, "BackErrorTempfail: yes\n"), prepare=prepare)
    good, bad, unknown = ask(daemon, f"keep-good@{DOMAIN}", f"keep-bad@{DOMAIN}",
                             f"unknown@{DOMAIN}")
    assert good.action == "continue", show(good)
    assert is_invalid(bad), show(bad)
    assert is_tempfail(unknown), show(unknown)
    counts = [int(n) for n in re.findall(r"(\d+) malformed", daemon.log())]
    assert counts, f"malformed lines not counted in the log: {daemon.log()[-2000:]}"
    if malformed >= 0:
        assert counts[0] == malformed, counts
    else:
        assert counts[0] >= 1, counts
    assert daemon.alive()


# ---- modes ----

MODES = ("no-group", "group-nogroup")


@pytest.fixture(scope="module")
def rejecting_backend() -> Iterator[ScriptedBackend]:
    """A backend that knows nobody: every probe gives a verdict worth saving."""
    with ScriptedBackend(replies={"RCPT": b"550 5.1.1 No such user\r\n"}) as backend:
        yield backend


@pytest.fixture(scope="module")
def moded(module_daemons, rejecting_backend) -> dict[str, FaultDaemon]:  # type: ignore
    started = {}
    for name in MODES:
        extra = ("-g", "nogroup") if name == "group-nogroup" else ()
        daemon = module_daemons(conf({DOMAIN: rejecting_backend.port}, "BackListSaveInterval: 1\n"),
                                *extra)
        started[name] = daemon
        reply = ask(daemon, f"learned@{DOMAIN}")[0]
        assert is_invalid(reply), show(reply)
    for daemon in started.values():
        assert wait_until(lambda: os.path.exists(daemon.cachefile), 8.0), "no periodic save"
    return started


def expected_gid(name: str) -> int:
    if name == "group-nogroup":
        return grp.getgrnam("nogroup").gr_gid
    return pwd.getpwnam(RUN_USER).pw_gid


@pytest.mark.skipif(not IS_ROOT, reason="runs the daemon as another user; CI runs as root")
@pytest.mark.parametrize("name", MODES)
def test_cache_file_is_mode_0600(moded, name: str) -> None:
    info = os.stat(moded[name].cachefile)
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)


@pytest.mark.skipif(not IS_ROOT, reason="runs the daemon as another user; CI runs as root")
@pytest.mark.parametrize("name", MODES)
def test_pid_file_is_mode_0600(moded, name: str) -> None:
    info = os.stat(moded[name].pidfile)
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)


@pytest.mark.skipif(not IS_ROOT, reason="runs the daemon as another user; CI runs as root")
@pytest.mark.parametrize("name", MODES)
def test_unix_socket_is_mode_0660_never_world_writable(moded, name: str) -> None:
    info = os.stat(moded[name].socket)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660, oct(info.st_mode)
    assert info.st_gid == expected_gid(name)
    assert not info.st_mode & stat.S_IWOTH


# ---- symlinks ----

PRECIOUS = b"precious: not a cache file, not a pid file\n"


class Planted:
    """Two daemons, each with a symlink planted at one of its files, stopped with SIGTERM."""

    def __init__(self, module_daemons, outside: str, backend_port: int) -> None:  # type: ignore
        self.cache_target = private_file(outside, "cache-target", PRECIOUS)
        self.pid_target = private_file(outside, "pid-target", PRECIOUS)
        text = conf({DOMAIN: backend_port}, "BackListSaveInterval: 1\n")

        def plant_cache(d: FaultDaemon) -> None:
            os.symlink(self.cache_target, d.cachefile)

        def plant_pid(d: FaultDaemon) -> None:
            os.symlink(self.pid_target, d.pidfile)
        self.cache_daemon = module_daemons(text, prepare=plant_cache)
        self.pid_started = True
        try:
            self.pid_daemon = module_daemons(text, prepare=plant_pid)
        except RuntimeError as exc:          # refusing to start is not following either
            self.pid_started, self.pid_error = False, str(exc)
        self.cache_after_start = Path(self.cache_target).read_bytes()
        self.pid_after_start = Path(self.pid_target).read_bytes()
        self.learned = ask(self.cache_daemon, f"learned@{DOMAIN}")[0]   # something to save
        self.saved = wait_until(lambda: not os.path.islink(self.cache_daemon.cachefile), 8.0)
        running = [self.cache_daemon] + ([self.pid_daemon] if self.pid_started else [])
        self.exits = stop_together(running, signal.SIGTERM)


@pytest.fixture(scope="module")
def planted(module_daemons, rejecting_backend) -> Iterator[Planted]:  # type: ignore
    outside = user_dir("scam-back-outside-")
    try:
        yield Planted(module_daemons, outside, rejecting_backend.port)
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_symlink_planted_at_the_cache_file_is_not_followed(planted: Planted) -> None:
    assert is_invalid(planted.learned), show(planted.learned)
    assert planted.cache_after_start == PRECIOUS
    assert Path(planted.cache_target).read_bytes() == PRECIOUS, "the save wrote through the symlink"
    assert stat.S_IMODE(os.stat(planted.cache_target).st_mode) == 0o644
    assert planted.exits[0][0] == 0


def test_symlink_planted_at_the_pid_file_is_not_followed(planted: Planted) -> None:
    assert planted.pid_after_start == PRECIOUS, "the pid was written through the symlink"
    assert Path(planted.pid_target).read_bytes() == PRECIOUS
    assert os.path.exists(planted.pid_target), "exit removed the symlink's target"
