"""Statistics: counters that lose no count under threads, the snapshot, the reports, Prometheus."""

from __future__ import annotations

import threading

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from scam_back.cache import VerdictCache
from scam_back.metrics import StatsCollector
from scam_back.stats import Counter, Stats, percentile, report, summary_line

from .conftest import backend_conf, make_verifier
from .smtpbackend import refused_port


def test_counter_loses_no_bump_under_eight_threads():
    counter = Counter()

    def bump() -> None:
        for _ in range(20_000):
            counter.bump()
    threads = [threading.Thread(target=bump) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert counter.value == 160_000


def test_percentile_is_nearest_rank():
    values = sorted(float(v) for v in range(1, 101))
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (50, 99, 100)
    assert percentile([7.0], 0.99) == 7.0


def test_snapshot_groups_and_totals():
    stats = Stats(clock=lambda: 100.0)
    for group, label, times in (("valid", "cache", 3), ("valid", "backend", 2), ("invalid", "backend", 1),
                                ("skipped", "domain not routed", 4), ("unverified", "timeout", 1),
                                ("cache", "miss", 4), ("probes", "b:25", 4)):
        for _ in range(times):
            stats.count(group, label)
    stats.latency("b:25", 2.0)
    stats.latency("b:25", 4.0)
    snap = stats.snapshot()
    assert snap["recipients"] == 11
    assert snap["valid"] == {"backend": 2, "cache": 3}
    assert snap["cache"]["hits"] == 3 and snap["cache"]["misses"] == 4
    assert snap["latency_ms"]["b:25"]["samples"] == 2 and snap["latency_ms"]["b:25"]["max"] == 4.0
    line = summary_line(snap)
    assert "recipients=11 valid=5 invalid=1 skipped=4 unverified=1" in line
    text = "\n".join(report(snap))
    assert "  domain not routed: 4" in text and "  timeout: 1" in text


def test_counters_never_bumped_are_not_reported():
    stats = Stats()
    stats.counter("valid", "cache")
    assert stats.group("valid") == {}


def test_verifier_counts_every_kind_of_decision(backend):
    dead = refused_port()
    verifier = make_verifier(backend_conf(backend) + f"BackSMTPPort: {dead}\nBackSMTPServer: 127.0.0.1\n"
                             "BackAddrDomain: dead.test\n")
    for raw in ("<good@example.net>", "<good@example.net>", "<bad@example.net>", "<x@nowhere.test>",
                "<postmaster@example.net>", "<a b@example.net>", "<u@dead.test>"):
        verifier.verify(raw)
    snap = verifier.stats.snapshot()
    assert snap["valid"] == {"backend": 1, "cache": 1}
    assert snap["invalid"] == {"backend": 1, "syntax": 1}
    assert snap["skipped"] == {"BackSkipRecipient": 1, "domain not routed": 1}
    assert snap["unverified"] == {"connect": 1}
    assert snap["recipients"] == 7
    assert snap["cache"]["misses"] == 3
    assert sum(snap["probes"].values()) == 2
    assert any(label.endswith(" connect") for label in snap["backend_errors"])
    assert snap["latency_ms"] and all(f["samples"] >= 1 for f in snap["latency_ms"].values())


def test_skipped_connections_are_counted_by_rule(backend):
    verifier = make_verifier(backend_conf(backend) + "BackSkipVerify: 192.0.2.0/24\n")
    assert verifier.skip_client("192.0.2.7", "MTA")
    assert verifier.skip_client("192.0.2.7", "MTA")
    assert not verifier.skip_client("198.51.100.1", "MTA")
    assert verifier.stats.group("connection-skipped") == {"BackSkipVerify": 2}


def test_prometheus_exposition_carries_the_counters(backend):
    verifier = make_verifier(backend_conf(backend), VerdictCache(60, 60))
    for raw in ("<good@example.net>", "<good@example.net>", "<bad@example.net>"):
        verifier.verify(raw)
    snap = verifier.stats.snapshot()
    snap.update(cache_entries={"valid": 1, "invalid": 1}, backends={"127.0.0.1:1": "up"},
                shared_cache=None, dry_run=False)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(lambda: snap))
    text = generate_latest(registry).decode()
    assert 'scam_back_recipients_total{reason="cache",verdict="valid"} 1.0' in text
    assert 'scam_back_recipients_total{reason="backend",verdict="invalid"} 1.0' in text
    assert 'scam_back_cache_lookups_total{cache="local",result="miss"} 2.0' in text
    assert 'scam_back_backend_up{backend="127.0.0.1:1"} 1.0' in text


def test_backends_that_fail_show_in_the_state_even_without_backoff():
    from scam_back.health import Backoff
    backoff = Backoff(0, 1, lambda: 0.0)
    backoff.failed(("127.0.0.1", 1), "127.0.0.1:1", "refused")
    assert not backoff.blocked(("127.0.0.1", 1))
    assert backoff.states() == {"127.0.0.1:1": "1 failed connects in a row"}
    backoff.succeeded(("127.0.0.1", 1), "127.0.0.1:1")
    assert backoff.states() == {"127.0.0.1:1": "up"}
