"""VerdictCache: thread-safe O(1) cache of valid/invalid verdicts, bounded, saved atomically."""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional

from .cachefile import USUAL_LINE, bounded_lines, fsync_dir, parse_line

VALID, INVALID = 0, 1   # the original's codes in the cache file
DUE = 2                 # fresh(): valid, with less than a tenth of its TTL left (truthy)
REFRESH_FRACTION = 0.1


def expiry_grain(ttl: float) -> float:
    """How finely expiries of this TTL are kept: 1 s, or for a TTL under 1024 s the largest
    power of two of a second within a thousandth of it (a 1 s TTL: 1/1024 s)."""
    if ttl <= 0:
        return 1.0
    return min(1.0, 2.0 ** math.floor(math.log2(ttl / 1024)))


class CacheHit(NamedTuple):
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


SHARDS = 64                 # big caches are split so no single lock hold or copy is long
SHARD_FROM = 65_536         # caches smaller than this stay one exact-LRU shard
EXPIRIES_MAX = 262_144      # distinct expiries shared before the table starts over
SAVE_PIECE = 2048           # cache-file lines made between two writes
SAVE_PAUSE = 0.001          # seconds a save made while serving sleeps after each write


class _Shard:
    """One lock, and a valid and an invalid LRU list with their bounds."""

    __slots__ = ("lock", "valid", "invalid", "valid_max", "invalid_max", "max_entries")

    def __init__(self, valid_max: int, invalid_max: int, max_entries: int) -> None:
        self.lock = threading.Lock()
        self.valid: "OrderedDict[str, float]" = OrderedDict()
        self.invalid: "OrderedDict[str, float]" = OrderedDict()
        self.valid_max, self.invalid_max, self.max_entries = valid_max, invalid_max, max_entries

    def store(self, key: str, valid: bool, expires: float) -> None:
        """Insert under the caller-held lock, evicting within the verdict's own list first."""
        entries, other, bound = ((self.valid, self.invalid, self.valid_max) if valid
                                 else (self.invalid, self.valid, self.invalid_max))
        if key in other:
            del other[key]
        entries[key] = expires
        entries.move_to_end(key)
        while len(entries) > bound:
            entries.popitem(last=False)
        while len(entries) + len(other) > self.max_entries:
            (entries if entries else other).popitem(last=False)


class VerdictCache:
    """Address -> (valid, expiry). Keys are lower-cased; the least recently used go first.

    Valid and invalid verdicts live in separate LRU lists, so a flood of unknown addresses evicts
    only other unknown addresses: invalid ones are capped at BackInvalidCacheMax (at most half of
    BackCacheMax), and the rest of BackCacheMax is kept for valid ones. Entries past their TTL
    stay for stale_grace seconds, flagged stale. Expiry runs on the monotonic clock, so
    wall-clock jumps never expire or revive entries; it becomes Unix time only in the file.
    A big cache is split by key hash into shards, each with its own lock and LRU order.
    """

    def __init__(self, valid_ttl: float, invalid_ttl: float, max_entries: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time,
                 invalid_max: Optional[int] = None, stale_grace: float = 0) -> None:
        self.set_ttls(valid_ttl, invalid_ttl, stale_grace)
        self.max_entries = max_entries
        if invalid_max is None:
            self.invalid_max = self.valid_max = max_entries
        else:
            self.invalid_max = max(1, min(invalid_max, max_entries // 2))
            self.valid_max = max(1, max_entries - self.invalid_max)
        self.clock, self.wallclock = clock, wallclock
        count = SHARDS if max_entries >= SHARD_FROM else 1
        # fresh() moves one hit in eight (small caches) or 32 (big ones) to the young end: the
        # turn comes round in a cycle of shared booleans, one C call that allocates nothing.
        self._bump_turn = itertools.cycle((True,) + (False,) * (7 if count == 1 else 31)).__next__
        self._expiries: dict[float, float] = {}
        # Keys never spread quite evenly: shards get 5% slack so a full cache loses no entry to
        # an unlucky shard, and the whole stays within 5% of BackCacheMax.
        slack = 1.05 if count > 1 else 1.0
        self._shards = [_Shard(int(-(-self.valid_max // count) * slack),
                               int(-(-self.invalid_max // count) * slack),
                               int(-(-max_entries // count) * slack)) for _ in range(count)]

    def set_ttls(self, valid_ttl: float, invalid_ttl: float, stale_grace: float) -> None:
        """The TTLs (at start, and at a reload: entries keep the expiry they were given) and
        the refresh window they imply, kept beside them for the hot path."""
        self.valid_ttl, self.invalid_ttl, self.stale_grace = valid_ttl, invalid_ttl, stale_grace
        self._grains = {True: expiry_grain(valid_ttl), False: expiry_grain(invalid_ttl)}
        self.refresh_before = valid_ttl * REFRESH_FRACTION

    def _expiry(self, expires: float, valid: bool) -> float:
        """expires rounded up to its kind's grain (a second, or a power-of-two fraction of one
        no longer than a thousandth of a short TTL), as the one float object every entry
        expiring then shares: a million entries hold thousands of floats rather than a million,
        so reading an entry's expiry mostly hits the CPU cache (and RSS drops 24 MB)."""
        grain = self._grains[valid]
        rounded = -(-expires // grain) * grain          # exact: grain is a power of two
        shared = self._expiries.get(rounded)
        if shared is None:
            if len(self._expiries) >= EXPIRIES_MAX:
                self._expiries = {}         # entries keep their floats; new ones share anew
            shared = self._expiries.setdefault(rounded, rounded)
        return shared

    def _shard(self, key: str) -> _Shard:
        shards = self._shards
        return shards[hash(key) % len(shards)] if len(shards) > 1 else shards[0]

    def __len__(self) -> int:
        return sum(len(s.valid) + len(s.invalid) for s in self._shards)

    def counts(self) -> tuple[int, int]:
        """(valid, invalid) entries held, stale ones included."""
        return (sum(len(s.valid) for s in self._shards), sum(len(s.invalid) for s in self._shards))

    def locked(self) -> bool:
        """True if any shard's lock is held (for tests that prove no lock spans network I/O)."""
        return any(s.lock.locked() for s in self._shards)

    def get(self, address: str) -> Optional[CacheHit]:
        """The verdict for an address, or None; stale ones only within the grace period."""
        key = address.lower()
        now = self.clock()
        shard = self._shard(key)
        with shard.lock:
            for valid, entries in ((True, shard.valid), (False, shard.invalid)):
                expires = entries.get(key)
                if expires is None:
                    continue
                if expires + self.stale_grace <= now:
                    del entries[key]
                    return None
                entries.move_to_end(key)
                return CacheHit(valid, expires - now)
        return None

    def fresh(self, key: str) -> Optional[int]:
        """The verdict for a lower-cased address if it is within its TTL, else None: True
        (valid), False (invalid), or DUE (valid, less than a tenth of its TTL left: refresh it).

        The hot path of every cached decision. A single dict read is atomic in CPython, so the
        read takes no lock: with one shard (a small cache) every MTA thread would queue on it.
        Anything not fresh goes through get(), which expires entries under the lock.
        """
        shards = self._shards
        shard = shards[hash(key) % len(shards)]
        entries = shard.valid
        expires = entries.get(key)
        if expires is None:
            entries = shard.invalid
            expires = entries.get(key)
            if expires is None:
                return None
        now = self.clock()
        if expires <= now:
            return None
        # LRU order, sampled: one hit in 8 or 32 (a shared cycle's turn) moves the entry to the
        # young end, so an address in use still gets moved often, while most hits skip the
        # node updates that dominate a lookup in a big cache. The move is skipped, never
        # waited for, when the lock is busy.
        if self._bump_turn() and shard.lock.acquire(False):
            try:
                entries.move_to_end(key)
            except KeyError:            # dropped since it was read
                pass
            finally:
                shard.lock.release()
        if entries is shard.valid:
            return DUE if expires - now < self.refresh_before else True
        return False

    def put(self, address: str, valid: bool, ttl: Optional[float] = None) -> None:
        """Remember a verdict for its kind's TTL (or a shorter ttl, as a shared cache gives it);
        a TTL of 0 means that kind is not cached.

        Addresses with white space (quoted local parts) are not cached: the file format could not
        hold them.
        """
        kind_ttl = self.valid_ttl if valid else self.invalid_ttl
        ttl = kind_ttl if ttl is None else min(ttl, kind_ttl)
        if ttl <= 0 or any(ch.isspace() for ch in address):
            return
        key = address.lower()
        shard = self._shard(key)
        expires = self._expiry(self.clock() + ttl, valid)
        with shard.lock:
            shard.store(key, valid, expires)

    def peek(self, address: str) -> Optional[CacheHit]:
        """The verdict as get() would see it, without touching LRU order or expiring anything."""
        key = address.lower()
        shard = self._shard(key)
        with shard.lock:
            for valid, entries in ((True, shard.valid), (False, shard.invalid)):
                expires = entries.get(key)
                if expires is not None:
                    left = expires - self.clock()
                    return CacheHit(valid, left) if left + self.stale_grace > 0 else None
        return None

    def drop(self, address: str) -> int:
        """Forget one address; returns 1 if it was cached, else 0."""
        key = address.lower()
        shard = self._shard(key)
        with shard.lock:
            found = shard.valid.pop(key, None) is not None
            found = shard.invalid.pop(key, None) is not None or found
        return int(found)

    def drop_where(self, valid: bool = True, invalid: bool = True,
                   domain: Optional[str] = None) -> int:
        """Forget every entry of the chosen kinds (of one domain and its subdomains, if given)."""
        if domain is not None and not domain.strip("."):
            raise ValueError("drop_where: an empty domain would match every address")
        dropped = 0
        suffix_at, suffix_dot = (f"@{domain.lower()}", f".{domain.lower()}") if domain else ("", "")
        for shard in self._shards:
            with shard.lock:
                for wanted, entries in ((valid, shard.valid), (invalid, shard.invalid)):
                    if not wanted:
                        continue
                    if domain is None:
                        dropped += len(entries)
                        entries.clear()
                        continue
                    doomed = [k for k in entries if k.endswith(suffix_at) or
                              (k.endswith(suffix_dot) and "@" in k)]
                    for key in doomed:
                        del entries[key]
                    dropped += len(doomed)
        return dropped

    def dump_lines(self) -> Iterator[str]:
        """Every live entry as a cache-file line (0|1 address expiry), shard by shard."""
        for text, _ in self._file_chunks(serving=True):
            yield from text.splitlines()

    def snapshot(self) -> list[tuple[str, bool, float]]:
        """A copy of the entries (stale ones within grace too) as (address, valid, Unix expiry)."""
        return [entry for part in self._snapshot_parts() for entry in part]

    def _snapshot_parts(self) -> Iterator[list[tuple[str, bool, float]]]:
        """The entries shard by shard; each shard's lock is held only while its lists are copied.

        Taken a shard at a time, a save never holds a million objects alive at once, so neither
        the copy nor a garbage collection it provokes stalls decisions for long.
        """
        now, wall = self.clock(), self.wallclock()
        keep = now - self.stale_grace
        for shard in self._shards:
            with shard.lock:
                valid, invalid = list(shard.valid.items()), list(shard.invalid.items())
            yield [(k, True, wall + (exp - now)) for k, exp in valid if exp > keep] + \
                [(k, False, wall + (exp - now)) for k, exp in invalid if exp > keep]

    def _file_chunks(self, serving: bool = False) -> Iterator[tuple[str, int]]:
        """The cache file's text in pieces of at most SAVE_PIECE lines, with their line counts.

        Keys and expiries are copied as two flat lists under the shard's lock: no per-entry
        tuples, so a save of a million entries barely wakes the garbage collector. The last
        save, at exit, lists them least recently used first, so a restart keeps the LRU order.
        While serving, a shard is copied in the order its entries were first stored: walking
        the LRU order costs a dict lookup per entry, and a big shard's walk held the GIL for
        milliseconds. The text is made a piece at a time for the same reason.
        """
        now = self.clock()
        keep, offset = now - self.stale_grace, self.wallclock() - now
        keys_of, values_of = ((dict.keys, dict.values) if serving
                              else (OrderedDict.keys, OrderedDict.values))
        for shard in self._shards:
            with shard.lock:
                parts = [(VALID, list(keys_of(shard.valid)), list(values_of(shard.valid))),
                         (INVALID, list(keys_of(shard.invalid)), list(values_of(shard.invalid)))]
            for code, keys, expiries in parts:
                for start in range(0, len(keys), SAVE_PIECE):
                    end = start + SAVE_PIECE
                    lines = [f"{code} {key} {int(expires + offset)}\n"
                             for key, expires in zip(keys[start:end], expiries[start:end])
                             if expires > keep]
                    yield "".join(lines), len(lines)

    def save(self, path: str, serving: bool = False) -> int:
        """Write live entries to a temporary file, then rename it over path; returns the count.

        A shard's lock is held only while it is copied, never during the write. A save made
        while serving sleeps SAVE_PAUSE after each piece it writes: a write alone frees the GIL
        too briefly, the saver takes it back before a waiting MTA thread (woken on the other,
        busy CPU) gets to run, and decisions waited for the 5 ms switch interval, or several.
        """
        count = 0
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".scam-back-cache.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
                for text, lines in self._file_chunks(serving):
                    handle.write(text)
                    count += lines
                    if serving:
                        time.sleep(SAVE_PAUSE)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
            fsync_dir(directory)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return count

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
            for raw in bounded_lines(handle):
                usual = USUAL_LINE.fullmatch(raw)     # one C call for the common line
                if usual is not None and len(usual.group(2)) <= 254:
                    code, address_bytes, expiry_bytes = usual.groups()
                    address = address_bytes.decode("ascii")
                    valid = code == b"0"
                    expiry = None if expiry_bytes is None else float(expiry_bytes)
                else:
                    parsed = parse_line(raw)
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
                batch.append((address.lower(), valid, self._expiry(expires, valid)))
                if len(batch) >= 10_000:      # small batches: no second copy of a big file
                    self._store_many(batch)
                    loaded, batch = loaded + len(batch), []
        self._store_many(batch)
        return LoadResult(loaded + len(batch), expired, malformed)

    def _store_many(self, entries: list[tuple[str, bool, float]]) -> None:
        """Bulk insert (loading): grouped by shard, one C-level update per list and shard."""
        count = len(self._shards)
        groups: list[tuple[list, list]] = [([], []) for _ in range(count)]
        for key, valid, expires in entries:
            groups[hash(key) % count if count > 1 else 0][0 if valid else 1].append((key, expires))
        for shard, (valid, invalid) in zip(self._shards, groups):
            with shard.lock:
                for items, target, other, bound in ((valid, shard.valid, shard.invalid, shard.valid_max),
                                                    (invalid, shard.invalid, shard.valid,
                                                     shard.invalid_max)):
                    if not items:
                        continue
                    if other:
                        for key in other.keys() & {k for k, _ in items}:
                            del other[key]
                    target.update(items)
                    while len(target) > bound:
                        target.popitem(last=False)
                while len(shard.valid) + len(shard.invalid) > shard.max_entries:
                    (shard.valid if shard.valid else shard.invalid).popitem(last=False)
