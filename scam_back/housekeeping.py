"""Housekeeper: the daemon's periodic chores, in one thread that never takes the stop signals."""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from . import cache as cachemod
from . import cachefile
from .admin import Admin
from .pool import SessionPool
from .reload import Reloader
from .threads import start_quiet_thread

log = logging.getLogger("scam-back")


class Housekeeper:
    """Saves the cache every BackListSaveInterval seconds, closes idle backend sessions, notices
    changed config files and logs the statistics every StatsInterval, in a thread started with
    the stop signals blocked (libmilter's own thread must get them)."""

    REAP_EVERY = 2.0
    RELOAD_CHECK_EVERY = 3.0

    def __init__(self, cache: cachemod.VerdictCache, path: Optional[str], interval: int,
                 pool: Optional[SessionPool] = None, reloader: Optional[Reloader] = None,
                 admin: Optional[Admin] = None, stats_interval: int = 0) -> None:
        self.cache, self.path, self.interval, self.pool = cache, path, interval, pool
        self.reloader, self.admin, self.stats_interval = reloader, admin, stats_interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = start_quiet_thread(self._run, "housekeeper")

    def _run(self) -> None:
        saving = bool(self.path) and self.interval > 0
        start = time.monotonic()
        next_save = start + self.interval if saving else float("inf")
        next_reap = start + self.REAP_EVERY
        logging_stats = self.admin is not None and self.stats_interval > 0
        next_stats = start + self.stats_interval if logging_stats else float("inf")
        while not self._stop.wait(max(0.01, min(next_save, next_reap, next_stats) - time.monotonic())):
            try:
                next_save, next_reap, next_stats = self._chores(next_save, next_reap, next_stats)
            except Exception:
                # One failing chore must not end the others (saves, reaping, reloads); each
                # is tried again at its next turn.
                log.exception("internal error in the periodic chores; they go on")
                now = time.monotonic()
                next_save = max(next_save, now + self.REAP_EVERY)
                next_reap = max(next_reap, now + self.REAP_EVERY)
                next_stats = max(next_stats, now + self.REAP_EVERY)

    def _chores(self, next_save: float, next_reap: float,
                next_stats: float) -> tuple[float, float, float]:
        """Do whatever is due; returns the next due times."""
        now = time.monotonic()
        if now >= next_reap:
            next_reap = now + min(self.REAP_EVERY, self.RELOAD_CHECK_EVERY)
            if self.pool is not None:
                self.pool.reap()
            if self.reloader is not None:
                self.reloader.check()
        if now >= next_stats and self.admin is not None:
            next_stats = now + self.stats_interval
            self.admin.log_summary()
        if now >= next_save:
            next_save = now + self.interval       # set first: a failing save is not retried at once
            cachefile.save_file(self.cache, self.path, serving=True)
            next_save = time.monotonic() + self.interval
        return next_save, next_reap, next_stats

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
