"""Per-backend health (issue 4): after BackSMTPBackoffFailures failed connects in a row a backend
address is skipped for BackSMTPBackoff seconds (no TCP connection reaches it), per address, then
tried again; the skip and the recovery are each logged once."""

from __future__ import annotations

import re
import time

import pytest

from ..smtpbackend import ScriptedBackend, refused_port
from .conftest import Mta, RestartableBackend, ask, conf, is_invalid, is_tempfail, show

BACKOFF = 2.0


def health_lines(log: str, port: int) -> tuple[list[str], list[str]]:
    """(skip lines, recovery lines) the daemon logged about 127.0.0.1:port, verdict lines aside."""
    label = f"127.0.0.1:{port}"
    lines = [line for line in log.splitlines() if label in line and "verdict=" not in line]
    skips = [line for line in lines if re.search(r"skip", line, re.I)]
    recoveries = [line for line in lines if line not in skips and
                  re.search(r"again|recover|back up|reachable", line, re.I)]
    return skips, recoveries


def backends():  # type: ignore[no-untyped-def]
    down = RestartableBackend(port=refused_port())      # not started: refused
    other = RestartableBackend(users={"good@b.test"}).start()
    return down, other


def test_a_failed_connect_skips_that_backend_only_for_backoff_seconds_then_it_is_tried(daemons):
    down, other = backends()
    try:
        daemon = daemons(conf({"a.test": down.port, "b.test": other.port},
                              f"BackSMTPBackoff: {int(BACKOFF)}\nBackErrorTempfail: yes\n"))
        failed_at = time.monotonic()
        first = ask(daemon, "x1@a.test")[0]
        assert is_tempfail(first), show(first)
        down.start()                                   # up again, but inside the backoff window
        with Mta(daemon) as mta:
            skipped = mta.rcpt("x2@a.test")
            elsewhere = mta.rcpt("x2@b.test")          # another backend is not affected
        assert is_tempfail(skipped), show(skipped)
        assert time.monotonic() - failed_at < BACKOFF, "too slow to test inside the window"
        assert down.connections == 0, "a skipped backend was connected to"
        assert is_invalid(elsewhere), show(elsewhere)
        time.sleep(max(0.0, failed_at + BACKOFF + 0.3 - time.monotonic()))
        again = ask(daemon, "x3@a.test", "x4@a.test")
        assert down.connections >= 1, "the backend was not tried again after the backoff"
        assert all(is_invalid(r) for r in again), [show(r) for r in again]
        skips, recoveries = health_lines(daemon.log(), down.port)
        assert len(skips) == 1, skips
        assert len(recoveries) == 1, recoveries
        assert health_lines(daemon.log(), other.port) == ([], [])
    finally:
        down.stop()
        other.stop()


@pytest.mark.parametrize("check", ["0", "21600"], ids=["no-accept-all-check", "default-check"])
def test_backoff_failures_three_skips_only_after_three_failures_in_a_row(daemons, check):
    """A recipient's failed connect counts once: the accept-all check beside its probe (on by
    default) does not count a second failure."""
    down, other = backends()
    try:
        daemon = daemons(conf({"a.test": down.port, "b.test": other.port},
                              f"BackSMTPBackoff: {int(BACKOFF)}\nBackSMTPBackoffFailures: 3\n"
                              f"BackErrorTempfail: yes\nBackCatchAllCheck: {check}\n"))
        for reply in ask(daemon, "f1@a.test", "f2@a.test"):     # two failures
            assert is_tempfail(reply), show(reply)
        down.start()
        reply = ask(daemon, "s1@a.test")[0]                      # not skipped after two
        assert down.connections == 1 and is_invalid(reply), (down.connections, show(reply))
        down.stop()                                               # the success reset the count
        for reply in ask(daemon, "f3@a.test", "f4@a.test"):
            assert is_tempfail(reply), show(reply)
        down.start()
        reply = ask(daemon, "s2@a.test")[0]                      # two in a row: still tried
        assert down.connections == 2 and is_invalid(reply), (down.connections, show(reply))
        down.stop()
        failed_at = None
        for name in ("f5@a.test", "f6@a.test", "f7@a.test"):     # three in a row
            assert is_tempfail(ask(daemon, name)[0])
            failed_at = time.monotonic()
        down.start()
        reply = ask(daemon, "s3@a.test")[0]                      # now skipped
        assert is_tempfail(reply), show(reply)
        assert down.connections == 2, "a skipped backend was connected to"
        assert failed_at is not None
        time.sleep(max(0.0, failed_at + BACKOFF + 0.3 - time.monotonic()))
        reply = ask(daemon, "s4@a.test")[0]
        assert down.connections == 3 and is_invalid(reply), (down.connections, show(reply))
        skips, recoveries = health_lines(daemon.log(), down.port)
        assert len(skips) == 1, skips
        assert len(recoveries) == 1, recoveries
    finally:
        down.stop()
        other.stop()


@pytest.mark.parametrize("banner", [b"554 5.3.2 no service\r\n", "close"], ids=["554", "closed"])
def test_a_bad_or_missing_banner_starts_the_backoff_like_a_failed_connect(daemons, banner):
    """Weakness 11: a backend that accepts connections but will not talk is skipped a while
    too, instead of costing every recipient a connection and a banner wait."""
    with ScriptedBackend(banner) as mute:
        daemon = daemons(conf({"mute.test": mute.port},
                              f"BackSMTPBackoff: {int(BACKOFF)}\nBackErrorTempfail: yes\n"))
        first, second = ask(daemon, "x1@mute.test", "x2@mute.test")
        assert is_tempfail(first) and is_tempfail(second), (show(first), show(second))
        assert mute.connections == 1, f"{mute.connections} connections inside the backoff"
        skips, _ = health_lines(daemon.log(), mute.port)
        assert len(skips) == 1, skips
