"""Issue 4 defences in-process: probe gate, backoff counts, stale answers, attack and loop rules."""

from __future__ import annotations

import threading
import time

import Milter

from scam_back.cache import VerdictCache
from scam_back.health import Backoff
from scam_back.probes import ProbeGate
from scam_back.verdict import Kind, Verdict

from .conftest import backend_conf, make_verifier
from .test_milter import rcpt, start


def test_concurrent_asks_for_one_address_share_one_probe():
    gate = ProbeGate(20)
    calls, results = [], []
    release = threading.Event()

    def probe() -> Verdict:
        calls.append(1)
        release.wait(5)
        return Verdict(Kind.INVALID, "backend")
    threads = [threading.Thread(target=lambda: results.append(
        gate.run("a@x", time.monotonic() + 5, probe))) for _ in range(10)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(calls) == 1
    assert [r.kind for r in results] == [Kind.INVALID] * 10


def test_probes_in_flight_are_capped():
    gate = ProbeGate(2)
    running, peak, lock = [0], [0], threading.Lock()

    def probe() -> Verdict:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.1)
        with lock:
            running[0] -= 1
        return Verdict(Kind.VALID, "backend")
    threads = [threading.Thread(target=gate.run, args=(f"u{n}@x", time.monotonic() + 5, probe))
               for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert peak[0] == 2


def test_a_probe_that_cannot_get_a_slot_in_time_is_trouble():
    gate = ProbeGate(1)
    hold = threading.Event()
    first = threading.Thread(target=gate.run, args=("a@x", time.monotonic() + 5,
                                                    lambda: hold.wait(5) and Verdict(Kind.VALID)))
    first.start()
    time.sleep(0.05)
    verdict = gate.run("b@x", time.monotonic() + 0.2, lambda: Verdict(Kind.VALID))
    hold.set()
    first.join(5)
    assert verdict.kind is Kind.TROUBLE and "BackMaxProbes" in verdict.reply


def test_backoff_starts_after_the_configured_failures_in_a_row():
    now = [0.0]
    backoff = Backoff(60, 3, lambda: now[0])
    key = ("192.0.2.1", 25)
    for _ in range(2):
        backoff.failed(key, "x", "refused")
        assert not backoff.blocked(key)
    backoff.failed(key, "x", "refused")
    assert backoff.blocked(key)
    now[0] += 61
    assert not backoff.blocked(key)
    backoff.succeeded(key, "x")
    backoff.failed(key, "x", "refused")
    assert not backoff.blocked(key)


def test_stale_entry_answers_only_while_the_backend_is_down(backend):
    now = [1000.0]
    cache = VerdictCache(10, 10, clock=lambda: now[0], stale_grace=3600)
    verifier = make_verifier(backend_conf(backend, "BackSMTPBackoff: 0\n"), cache)
    assert verifier.verify("bad@example.net").kind is Kind.INVALID
    now[0] += 60                                    # past the TTL, within the grace
    backend.set_rcpt_reply("bad@example.net", "451 4.3.0 try later")
    verdict = verifier.verify("bad@example.net")
    assert (verdict.kind, verdict.source) == (Kind.INVALID, "stale-cache")
    backend.set_rcpt_reply("bad@example.net", None)
    backend.users.add("bad@example.net")            # the backend is back, and changed its mind
    verdict = verifier.verify("bad@example.net")
    assert (verdict.kind, verdict.source) == (Kind.VALID, "backend")


def test_dictionary_attack_is_slowed_then_refused_with_421(backend, milter_ctx, monkeypatch):
    slept = []
    monkeypatch.setattr("scam_back.milter.time.sleep", slept.append)
    ctx = milter_ctx(make_verifier(backend_conf(backend, "BackMaxInvalidPerConnection: 4\n")))
    start(ctx)
    for n in range(4):
        assert rcpt(ctx, f"nobody{n}@example.net") == Milter.REJECT
    assert rcpt(ctx, "nobody9@example.net") == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("421", "4.7.0")
    assert slept == [0.25, 0.5]


def test_probe_senders_transactions_are_not_verified(backend, milter_ctx):
    ctx = milter_ctx(make_verifier(backend_conf(backend)))
    start(ctx)
    ctx._envfrom("<postmaster+backscatter@other-verifier.example>")
    assert rcpt(ctx, "bad@example.net") == Milter.CONTINUE
    ctx._envfrom("<postmaster+backscatter@mx.test.example>")
    assert rcpt(ctx, "bad2@example.net") == Milter.CONTINUE
    assert backend.transcript == []
    ctx._envfrom("<someone@elsewhere.test>")
    assert rcpt(ctx, "bad@example.net") == Milter.REJECT
