"""Prometheus text exposition (StatsListen) of the same counters `scam-back-ctl stats` shows."""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .stats import DECISIONS


class StatsCollector(Collector):
    """Reads a stats snapshot on each scrape: nothing is counted twice, nothing goes stale."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator:  # type: ignore[override]
        snap = self.snapshot()
        recipients = CounterMetricFamily("scam_back_recipients", "Recipients decided, by verdict "
                                         "and by its source or reason", labels=["verdict", "reason"])
        for verdict in DECISIONS:
            for reason, value in snap[verdict].items():
                recipients.add_metric([verdict, reason], value)
        yield recipients
        lookups = CounterMetricFamily("scam_back_cache_lookups", "Cache lookups by result",
                                      labels=["cache", "result"])
        cache = snap["cache"]
        for where, result, key in (("local", "hit", "hits"), ("local", "miss", "misses"),
                                   ("shared", "hit", "shared_hits"), ("shared", "miss", "shared_misses"),
                                   ("shared", "error", "shared_errors")):
            lookups.add_metric([where, result], cache[key])
        yield lookups
        yield _by_one_label(CounterMetricFamily, "scam_back_connections_skipped",
                            "MTA connections not verified, by rule", "reason",
                            snap["connections_skipped"])
        yield _by_one_label(CounterMetricFamily, "scam_back_backend_probes",
                            "RCPT probes sent to backends", "backend", snap["probes"])
        errors = CounterMetricFamily("scam_back_backend_errors", "Backend failures by kind",
                                     labels=["backend", "kind"])
        for label, value in snap["backend_errors"].items():
            backend, _, kind = label.rpartition(" ")
            errors.add_metric([backend, kind], value)
        yield errors
        latency = GaugeMetricFamily("scam_back_probe_latency_ms", "Probe round trip over the "
                                    "latest probes, by backend and quantile",
                                    labels=["backend", "quantile"])
        for backend, figures in snap["latency_ms"].items():
            for name in ("p50", "p90", "p99", "max"):
                latency.add_metric([backend, name], figures[name])
        yield latency
        for name, key, what in (("refreshes", "refreshes", "Background refreshes of valid "
                                 "entries near expiry, by result"),
                                ("rechecks", "rechecks", "Second probes after a 5xx for an "
                                 "address that was valid, by result"),
                                ("accept_all_checks", "accept_all_checks", "Probes of an address "
                                 "that cannot exist, by result")):
            yield _by_one_label(CounterMetricFamily, f"scam_back_{name}", what, "result", snap[key])
        accepts = GaugeMetricFamily("scam_back_backend_accepts_all", "1 if the backend accepted "
                                    "an address that cannot exist", labels=["domain", "backend"])
        for name, state in snap.get("accept_all", {}).items():
            domain, _, backend = name.partition(" at ")
            accepts.add_metric([domain, backend], 1.0 if state.startswith("ACCEPTS ALL") else 0.0)
        yield accepts
        yield _by_one_label(GaugeMetricFamily, "scam_back_cache_entries",
                            "Entries in the local cache", "verdict", snap["cache_entries"])
        up = GaugeMetricFamily("scam_back_backend_up", "1 if a backend address is answering, "
                               "0 while it fails or is skipped", labels=["backend"])
        for backend, state in snap["backends"].items():
            up.add_metric([backend], 1.0 if state == "up" else 0.0)
        yield up
        if snap["shared_cache"] is not None:
            yield GaugeMetricFamily("scam_back_shared_cache_up", "1 while Redis answers",
                                    value=1.0 if snap["shared_cache"]["up"] else 0.0)
        yield GaugeMetricFamily("scam_back_uptime_seconds", "Seconds since start",
                                value=snap["uptime"])


def _by_one_label(family: type, name: str, documentation: str, label: str,
                  values: dict):  # type: ignore[no-untyped-def]
    """A metric family with one sample per key of values."""
    metric = family(name, documentation, labels=[label])
    for key, value in values.items():
        metric.add_metric([key], value)
    return metric


def serve(host: str, port: int, snapshot: Callable[[], dict]):  # type: ignore[no-untyped-def]
    """Start the exposition server in a background thread; returns the server (shutdown())."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(snapshot))
    server, _ = start_http_server(port, host, registry)
    return server
