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
    """A cached verdict: valid or not, and seconds until it expires (negative: stale)."""

    valid: bool
    expires_in: float

    @property
    def stale(self) -> bool:
        """Past its TTL but within BackStaleGrace: good only while the backend cannot answer."""
        return self.expires_in <= 0


@dataclass(frozen=True)
class LoadResult:
    """What loading a cache file found."""

    loaded: int = 0
    expired: int = 0
    malformed: int = 0


class VerdictCache:
    """Address -> (valid, expiry). Keys are lower-cased; the least recently used go first.

    Valid and invalid verdicts live in separate LRU lists, so a flood of unknown addresses evicts
    only other unknown addresses: invalid ones are capped at BackInvalidCacheMax (at most half of
    BackCacheMax), and the rest of BackCacheMax is kept for valid ones. Entries past their TTL
    stay for stale_grace seconds, flagged stale. Expiry runs on the monotonic clock, so
    wall-clock jumps never expire or revive entries; it becomes Unix time only in the file.
    """

    def __init__(self, valid_ttl: float, invalid_ttl: float, max_entries: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time,
                 invalid_max: Optional[int] = None, stale_grace: float = 0) -> None:
        self.valid_ttl, self.invalid_ttl = valid_ttl, invalid_ttl
        self.max_entries = max_entries
        wanted = max_entries if invalid_max is None else invalid_max
        self.invalid_max = max(1, min(wanted, max_entries // 2)) if invalid_max is not None \
            else max_entries
        self.valid_max = max(1, max_entries - (self.invalid_max if invalid_max is not None else 0))
        self.stale_grace = stale_grace
        self.clock, self.wallclock = clock, wallclock
        self._lock = threading.Lock()
        self._valid: "OrderedDict[str, float]" = OrderedDict()
        self._invalid: "OrderedDict[str, float]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._valid) + len(self._invalid)

    def get(self, address: str) -> Optional[CacheHit]:
        """The verdict for an address, or None; stale ones only within the grace period."""
        key = address.lower()
        now = self.clock()
        with self._lock:
            for valid, entries in ((True, self._valid), (False, self._invalid)):
                expires = entries.get(key)
                if expires is None:
                    continue
                if expires + self.stale_grace <= now:
                    del entries[key]
                    return None
                entries.move_to_end(key)
                return CacheHit(valid, expires - now)
        return None

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
        entries, other, bound = ((self._valid, self._invalid, self.valid_max) if valid
                                 else (self._invalid, self._valid, self.invalid_max))
        with self._lock:
            other.pop(key, None)
            entries[key] = expires
            entries.move_to_end(key)
            while len(entries) > bound:
                entries.popitem(last=False)
            while len(entries) + len(other) > self.max_entries:
                (entries if entries else other).popitem(last=False)

    def remove(self, address: str) -> bool:
        """Forget one address; True if it was cached."""
        key = address.lower()
        with self._lock:
            return (self._valid.pop(key, None) is not None) | \
                (self._invalid.pop(key, None) is not None)

    def snapshot(self) -> list[tuple[str, bool, float]]:
        """A copy of the entries (stale ones within grace too) as (address, valid, Unix expiry).

        The lock is held only for two list copies.
        """
        now, wall = self.clock(), self.wallclock()
        with self._lock:
            valid, invalid = list(self._valid.items()), list(self._invalid.items())
        keep = now - self.stale_grace
        return [(k, True, wall + (exp - now)) for k, exp in valid if exp > keep] + \
            [(k, False, wall + (exp - now)) for k, exp in invalid if exp > keep]

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
        malformed lines are skipped and counted. Entries are stored in batches, each under one
        lock hold.
        """
        loaded = expired = malformed = 0
        now, wall = self.clock(), self.wallclock()
        keep_after = now - self.stale_grace
        ttls = {True: self.valid_ttl, False: self.invalid_ttl}
        batch: list[tuple[str, bool, float]] = []
        with open(path, "rb") as handle:
            for raw in _bounded_lines(handle):
                parsed = _parse_line(raw)
                if parsed is None:
                    if raw.strip():
                        malformed += 1
                    continue
                address, valid, expiry = parsed
                ttl = ttls[valid]
                # Never longer than today's TTL: a shortened TTL or an edited file cannot pin it.
                expires = now + (ttl if expiry is None else min(expiry - wall, ttl))
                if expires <= keep_after:
                    expired += 1
                    continue
                batch.append((address.lower(), valid, expires))
                if len(batch) >= 10_000:      # small batches: no second copy of a big file
                    self._store_many(batch)
                    loaded, batch = loaded + len(batch), []
        self._store_many(batch)
        return LoadResult(loaded + len(batch), expired, malformed)

    def _store_many(self, entries: list[tuple[str, bool, float]]) -> None:
        with self._lock:
            for key, valid, expires in entries:
                target, other = (self._valid, self._invalid) if valid else (self._invalid, self._valid)
                if key in other:
                    del other[key]
                target[key] = expires
            for entries_, bound in ((self._valid, self.valid_max), (self._invalid, self.invalid_max)):
                while len(entries_) > bound:
                    entries_.popitem(last=False)
            while len(self._valid) + len(self._invalid) > self.max_entries:
                (self._valid if self._valid else self._invalid).popitem(last=False)


MAX_LINE = 1024      # an address is at most 254 octets; longer lines are garbage


def _bounded_lines(handle) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
    """The lines of a binary file, read in 1 MiB blocks; a line longer than MAX_LINE (say a
    file of garbage with no newline) is dropped as it streams by and given as one b"x"."""
    tail, skipping = b"", False
    while True:
        block = handle.read(1 << 20)
        if not block:
            break
        lines = block.replace(b"\r", b"\n").split(b"\n")     # CRLF and bare CR too
        lines[0] = tail + lines[0]
        tail = lines.pop()
        for line in lines:
            if skipping:
                skipping = False
                continue
            yield line if len(line) <= MAX_LINE else b"x"
        if len(tail) > MAX_LINE:
            if not skipping:
                yield b"x"
            tail, skipping = b"", True
    if tail and not skipping:
        yield tail if len(tail) <= MAX_LINE else b"x"


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


def _parse_line(raw: bytes) -> Optional[tuple[str, bool, Optional[float]]]:
    """`CODE ADDRESS [EXPIRY]` -> (address, valid, expiry or None); None if malformed."""
    fields = raw.split()
    if len(fields) not in (2, 3) or fields[0] not in (b"0", b"1"):
        return None
    address = fields[1]
    if len(address) > 254 or b"@" not in address or b"<" in address or b">" in address or \
            any(c < 32 for c in address):
        return None
    expiry: Optional[float] = None
    if len(fields) == 3:
        if not fields[2].isdigit():
            return None
        expiry = float(fields[2])
    return address.decode("utf-8", "surrogateescape"), fields[0] == b"0", expiry


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
