"""Refresher: probes that run in the background, after the client has its answer: refreshes of
valid entries near the end of their TTL (so an address in use never drops out of the cache),
and accept-all checks."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from .threads import start_quiet_thread

log = logging.getLogger("scam-back")

MAX_PENDING = 10_000        # refreshes waiting; past this, the entry is simply asked for later
WORKERS = 2                 # refreshes in flight (each also takes a BackMaxProbes slot)
REST = 60.0                 # seconds before a key whose job failed is tried again
SETTLE = 5.0                # seconds before an address just refreshed can be queued again


class Refresher:
    """A bounded queue of background probes, each key at most once at a time, and its workers."""

    def __init__(self, refresh: Callable[[str], bool], workers: int = WORKERS,
                 max_pending: int = MAX_PENDING, clock: Callable[[], float] = time.monotonic) -> None:
        self._refresh, self.workers, self.max_pending = refresh, workers, max_pending
        self._queue: "collections.deque[tuple[str, Callable[[], object], float]]" = \
            collections.deque()
        self._pending: set[str] = set()
        # Keys whose job failed (a backend in trouble): not asked again until then, or every hit
        # on a due entry would probe a backend that cannot answer. Refreshes just done rest a
        # few seconds too: a thread that read the old entry as the job stored the new one would
        # ask again.
        self._resting: dict[str, float] = {}
        self.clock = clock
        self._cond = threading.Condition()
        self._busy = 0
        self._started = False
        self._stopped = False

    def due(self, raw: str) -> bool:
        """Ask for a refresh of an RCPT address; False if it is already queued or the queue is full."""
        return self.submit(raw, lambda: self._refresh(raw), settle=SETTLE)

    def submit(self, key: str, job: Callable[[], object], settle: float = 0.0) -> bool:
        """Run job in the background unless one with this key is queued, running or resting
        after a failure (job returned False), or for `settle` seconds after a success."""
        with self._cond:
            if key in self._pending or len(self._pending) >= self.max_pending or self._stopped:
                return False
            until = self._resting.get(key)
            if until is not None:
                if self.clock() < until:
                    return False
                del self._resting[key]
            self._pending.add(key)
            self._queue.append((key, job, settle))
            if not self._started:
                self._started = True
                for number in range(self.workers):
                    start_quiet_thread(self._run, f"refresh-{number}")
            self._cond.notify()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                key, job, settle = self._queue.popleft()
                self._busy += 1
            done = False
            try:
                done = job() is not False
            except Exception:
                log.exception("internal error in background probe %s; cached entries are kept", key)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._pending.discard(key)
                    rest = settle if done else REST
                    if rest:
                        self._rest(key, rest)
                    self._cond.notify_all()

    def _rest(self, key: str, seconds: float) -> None:
        """Hold key back for seconds (under the lock); when the table is full, rests that are
        over go first, so a flood of refreshes cannot cut a failed key's rest short."""
        now = self.clock()
        if len(self._resting) >= self.max_pending:
            self._resting = {k: until for k, until in self._resting.items() if until > now}
            if len(self._resting) >= self.max_pending:
                self._resting.clear()
        self._resting[key] = now + seconds

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or running (tests, shutdown); True if so in time."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._pending.clear()
            self._cond.notify_all()
