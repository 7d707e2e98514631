"""Stats: counters since start (decisions, cache, backend probes and errors), cheap enough for the
hot path, and probe latency percentiles per backend."""

from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from typing import Callable, Iterable

# Decision groups; a recipient seen is counted in exactly one of them.
DECISIONS = ("valid", "invalid", "skipped", "unverified")
LATENCY_SAMPLES = 1000      # the latest probe latencies kept per backend


class Counter:
    """A counter whose bump is one C call (itertools.count.__next__): atomic under the GIL."""

    __slots__ = ("_count", "bump")

    def __init__(self) -> None:
        self._count = itertools.count()
        self.bump: Callable[[], int] = self._count.__next__

    @property
    def value(self) -> int:
        return int(repr(self._count)[6:-1])      # "count(N)"


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of an already sorted, non-empty list."""
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


class Stats:
    """Counters keyed by (group, label), created on first use, never reset while running."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.started = clock()
        self._counters: dict[tuple[str, str], Counter] = {}
        self._latency: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def counter(self, group: str, label: str = "") -> Callable[[], int]:
        """The bump function of one counter (keep it: calling it is the cheapest count)."""
        key = (group, label)
        found = self._counters.get(key)
        if found is None:
            with self._lock:
                found = self._counters.setdefault(key, Counter())
        return found.bump

    def count(self, group: str, label: str = "") -> None:
        """Add one to a counter."""
        found = self._counters.get((group, label))
        (found.bump if found is not None else self.counter(group, label))()

    def latency(self, backend: str, ms: float) -> None:
        """Record one probe's round trip to a backend, in milliseconds."""
        samples = self._latency.get(backend)
        if samples is None:
            with self._lock:
                samples = self._latency.setdefault(backend, collections.deque(maxlen=LATENCY_SAMPLES))
        samples.append(ms)

    def value(self, group: str, label: str = "") -> int:
        """One counter's value (0 if it was never bumped)."""
        found = self._counters.get((group, label))
        return found.value if found is not None else 0

    def group(self, group: str) -> dict[str, int]:
        """Every counter of a group: label -> value."""
        with self._lock:
            items = [(label, c) for (g, label), c in self._counters.items() if g == group]
        values = {label: c.value for label, c in sorted(items)}
        return {label: value for label, value in values.items() if value}

    def total(self, group: str) -> int:
        return sum(self.group(group).values())

    def latencies(self) -> dict[str, dict[str, float]]:
        """Per backend: probes sampled and p50/p90/p99/max latency in ms over the latest ones."""
        with self._lock:
            items = [(backend, sorted(samples)) for backend, samples in self._latency.items()]
        return {backend: {"samples": len(values), "p50": percentile(values, 0.5),
                          "p90": percentile(values, 0.9), "p99": percentile(values, 0.99),
                          "max": values[-1]}
                for backend, values in sorted(items) if values}

    def snapshot(self) -> dict:
        """Everything, as plain data (for `stats --json`, the text report and Prometheus)."""
        decisions = {group: self.group(group) for group in DECISIONS}
        cache = self.group("cache")
        hits = decisions["valid"].get("cache", 0) + decisions["invalid"].get("cache", 0)
        return {
            "uptime": round(self.clock() - self.started, 1),
            "recipients": sum(sum(g.values()) for g in decisions.values()),
            **decisions,
            "cache": {"hits": hits, "misses": cache.get("miss", 0),
                      "shared_hits": cache.get("shared-hit", 0),
                      "shared_misses": cache.get("shared-miss", 0),
                      "shared_errors": cache.get("shared-error", 0)},
            "connections_skipped": self.group("connection-skipped"),
            "refreshes": self.group("refresh"),
            "rechecks": self.group("recheck"),
            "accept_all_checks": self.group("accept-all-checks"),
            "probes": self.group("probes"),
            "backend_errors": self.group("backend-errors"),
            "latency_ms": self.latencies(),
        }


def summary_line(snap: dict) -> str:
    """The periodic syslog line: the totals an admin looks at first."""
    def total(name: str) -> int:
        return sum(snap[name].values())
    return (f"stats: uptime={int(snap['uptime'])}s recipients={snap['recipients']} "
            f"valid={total('valid')} invalid={total('invalid')} skipped={total('skipped')} "
            f"unverified={total('unverified')} cache_hits={snap['cache']['hits']} "
            f"cache_misses={snap['cache']['misses']} probes={total('probes')} "
            f"backend_errors={total('backend_errors')}")


def report(snap: dict, extra: Iterable[str] = ()) -> list[str]:
    """`scam-back-ctl stats` as text lines, one counter per line, grouped."""
    lines = [f"uptime: {int(snap['uptime'])} s", f"recipients seen: {snap['recipients']}"]
    for name in DECISIONS + ("connections_skipped", "probes", "backend_errors", "refreshes",
                             "rechecks", "accept_all_checks"):
        counts = snap[name]
        lines.append(f"{name.replace('_', ' ')}: {sum(counts.values())}")
        lines.extend(f"  {label or '-'}: {value}" for label, value in counts.items())
    lines.append("cache: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in snap["cache"].items()))
    for backend, figures in snap["latency_ms"].items():
        lines.append(f"probe latency {backend}: " + ", ".join(
            f"{k} {v:g}" + ("" if k == "samples" else " ms") for k, v in figures.items()))
    lines.extend(extra)
    return lines
