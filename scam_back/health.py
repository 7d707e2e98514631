"""Per-backend-address health: after failed connects an address is skipped for a while."""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger("scam-back")


class Backoff:
    """Skip a backend address for BackSMTPBackoff seconds after BackSMTPBackoffFailures failed
    connects in a row; each address has its own count, the skip and the recovery are logged once."""

    def __init__(self, seconds: float, failures: int, clock: Callable[[], float]) -> None:
        self.seconds, self.failures, self.clock = seconds, max(1, failures), clock
        self._failed: dict[tuple[str, int], int] = {}
        self._until: dict[tuple[str, int], float] = {}
        self._labels: dict[tuple[str, int], str] = {}      # every address connected to or tried
        self._lock = threading.Lock()

    def blocked(self, key: tuple[str, int]) -> bool:
        """True while the address is being skipped."""
        with self._lock:
            until = self._until.get(key)
        return until is not None and self.clock() < until

    def failed(self, key: tuple[str, int], label: str, why: str) -> None:
        """A connect failed; start skipping once enough have failed in a row."""
        with self._lock:
            self._labels[key] = label
            count = self._failed[key] = self._failed.get(key, 0) + 1
            if count < self.failures or self.seconds <= 0:
                return
            first = key not in self._until
            self._until[key] = self.clock() + self.seconds
        if first:
            log.warning("backend %s unreachable (%s): skipped for %d s after %d failed connects "
                        "(BackSMTPBackoff)", label, why, self.seconds, count)

    def succeeded(self, key: tuple[str, int], label: str) -> None:
        """A connect worked: forget the failures, and say so if the address was being skipped."""
        with self._lock:
            if key not in self._labels:
                self._labels[key] = label
            self._failed.pop(key, None)
            was = self._until.pop(key, None)
        if was is not None:
            log.info("backend %s reachable again", label)

    def status(self, key: tuple[str, int]) -> str:
        """One address's state in words: up, failing, or skipped for how long."""
        with self._lock:
            until, failed = self._until.get(key), self._failed.get(key, 0)
        left = (until - self.clock()) if until is not None else 0
        if left > 0:
            return f"skipped for {int(left) + 1} s more after {failed} failed connects (BackSMTPBackoff)"
        if failed:
            return f"{failed} failed connects in a row"
        return "up" if key in self._labels else "not contacted yet"

    def states(self) -> dict[str, str]:
        """Every backend address contacted since start, by label, with its status()."""
        with self._lock:
            keys = sorted(self._labels.items(), key=lambda item: item[1])
        return {label: self.status(key) for key, label in keys}
