"""Outages (issue 4): cached answers keep being served while the backend is down, also past their
TTL for up to BackStaleGrace; such stale entries are saved in the cache file and survive a
restart, but answer only while the backend cannot be reached: with it up they are verified
afresh. TTLs are 1 s here, and BackErrorTempfail is on, so a `continue` can only come from the
cache while the backend is down."""

from __future__ import annotations

import signal
import time

from ..smtpbackend import refused_port
from .conftest import (RestartableBackend, ask, cache_entries, conf, is_invalid,
                       is_tempfail, show)

TTL = 1
OUTAGE_CONF = (f"BackValidAddrExp: {TTL}\nBackInvalidAddrExp: {TTL}\nBackErrorTempfail: yes\n"
               "BackSMTPBackoff: 0\n")
GOOD, BAD = "good@outage.test", "bad@outage.test"


def learn(daemon) -> None:  # type: ignore[no-untyped-def]
    good, bad = ask(daemon, GOOD, BAD)
    assert good.action == "continue", show(good)
    assert is_invalid(bad), show(bad)


def assert_served_from_cache(daemon) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    good, bad, unknown = ask(daemon, GOOD, BAD, f"new{time.monotonic_ns()}@outage.test")
    elapsed = time.monotonic() - started
    assert is_tempfail(unknown), f"the backend should be down: {show(unknown)}"
    assert good.action == "continue", f"known-good user during the outage: {show(good)}"
    assert is_invalid(bad), f"known-bad user during the outage: {show(bad)}"
    assert elapsed < 1.5, f"delayed by the outage: {elapsed:.2f} s for three recipients"


def test_outage_serves_entries_past_their_ttl_and_with_the_backend_up_verifies_afresh(daemons):
    backend = RestartableBackend(users={GOOD}).start()
    try:
        daemon = daemons(conf({"outage.test": backend.port}, OUTAGE_CONF))
        learn(daemon)
        backend.stop()
        time.sleep(TTL + 0.6)                       # past the TTL, well inside BackStaleGrace
        assert_served_from_cache(daemon)
        backend.clear()
        backend.start()                              # back: stale entries are verified afresh
        good, bad = ask(daemon, GOOD, BAD)
        assert good.action == "continue" and is_invalid(bad), (show(good), show(bad))
        assert f"RCPT TO:<{GOOD}>" in backend.transcript, backend.transcript
        assert f"RCPT TO:<{BAD}>" in backend.transcript, backend.transcript
    finally:
        backend.stop()


def test_stale_entries_are_saved_and_survive_a_restart_during_the_outage(daemons):
    backend = RestartableBackend(users={GOOD}).start()
    try:
        daemon = daemons(conf({"outage.test": backend.port}, OUTAGE_CONF))
        learn(daemon)
        backend.stop()
        time.sleep(TTL + 0.6)
        code, elapsed = daemon.signal_and_wait(signal.SIGTERM)             # SIGTERM: saved at exit
        assert code == 0, f"exit {code} after {elapsed:.1f} s"
        entries = cache_entries(daemon.cachefile)
        assert entries.get(GOOD) == "0" and entries.get(BAD) == "1", entries
        daemon.start()                                         # the backend is still down
        assert_served_from_cache(daemon)
    finally:
        backend.stop()


def test_stale_entries_are_not_served_past_back_stale_grace(daemons):
    backend = RestartableBackend(users={GOOD}).start()
    try:
        daemon = daemons(conf({"outage.test": backend.port}, OUTAGE_CONF + "BackStaleGrace: 1\n"))
        learn(daemon)
        backend.stop()
        time.sleep(TTL + 1 + 0.8)                   # past TTL + BackStaleGrace
        good, bad = ask(daemon, GOOD, BAD)
        assert is_tempfail(good), show(good)
        assert is_tempfail(bad), show(bad)
    finally:
        backend.stop()


def test_original_cache_file_is_served_during_an_outage_from_the_start(daemons):
    """A restart while the backend is down, from the original's two-field format."""
    def prepare(d) -> None:  # type: ignore[no-untyped-def]
        with open(d.cachefile, "w") as handle:
            handle.write(f"0 {GOOD}\n1 {BAD}\n")
    daemon = daemons(conf({"outage.test": refused_port()}, OUTAGE_CONF.replace(
        f"BackValidAddrExp: {TTL}\nBackInvalidAddrExp: {TTL}\n", "")), prepare=prepare)
    assert_served_from_cache(daemon)


