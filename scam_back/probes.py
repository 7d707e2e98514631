"""ProbeGate: at most BackMaxProbes backend probes in flight, and one per address at a time."""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from .verdict import Kind, Verdict


class _Flight:
    """One probe in progress; askers for the same address wait for its verdict."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.verdict: Optional[Verdict] = None


class ProbeGate:
    """Caps concurrent probes and shares one probe among concurrent asks for the same address.

    A dictionary attack or a burst of new addresses then costs the backend at most max_probes
    sessions' work at a time, and 50 connections asking about one new address cost one RCPT.
    """

    def __init__(self, max_probes: int) -> None:
        self.max_probes = max_probes
        self._slots = threading.BoundedSemaphore(max_probes)
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()

    def run(self, key: str, deadline: float, probe: Callable[[], Verdict],
            then: Optional[Callable[[Verdict], Verdict]] = None) -> Verdict:
        """probe()'s verdict, or the verdict of the same key's probe already running; then(),
        if given, runs after the probe has given its slot back and before any waiter is told
        (what waits there, for a side probe say, must not hold a slot)."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        assert flight is not None
        if not leader:
            if flight.done.wait(max(0.0, deadline - time.monotonic())) and flight.verdict:
                shared = flight.verdict
                return shared._replace(source=f"{shared.source}-shared")
            return Verdict(Kind.TROUBLE, "backend", reply="another probe of this address is still "
                           "running at BackVerifyTimeout", why="verify timeout")
        try:
            if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                flight.verdict = Verdict(Kind.TROUBLE, "backend",
                                         reply="BackMaxProbes probes busy until BackVerifyTimeout",
                                         why="probe limit")
                return flight.verdict
            try:
                flight.verdict = probe()
            finally:
                self._slots.release()
            if then is not None:
                flight.verdict = then(flight.verdict)
            return flight.verdict
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
