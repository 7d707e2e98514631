"""Background refresh, a confirmed 5xx before a valid address turns invalid, accept-all detection:
a real backend whose answers the test changes, and an injected clock for the cache."""

from __future__ import annotations

import os
import stat
import time

import pytest

from scam_back import catchall
from scam_back.cache import VerdictCache
from scam_back.verdict import Kind

from .conftest import backend_conf, make_verifier
from .smtpbackend import Backend

VALID_TTL, INVALID_TTL = 1000, 100
UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown"


def rcpts(backend: Backend, address: str) -> int:
    return sum(1 for line in list(backend.transcript) if line.lower() == f"rcpt to:<{address}>")


def check_rcpts(backend: Backend) -> list[str]:
    return [line for line in list(backend.transcript) if "scam-back-check-" in line]


@pytest.fixture
def clock():
    return [1000.0]


@pytest.fixture
def verifier(backend, clock):
    cache = VerdictCache(VALID_TTL, INVALID_TTL, clock=lambda: clock[0], stale_grace=5000)
    made = make_verifier(backend_conf(backend), cache)
    yield made
    made.refresher.stop()


def scripted(backend: Backend, replies: list[str]) -> None:
    """The backend answers RCPTs with these replies in turn, then as its users say."""
    queue = list(replies)
    normal = Backend.rcpt_reply_for.__get__(backend)
    backend.rcpt_reply_for = lambda address: queue.pop(0) if queue else normal(address)


# ---- background refresh ----

def test_a_valid_entry_near_expiry_is_refreshed_after_the_answer(verifier, backend, clock):
    assert verifier.verify("<good@example.net>").source == "backend"
    clock[0] += VALID_TTL * 0.85                  # 15 % left: not due
    assert verifier.verify("<good@example.net>").source == "cache"
    assert verifier.refresher.wait_idle(5)
    assert rcpts(backend, "good@example.net") == 1
    clock[0] += VALID_TTL * 0.1                   # 5 % left: due
    answer = verifier.verify("<good@example.net>")
    assert (answer.kind, answer.source) == (Kind.VALID, "cache")      # the client did not wait
    assert verifier.refresher.wait_idle(5)
    assert rcpts(backend, "good@example.net") == 2
    assert verifier.cache.peek("good@example.net").expires_in == pytest.approx(VALID_TTL)
    assert verifier.stats.group("refresh") == {"valid": 1}


def test_many_uses_of_a_due_entry_cost_one_refresh(verifier, backend, clock):
    verifier.verify("<good@example.net>")
    clock[0] += VALID_TTL * 0.95
    for _ in range(20):
        verifier.verify("<good@example.net>")
    assert verifier.refresher.wait_idle(5)
    assert rcpts(backend, "good@example.net") == 2


def test_an_address_just_refreshed_is_not_queued_again_by_a_late_asker(verifier, backend, clock):
    """A thread that read the old, due entry just before the refresh stored the new one asks
    for a refresh after it is done: that must not cost the backend a second RCPT."""
    verifier.verify("<good@example.net>")
    clock[0] += VALID_TTL * 0.95
    verifier.verify("<good@example.net>")
    assert verifier.refresher.wait_idle(5)
    assert verifier.refresher.due("<good@example.net>") is False
    assert verifier.refresher.wait_idle(5)
    assert rcpts(backend, "good@example.net") == 2


def test_a_4xx_refresh_keeps_the_old_entry(verifier, backend, clock):
    verifier.verify("<good@example.net>")
    clock[0] += VALID_TTL * 0.95
    backend.set_rcpt_reply("good@example.net", "451 4.3.0 mailbox store offline")
    verifier.verify("<good@example.net>")
    assert verifier.refresher.wait_idle(5)
    hit = verifier.cache.peek("good@example.net")
    assert hit.valid and hit.expires_in == pytest.approx(VALID_TTL * 0.05)
    assert verifier.stats.group("refresh") == {"unverified": 1}


def test_a_dead_backend_during_refresh_keeps_the_old_entry(verifier, backend, clock):
    verifier.verify("<good@example.net>")
    clock[0] += VALID_TTL * 0.95
    backend.stop()
    verifier.pool.close()
    verifier.verify("<good@example.net>")
    assert verifier.refresher.wait_idle(10)
    assert verifier.cache.peek("good@example.net").valid


def test_a_single_5xx_on_refresh_is_asked_again_and_not_believed(verifier, backend, clock):
    verifier.verify("<good@example.net>")
    clock[0] += VALID_TTL * 0.95
    scripted(backend, [UNKNOWN.format("good@example.net")])        # one glitch, then 250
    verifier.verify("<good@example.net>")
    assert verifier.refresher.wait_idle(5)
    assert rcpts(backend, "good@example.net") == 3
    hit = verifier.cache.peek("good@example.net")
    assert hit.valid and hit.expires_in == pytest.approx(VALID_TTL)
    assert verifier.stats.group("recheck") == {"valid": 1}


def test_a_confirmed_5xx_on_refresh_turns_the_entry_invalid(verifier, backend, clock):
    verifier.verify("<good@example.net>")
    clock[0] += VALID_TTL * 0.95
    backend.set_users(set())                       # the user is gone for good
    verifier.verify("<good@example.net>")
    assert verifier.refresher.wait_idle(5)
    assert rcpts(backend, "good@example.net") == 3
    assert not verifier.cache.peek("good@example.net").valid
    assert verifier.verify("<good@example.net>").kind is Kind.INVALID
    assert verifier.stats.group("recheck") == {"confirmed": 1}


def test_a_single_5xx_after_expiry_of_a_recent_valid_entry_is_confirmed(verifier, backend, clock):
    verifier.verify("<good@example.net>")
    clock[0] += VALID_TTL + 10                     # stale (within BackStaleGrace): valid recently
    scripted(backend, [UNKNOWN.format("good@example.net")])
    answer = verifier.verify("<good@example.net>")
    assert answer.kind is Kind.VALID and answer.source == "backend"
    assert rcpts(backend, "good@example.net") == 3


def test_a_5xx_for_a_never_seen_address_needs_no_second_probe(verifier, backend):
    assert verifier.verify("<nobody@example.net>").kind is Kind.INVALID
    assert rcpts(backend, "nobody@example.net") == 1


def test_a_5xx_then_trouble_keeps_a_recent_valid_entry_answering(verifier, backend, clock):
    verifier.verify("<good@example.net>")
    clock[0] += VALID_TTL + 10
    scripted(backend, [UNKNOWN.format("good@example.net"), "451 4.3.0 busy"])
    answer = verifier.verify("<good@example.net>")
    assert (answer.kind, answer.source) == (Kind.VALID, "stale-cache")


# ---- accept-all detection ----

@pytest.fixture
def accept_all_verifier(clock):
    made = []

    def make(backend: Backend, clock, interval: int = 600, extra: str = ""):
        cache = VerdictCache(VALID_TTL, INVALID_TTL, clock=lambda: clock[0])
        verifier = make_verifier(backend_conf(backend) + f"BackCatchAllCheck: {interval}\n" + extra,
                                 cache)
        verifier.catchall.clock = lambda: clock[0]
        made.append(verifier)
        return verifier
    yield make
    for verifier in made:
        verifier.refresher.stop()


def test_a_backend_that_accepts_all_gets_no_cached_positives(backend, clock, accept_all_verifier, caplog):
    backend.rcpt_reply_for = lambda address: "250 2.1.5 OK"       # accepts anything
    verifier = accept_all_verifier(backend, clock)
    assert verifier.verify("<anyone@example.net>").source == "backend"
    assert verifier.cache.peek("anyone@example.net") is None      # the first positive too
    for _ in range(2):
        answer = verifier.verify("<anyone@example.net>")
        assert (answer.kind, answer.source) == (Kind.VALID, "backend")
    assert rcpts(backend, "anyone@example.net") == 3              # never answered from cache
    assert len(check_rcpts(backend)) == 1
    assert verifier.cache.peek("anyone@example.net") is None
    warnings = [r.getMessage() for r in caplog.records if "accepts every address" in r.getMessage()]
    assert len(warnings) == 1 and "example.net" in warnings[0]
    assert "ACCEPTS ALL" in verifier.catchall.describe("example.net", verifier.router.route(
        "example.net").label)


def test_a_normal_backend_is_checked_once_per_interval_whatever_the_traffic(backend, clock, accept_all_verifier):
    verifier = accept_all_verifier(backend, clock, interval=600)
    for number in range(30):
        verifier.verify(f"<user{number}@example.net>")
    assert verifier.refresher.wait_idle(5)
    assert len(check_rcpts(backend)) == 1
    assert verifier.verify("<good@example.net>").source == "backend"
    assert verifier.verify("<good@example.net>").source == "cache"       # positives cached
    clock[0] += 601
    verifier.verify("<new@example.net>")
    assert verifier.refresher.wait_idle(5)
    assert len(check_rcpts(backend)) == 2
    label = verifier.router.route("example.net").label
    assert verifier.catchall.describe("example.net", label).startswith("no: rejects unknown")


def test_with_one_probe_slot_a_positive_waits_for_its_check_without_deadlock(
        backend, clock, accept_all_verifier):
    """The check is a probe under BackMaxProbes; the probe it runs beside gives its slot back
    before it waits for the check, so with one slot neither waits out BackVerifyTimeout."""
    verifier = accept_all_verifier(backend, clock, extra="BackMaxProbes: 1\nBackVerifyTimeout: 5\n")
    started = time.monotonic()
    verdict = verifier.verify("<good@example.net>")
    elapsed = time.monotonic() - started
    assert verdict.kind is Kind.VALID and verdict.source == "backend"
    assert elapsed < 4, f"waited {elapsed:.1f} s: the check could not get the probe slot"
    assert len(check_rcpts(backend)) == 1
    label = verifier.router.route("example.net").label
    assert verifier.catchall.describe("example.net", label).startswith("no: rejects unknown")
    assert verifier.cache.peek("good@example.net").valid


def test_check_probes_are_unguessable_and_recognisably_ours(backend, clock, accept_all_verifier):
    verifier = accept_all_verifier(backend, clock)
    verifier.verify("<x@example.net>")
    assert verifier.refresher.wait_idle(5)
    probe = check_rcpts(backend)[0].split("<", 1)[1].rstrip(">")
    assert verifier.catchall.is_ours(probe)
    other = catchall.AcceptAllCheck(b"another secret 123", 600)
    assert not other.is_ours(probe)
    assert probe != verifier.catchall.probe_address("example.net")


def test_detection_drops_positives_cached_before_it(backend, clock, accept_all_verifier):
    verifier = accept_all_verifier(backend, clock, interval=600)
    verifier.verify("<good@example.net>")                 # checked: normal backend
    assert verifier.refresher.wait_idle(5)
    assert verifier.cache.peek("good@example.net").valid
    backend.rcpt_reply_for = lambda address: "250 2.1.5 OK"
    clock[0] += 601
    verifier.verify("<someone@example.net>")               # next check: accepts all now
    assert verifier.refresher.wait_idle(5)
    assert verifier.cache.peek("good@example.net") is None
    assert verifier.cache.peek("someone@example.net") is None


def test_secret_is_made_once_beside_the_cache_file_mode_0600(tmp_path):
    cache_file = str(tmp_path / "backscatter.txt")
    first = catchall.load_secret(cache_file)
    path = tmp_path / catchall.SECRET_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert catchall.load_secret(cache_file) == first and len(first) == 32
    path.write_text("garbage\n")
    assert catchall.load_secret(cache_file) != first


def test_a_check_that_could_not_start_is_tried_at_the_next_probe():
    check = catchall.AcceptAllCheck(b"k" * 32, 600, clock=lambda: 0.0)
    assert check.due("example.net", "b:25") is not None
    assert check.due("example.net", "b:25") is None          # begun: nobody else probes
    check.cancel("example.net", "b:25")
    assert check.due("example.net", "b:25") is not None


def test_a_check_that_got_no_verdict_is_made_again_after_a_minute_not_hours():
    from scam_back.verdict import Verdict
    now = [0.0]
    check = catchall.AcceptAllCheck(b"k" * 32, 21600, clock=lambda: now[0])
    probe = check.due("example.net", "b:25")
    check.found("example.net", "b:25", probe, Verdict(Kind.TROUBLE, "backend", reply="refused"))
    now[0] += 30
    assert check.due("example.net", "b:25") is None
    now[0] += catchall.NO_ANSWER_RETRY
    probe = check.due("example.net", "b:25")
    assert probe is not None
    check.found("example.net", "b:25", probe, Verdict(Kind.INVALID, "backend", reply="550"))
    now[0] += catchall.NO_ANSWER_RETRY * 2
    assert check.due("example.net", "b:25") is None          # answered: not before 6 h


def test_a_failed_background_probe_rests_before_it_is_tried_again():
    from scam_back.refresh import REST, Refresher
    now = [0.0]
    calls = []

    def job() -> bool:
        calls.append(1)
        return False
    refresher = Refresher(lambda raw: True, clock=lambda: now[0])
    try:
        assert refresher.submit("k", job)
        assert refresher.wait_idle(5)
        assert not refresher.submit("k", job)          # resting: the backend is in trouble
        now[0] += REST + 1
        assert refresher.submit("k", job)
        assert refresher.wait_idle(5)
        assert len(calls) == 2
    finally:
        refresher.stop()


def test_a_full_rest_table_drops_finished_rests_before_a_failed_key_loses_its_own():
    from scam_back.refresh import REST, SETTLE, Refresher
    now = [0.0]
    refresher = Refresher(lambda raw: True, max_pending=4, clock=lambda: now[0])
    try:
        assert refresher.submit("down", lambda: False)
        assert refresher.wait_idle(5)
        now[0] += SETTLE + 1
        for number in range(6):                       # refreshes that succeed fill the table
            assert refresher.due(f"ok{number}@example.net")
            assert refresher.wait_idle(5)
            now[0] += SETTLE + 1
        assert now[0] < REST
        assert not refresher.submit("down", lambda: False)     # still resting
    finally:
        refresher.stop()


def test_a_flood_of_subdomains_costs_one_accept_all_check(backend, clock, accept_all_verifier):
    verifier = accept_all_verifier(backend, clock)
    verifier.router.subdomains = True
    for number in range(20):
        verifier.verify(f"<someone@r{number}.example.net>")
    assert verifier.refresher.wait_idle(5)
    assert len(check_rcpts(backend)) == 1


def test_an_empty_domain_never_flushes_everything(tmp_path):
    cache = VerdictCache(60, 60)
    cache.put("a@example.net", True)
    with pytest.raises(ValueError):
        cache.drop_where(domain="")
    assert len(cache) == 1


def test_through_the_daemon_an_accept_all_backend_is_asked_every_time(daemon_factory):
    """The real daemon: a backend that accepts anything is flagged at the first probe; its
    positives are never answered from the cache; the warning is logged once."""
    from .faults.conftest import ask, verdict_lines
    with Backend() as backend:
        backend.rcpt_reply_for = lambda address: "250 2.1.5 OK"
        daemon = daemon_factory(backend_conf(backend, "BackCatchAllCheck: 600\n"))
        for _ in range(3):
            replies = ask(daemon, "anyone@example.net")
            assert replies[0].action == "continue", replies
        assert rcpts(backend, "anyone@example.net") == 3
        assert len(check_rcpts(backend)) == 1
        lines = verdict_lines(daemon, "anyone@example.net")
        assert len(lines) == 3 and all("source=backend" in line for line in lines), lines
        assert daemon.log().count("accepts every address in example.net") == 1
