"""VerdictCache: thread-safe O(1) cache of valid/invalid verdicts, bounded, saved atomically."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

log = logging.getLogger("scam-back")

VALID, INVALID = 0, 1   # the original's codes in the cache file


@dataclass(frozen=True)
class CacheHit:
    """A cached verdict: valid or not, and seconds until it expires."""

    valid: bool
    expires_in: float


@dataclass(frozen=True)
class LoadResult:
    """What loading a cache file found."""

    loaded: int = 0
    expired: int = 0
    malformed: int = 0


class VerdictCache:
    """Address -> (valid, expiry). Keys are lower-cased; the least recently used go first.

    Expiry is kept on the monotonic clock so wall-clock jumps never expire or revive entries;
    it is turned into Unix time only when the file is written.
    """

    def __init__(self, valid_ttl: float, invalid_ttl: float, max_entries: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time) -> None:
        self.valid_ttl, self.invalid_ttl = valid_ttl, invalid_ttl
        self.max_entries = max_entries
        self.clock, self.wallclock = clock, wallclock
        self._lock = threading.Lock()
        self._entries: "OrderedDict[str, tuple[bool, float]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, address: str) -> Optional[CacheHit]:
        """The live verdict for an address, or None; an expired entry is dropped on sight."""
        key = address.lower()
        now = self.clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[1] <= now:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
        return CacheHit(entry[0], entry[1] - now)

    def put(self, address: str, valid: bool) -> None:
        """Remember a verdict for its kind's TTL; a TTL of 0 means that kind is not cached.

        Addresses with white space (quoted local parts) are not cached: the file format could not
        hold them.
        """
        ttl = self.valid_ttl if valid else self.invalid_ttl
        if ttl <= 0 or any(ch.isspace() for ch in address):
            return
        self._store(address.lower(), valid, self.clock() + ttl)

    def _store(self, key: str, valid: bool, expires: float) -> None:
        with self._lock:
            self._entries[key] = (valid, expires)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def remove(self, address: str) -> bool:
        """Forget one address; True if it was cached."""
        with self._lock:
            return self._entries.pop(address.lower(), None) is not None

    def snapshot(self) -> list[tuple[str, bool, float]]:
        """A copy of the live entries as (address, valid, Unix expiry), taken under the lock."""
        now, wall = self.clock(), self.wallclock()
        with self._lock:
            items = list(self._entries.items())
        return [(k, v, wall + (exp - now)) for k, (v, exp) in items if exp > now]

    def save(self, path: str) -> int:
        """Write live entries to a temporary file, then rename it over path; returns the count.

        The lock is held only for the snapshot, never during the write.
        """
        entries = self.snapshot()
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".scam-back-cache.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
                handle.writelines(_lines(entries))
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
            _fsync_dir(directory)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return len(entries)

    def load(self, path: str) -> LoadResult:
        """Read a cache file in the original's format (`0 addr`, `1 addr`), expiry optional.

        An entry without an expiry is fresh from now, as the original did; expired and
        malformed lines are skipped and counted.
        """
        loaded = expired = malformed = 0
        now, wall = self.clock(), self.wallclock()
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            for line in handle:
                parsed = _parse_line(line)
                if parsed is None:
                    if line.strip():
                        malformed += 1
                    continue
                address, valid, expiry = parsed
                ttl = self.valid_ttl if valid else self.invalid_ttl
                # Never longer than today's TTL: a shortened TTL or an edited file cannot pin it.
                expires = now + (ttl if expiry is None else min(expiry - wall, ttl))
                if expires <= now:
                    expired += 1
                    continue
                self._store(address.lower(), valid, expires)
                loaded += 1
        return LoadResult(loaded, expired, malformed)


def _fsync_dir(directory: str) -> None:
    """Make the rename durable; not every file system allows it, and that is not an error."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _lines(entries: list[tuple[str, bool, float]]) -> Iterator[str]:
    for address, valid, expiry in entries:
        yield f"{VALID if valid else INVALID} {address} {int(expiry)}\n"


def _parse_line(line: str) -> Optional[tuple[str, bool, Optional[float]]]:
    """`CODE ADDRESS [EXPIRY]` -> (address, valid, expiry or None); None if malformed."""
    fields = line.split()
    if len(fields) not in (2, 3) or fields[0] not in ("0", "1"):
        return None
    address = fields[1]
    if len(address) > 254 or "@" not in address or any(ord(c) < 32 or c in "<>" for c in address):
        return None
    expiry: Optional[float] = None
    if len(fields) == 3:
        if not fields[2].isdigit():
            return None
        expiry = float(fields[2])
    return address, fields[0] == "0", expiry


def load_file(cache: VerdictCache, path: Optional[str]) -> None:
    """Load the cache file at start-up, logging what was found; a missing file is normal."""
    if not path:
        return
    try:
        result = cache.load(path)
    except FileNotFoundError:
        log.info("cache file %s does not exist yet; starting empty", path)
        return
    except OSError as exc:
        log.error("cannot read cache file %s: %s; starting empty", path, exc.strerror)
        return
    log.info("cache file %s: %d entries loaded, %d expired skipped, %d malformed lines skipped",
             path, result.loaded, result.expired, result.malformed)
    if result.malformed:
        log.warning("cache file %s had %d malformed lines (expected: 0|1 address [expiry])",
                    path, result.malformed)


def save_file(cache: VerdictCache, path: Optional[str]) -> None:
    """Save the cache, logging the outcome; never raises, so shutdown always completes."""
    if not path:
        return
    try:
        count = cache.save(path)
    except OSError as exc:
        log.error("cannot save cache file %s: %s (is its directory writable by this user?)",
                  path, exc.strerror)
        return
    log.info("cache file %s saved: %d entries", path, count)
