"""VerdictCache: TTLs, case, LRU bound, persistence in the original's format, atomic save."""

from __future__ import annotations

import os
import random
import stat
import sys
import threading

import pytest

from scam_back import cache as cachemod
from scam_back import cachefile
from scam_back.cache import LoadResult, VerdictCache

WALL = 1_700_000_000.0      # a fixed Unix time for the injected wall clock


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(valid_ttl: float = 100, invalid_ttl: float = 10, max_entries: int = 1000,
         clock: FakeClock | None = None, wall: FakeClock | None = None) -> VerdictCache:
    return VerdictCache(valid_ttl, invalid_ttl, max_entries,
                        clock=clock or FakeClock(5000.0), wallclock=wall or FakeClock(WALL))


# ---- TTLs and keys ----

def test_valid_verdict_is_cached():
    cache = make()
    cache.put("good@example.net", True)
    assert cache.get("good@example.net").valid is True


def test_invalid_verdict_is_cached():
    cache = make()
    cache.put("bad@example.net", False)
    assert cache.get("bad@example.net").valid is False


def test_unknown_address_is_a_miss():
    assert make().get("nobody@example.net") is None


def test_invalid_ttl_expires_before_valid_ttl():
    clock = FakeClock(5000.0)
    cache = make(valid_ttl=100, invalid_ttl=10, clock=clock)
    cache.put("good@example.net", True)
    cache.put("bad@example.net", False)
    clock.advance(10)
    assert (cache.get("bad@example.net"), cache.get("good@example.net").valid) == (None, True)


def test_valid_ttl_expires_independently_of_invalid_ttl():
    clock = FakeClock(5000.0)
    cache = make(valid_ttl=10, invalid_ttl=100, clock=clock)
    cache.put("good@example.net", True)
    cache.put("bad@example.net", False)
    clock.advance(10)
    assert (cache.get("good@example.net"), cache.get("bad@example.net").valid) == (None, False)


def test_entry_lives_until_its_ttl_then_expires():
    clock = FakeClock(5000.0)
    cache = make(valid_ttl=100, clock=clock)
    cache.put("good@example.net", True)
    clock.advance(99)
    assert cache.get("good@example.net").expires_in == pytest.approx(1)
    clock.advance(1)
    assert cache.get("good@example.net") is None


def test_expired_entry_is_dropped_on_lookup():
    clock = FakeClock(5000.0)
    cache = make(valid_ttl=100, clock=clock)
    cache.put("good@example.net", True)
    clock.advance(200)
    cache.get("good@example.net")
    assert len(cache) == 0


def test_keys_are_case_insensitive():
    cache = make()
    cache.put("Bad@Example.NET", False)
    assert cache.get("bad@example.net").valid is False


def test_later_verdict_replaces_earlier_for_same_address_any_case():
    cache = make()
    cache.put("User@example.net", False)
    cache.put("user@EXAMPLE.net", True)
    assert (len(cache), cache.get("user@example.net").valid) == (1, True)


def test_valid_ttl_zero_means_valid_not_cached():
    cache = make(valid_ttl=0)
    cache.put("good@example.net", True)
    assert cache.get("good@example.net") is None


def test_invalid_ttl_zero_means_invalid_not_cached():
    cache = make(invalid_ttl=0)
    cache.put("bad@example.net", False)
    assert cache.get("bad@example.net") is None


# ---- LRU bound ----

def test_bound_evicts_least_recently_used():
    cache = make(max_entries=3)
    for name in "abcd":
        cache.put(f"{name}@example.net", True)
    assert (len(cache), cache.get("a@example.net")) == (3, None)


def test_get_refreshes_recency():
    cache = make(max_entries=3)
    for name in "abc":
        cache.put(f"{name}@example.net", True)
    cache.get("a@example.net")
    cache.put("d@example.net", True)
    assert (cache.get("a@example.net") is not None, cache.get("b@example.net")) == (True, None)


# ---- persistence ----

def test_save_writes_code_address_and_unix_expiry(tmp_path):
    clock = FakeClock(5000.0)
    cache = make(valid_ttl=100, invalid_ttl=10, clock=clock)
    cache.put("good@example.net", True)
    cache.put("bad@example.net", False)
    clock.advance(4)
    path = tmp_path / "backscatter.txt"
    cache.save(str(path))
    assert sorted(path.read_text().splitlines()) == sorted([
        f"0 good@example.net {int(WALL + 96)}", f"1 bad@example.net {int(WALL + 6)}"])


def test_save_load_round_trip_keeps_verdicts(tmp_path):
    path = str(tmp_path / "backscatter.txt")
    first = make()
    first.put("good@example.net", True)
    first.put("bad@example.net", False)
    first.save(path)
    second = make()
    second.load(path)
    assert (second.get("good@example.net").valid, second.get("bad@example.net").valid) == (True, False)


def test_save_load_round_trip_keeps_remaining_lifetime(tmp_path):
    path = str(tmp_path / "backscatter.txt")
    clock = FakeClock(5000.0)
    first = make(valid_ttl=100, clock=clock, wall=FakeClock(WALL))
    first.put("good@example.net", True)
    clock.advance(30)                       # 70 s left at save time
    first.save(path)
    # Restart 10 s later (wall clock), with an unrelated monotonic clock.
    second = make(valid_ttl=100, clock=FakeClock(123.0), wall=FakeClock(WALL + 10))
    second.load(path)
    assert second.get("good@example.net").expires_in == pytest.approx(60)


def test_the_save_at_exit_lists_the_least_recently_used_first(tmp_path):
    """A restart keeps the LRU order: the file is loaded in its order, oldest first."""
    cache = make()
    for name in ("a", "b", "c"):
        cache.put(f"{name}@example.net", True)
    cache.get("a@example.net")                  # a is now the most recently used
    path = tmp_path / "backscatter.txt"
    cache.save(str(path))
    assert [line.split()[1] for line in path.read_text().splitlines()] == [
        "b@example.net", "c@example.net", "a@example.net"]


def test_a_save_while_serving_writes_the_same_entries_and_gives_way_between_pieces(
        tmp_path, monkeypatch):
    """Made in pieces, each followed by a pause that lets the MTA threads have the GIL."""
    monkeypatch.setattr(cachemod, "SAVE_PIECE", 10)
    pauses: list[float] = []
    monkeypatch.setattr(cachemod.time, "sleep", pauses.append)
    cache = make()
    for n in range(95):
        cache.put(f"user{n}@example.net", n % 3 != 0)
    at_exit, serving = tmp_path / "exit.txt", tmp_path / "serving.txt"
    assert cache.save(str(at_exit)) == 95 and pauses == []
    assert cache.save(str(serving), serving=True) == 95
    assert sorted(serving.read_text().splitlines()) == sorted(at_exit.read_text().splitlines())
    # 63 valid entries in 7 pieces, 32 invalid ones in 4: a pause after each.
    assert pauses == [cachemod.SAVE_PAUSE] * 11


def test_save_returns_the_number_of_entries_written(tmp_path):
    cache = make()
    cache.put("a@example.net", True)
    cache.put("b@example.net", False)
    assert cache.save(str(tmp_path / "backscatter.txt")) == 2


def test_load_result_counts_loaded_entries(tmp_path):
    path = tmp_path / "backscatter.txt"
    path.write_text(f"0 good@example.net {int(WALL + 50)}\n1 bad@example.net\n")
    assert make().load(str(path)) == LoadResult(loaded=2, expired=0, malformed=0)


def test_load_original_format_valid_entry_is_fresh_from_load_time(tmp_path):
    path = tmp_path / "backscatter.txt"
    path.write_text("0 good@x\n")
    cache = make(valid_ttl=100, invalid_ttl=10)
    cache.load(str(path))
    hit = cache.get("good@x")
    assert (hit.valid, hit.expires_in) == (True, pytest.approx(100))


def test_load_original_format_invalid_entry_is_fresh_from_load_time(tmp_path):
    path = tmp_path / "backscatter.txt"
    path.write_text("1 bad@x\n")
    cache = make(valid_ttl=100, invalid_ttl=10)
    cache.load(str(path))
    hit = cache.get("bad@x")
    assert (hit.valid, hit.expires_in) == (False, pytest.approx(10))


def test_loaded_addresses_are_case_insensitive(tmp_path):
    path = tmp_path / "backscatter.txt"
    path.write_text("1 Bad@Example.NET\n")
    cache = make()
    cache.load(str(path))
    assert cache.get("bad@example.net").valid is False


def test_loaded_addresses_are_kept_in_the_form_the_verifier_looks_up(tmp_path):
    """The verifier answers an RCPT text equal to a key without parsing it again, so every key
    loaded must be an address in its normal form; what cannot be one is skipped as malformed."""
    path = tmp_path / "backscatter.txt"
    path.write_text(f"0 Dot@Example.NET. {int(WALL + 50)}\n"      # trailing dot: normalised
                    "0 @relay.test:routed@example.net\n"          # source route: dropped
                    "1 \"quoted\"@example.net\n"                 # unusual, but an address
                    "0 user@[192.0.2.1]\n"                         # literal: never verified
                    "0 @example.net\n"                             # no local part
                    "0 user@\n"                                    # no domain
                    "0 a@b@example.net\n"                          # as the parser reads it
                    "0 @x.test:@y.test:user@example.net\n"         # routes joined by colons
                    "1 plain@example.net\n")
    cache = make()
    assert cache.load(str(path)) == LoadResult(loaded=5, expired=0, malformed=4)
    assert sorted(line.split()[1] for line in cache.dump_lines()) == [
        '"quoted"@example.net', "a@b@example.net", "dot@example.net", "plain@example.net",
        "routed@example.net"]


def test_both_line_forms_load_through_the_quick_pattern_and_the_careful_one_alike(tmp_path):
    """Lines the one-regex fast path takes and lines it leaves to the full parser agree."""
    long_local = "l" * 70                                          # past the quick pattern's 64
    path = tmp_path / "backscatter.txt"
    path.write_text(f"0 usual@example.net {int(WALL + 50)}\n0 {long_local}@example.net "
                    f"{int(WALL + 50)}\n1 noexpiry@example.net\n")
    cache = make(valid_ttl=100, invalid_ttl=10)
    assert cache.load(str(path)).loaded == 3
    assert cache.get("usual@example.net").expires_in == pytest.approx(50, abs=1)
    assert cache.get(f"{long_local}@example.net").expires_in == pytest.approx(50, abs=1)
    assert cache.get("noexpiry@example.net").expires_in == pytest.approx(10)


def test_expired_entries_are_not_saved(tmp_path):
    clock = FakeClock(5000.0)
    cache = make(valid_ttl=100, invalid_ttl=10, clock=clock)
    cache.put("good@example.net", True)
    cache.put("bad@example.net", False)
    clock.advance(50)
    path = tmp_path / "backscatter.txt"
    cache.save(str(path))
    assert [line.split()[:2] for line in path.read_text().splitlines()] == [["0", "good@example.net"]]


def test_expired_entries_are_not_loaded(tmp_path):
    path = tmp_path / "backscatter.txt"
    path.write_text(f"0 old@example.net {int(WALL - 1)}\n1 gone@example.net {int(WALL)}\n")
    cache = make()
    result = cache.load(str(path))
    assert (result.loaded, result.expired, len(cache)) == (0, 2, 0)


@pytest.mark.parametrize("bad_line", [
    "7 a@b",                                   # a code other than 0 or 1 (weakness 2)
    "0 john doe@example.net",                  # spaces in the address
    "0 john doe@example.net 1800000000",
    "garbage",
    "0",
    "0 nodomain",
    "1 bad@example.net soon",                  # expiry not a number
    "0 <evil@example.net>",
    "0 " + "a" * 250 + "@example.net",         # over-long address
])
def test_malformed_line_is_skipped_and_counted(tmp_path, bad_line):
    path = tmp_path / "backscatter.txt"
    path.write_text(bad_line + "\n0 good@example.net\n")
    cache = make()
    result = cache.load(str(path))
    assert (result.malformed, result.loaded, len(cache)) == (1, 1, 1)


@pytest.mark.parametrize("data", [b"0 good@example.net\r\n1 bad@example.net\r\n",
                                  b"0 good@example.net\r1 bad@example.net\r"])
def test_cr_terminated_lines_load_without_the_cr(tmp_path, data):
    path = tmp_path / "backscatter.txt"
    path.write_bytes(data)
    cache = make()
    cache.load(str(path))
    assert sorted(a for a, _, _ in cache.snapshot()) == ["bad@example.net", "good@example.net"]


def test_empty_lines_are_skipped(tmp_path):
    path = tmp_path / "backscatter.txt"
    path.write_text("0 good@example.net\n\n   \n1 bad@example.net\n")
    cache = make()
    assert (cache.load(str(path)).loaded, len(cache)) == (2, 2)


def test_load_of_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        make().load(str(tmp_path / "missing.txt"))


def test_thousand_entries_save_and_load(tmp_path):
    path = str(tmp_path / "backscatter.txt")
    first = make(max_entries=5000)
    for i in range(1000):
        first.put(f"user{i}@example.net", i % 2 == 0)
    assert first.save(path) == 1000
    second = make(max_entries=5000)
    assert second.load(path).loaded == 1000
    assert all(second.get(f"user{i}@example.net").valid is (i % 2 == 0) for i in range(1000))


# ---- atomic save ----

@pytest.mark.parametrize("step", ["replace", "fsync"])
def test_failed_save_keeps_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, step):
    path = tmp_path / "backscatter.txt"
    path.write_text("0 old@example.net\n")
    cache = make()
    cache.put("new@example.net", True)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cachemod.os, step, boom)
    with pytest.raises(OSError):
        cache.save(str(path))
    monkeypatch.undo()
    assert (path.read_text(), os.listdir(tmp_path)) == ("0 old@example.net\n", ["backscatter.txt"])


def test_save_file_logs_instead_of_raising_on_failure(tmp_path, monkeypatch):
    cache = make()
    cache.put("new@example.net", True)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cachemod.os, "replace", boom)
    cachefile.save_file(cache, str(tmp_path / "backscatter.txt"))   # must not raise
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_saved_file_mode_is_0600(tmp_path):
    path = tmp_path / "backscatter.txt"
    path.write_text("")
    os.chmod(path, 0o644)
    cache = make()
    cache.put("good@example.net", True)
    cache.save(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_save_replaces_the_file_rather_than_writing_in_place(tmp_path):
    path = tmp_path / "backscatter.txt"
    path.write_text("0 old@example.net\n")
    before = os.stat(path).st_ino
    cache = make()
    cache.put("new@example.net", True)
    cache.save(str(path))
    assert os.stat(path).st_ino != before


# ---- threads ----

def test_concurrent_get_and_put_do_not_raise():
    cache = VerdictCache(100, 10, max_entries=50)       # real clocks, small bound: many evictions
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(10000):
                address = f"user{rng.randrange(200)}@Example.net"
                if rng.random() < 0.5:
                    cache.put(address, rng.random() < 0.5)
                else:
                    cache.get(address)
                if rng.random() < 0.01:
                    cache.snapshot()
        except BaseException as exc:   # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)          # switch threads often, so races show up
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert (errors, len(cache) <= 50) == ([], True)


def test_loaded_expiry_is_capped_at_the_current_ttl(tmp_path):
    """A shortened TTL, or an edited file, cannot keep an entry longer than the TTL allows."""
    path = tmp_path / "backscatter.txt"
    path.write_text(f"1 bad@x {int(WALL) + 10 ** 8}\n0 good@x {int(WALL) + 50}\n")
    cache = make(valid_ttl=100, invalid_ttl=10)
    cache.load(str(path))
    assert cache.get("bad@x").expires_in == pytest.approx(10)
    assert cache.get("good@x").expires_in == pytest.approx(50)


def test_wall_clock_jumps_neither_expire_nor_revive_entries():
    """Weakness 17: the original's TTLs ran on wall-clock time."""
    mono, wall = FakeClock(5000.0), FakeClock(WALL)
    cache = make(valid_ttl=100, clock=mono, wall=wall)
    cache.put("good@x", True)
    wall.advance(10 ** 7)
    assert cache.get("good@x") is not None
    wall.advance(-2 * 10 ** 7)
    mono.advance(101)
    assert cache.get("good@x") is None


def test_addresses_with_white_space_are_not_cached(tmp_path):
    """A quoted local part with a space could not be read back from the cache file."""
    cache = make()
    cache.put('"john doe"@example.net', False)
    assert cache.get('"john doe"@example.net') is None
    cache.put("jd@example.net", False)
    path = tmp_path / "c.txt"
    cache.save(str(path))
    assert cache.load(str(path)).malformed == 0


def test_flood_of_invalid_addresses_cannot_evict_valid_ones():
    """Issue 4: negatives have their own bound inside BackCacheMax and evict among themselves."""
    cache = VerdictCache(100, 10, max_entries=1000, clock=FakeClock(5000.0),
                         wallclock=FakeClock(WALL), invalid_max=100)
    for n in range(800):
        cache.put(f"good{n}@x", True)
    for n in range(5000):
        cache.put(f"random{n}@x", False)
    assert all(cache.get(f"good{n}@x") for n in range(800))
    assert cache.counts()[1] == 100 and len(cache) <= 1000


def test_invalid_bound_is_at_most_half_the_cache():
    cache = VerdictCache(100, 10, max_entries=1000, invalid_max=100_000)
    assert (cache.invalid_max, cache.valid_max) == (500, 500)


def test_stale_entries_within_grace_are_flagged_then_dropped():
    clock = FakeClock(5000.0)
    cache = VerdictCache(100, 10, clock=clock, wallclock=FakeClock(WALL), stale_grace=50)
    cache.put("good@x", True)
    clock.advance(120)
    hit = cache.get("good@x")
    assert hit is not None and hit.valid and hit.stale
    clock.advance(40)
    assert cache.get("good@x") is None


def test_stale_entries_are_saved_and_load_as_stale(tmp_path):
    clock, wall = FakeClock(5000.0), FakeClock(WALL)
    cache = VerdictCache(100, 10, clock=clock, wallclock=wall, stale_grace=1000)
    cache.put("bad@x", False)
    clock.advance(20)
    wall.advance(20)
    path = tmp_path / "c.txt"
    assert cache.save(str(path)) == 1
    fresh = VerdictCache(100, 10, clock=FakeClock(9000.0), wallclock=wall, stale_grace=1000)
    assert fresh.load(str(path)).loaded == 1
    hit = fresh.get("bad@x")
    assert hit is not None and not hit.valid and hit.stale


def test_a_huge_line_without_newline_is_one_malformed_line(tmp_path):
    path = tmp_path / "c.txt"
    with open(path, "w") as handle:
        handle.write("0 good@x\n" + "y" * 5_000_000 + "\n1 bad@x\n" + "z" * 3000)
    cache = make()
    result = cache.load(str(path))
    assert (result.loaded, result.malformed) == (2, 2)


def test_fresh_gives_only_verdicts_within_their_ttl():
    now = [100.0]
    cache = VerdictCache(10, 5, clock=lambda: now[0], stale_grace=100)
    cache.put("Good@Example.net", True)
    cache.put("bad@example.net", False)
    assert cache.fresh("good@example.net") is True
    assert cache.fresh("bad@example.net") is False
    assert cache.fresh("other@example.net") is None
    now[0] += 6
    assert cache.fresh("bad@example.net") is None          # stale: for get() to judge
    assert cache.get("bad@example.net").stale
    assert cache.fresh("good@example.net") is True


def test_an_address_in_use_survives_eviction():
    """fresh() samples the LRU order (one hit in eight moves an entry): repeated hits count."""
    ticks = [0]

    def clock() -> float:
        ticks[0] += 1
        return 100 + ticks[0] / 1e6         # a microsecond per reading
    cache = VerdictCache(100, 100, max_entries=3, clock=clock)
    for name in ("a", "b", "c"):
        cache.put(f"{name}@x.test", True)
    for _ in range(16):
        assert cache.fresh("a@x.test") is True
    cache.put("d@x.test", True)
    assert cache.get("a@x.test") is not None and cache.get("b@x.test") is None


def test_fresh_skips_the_lru_bump_rather_than_wait_for_a_busy_lock():
    cache = VerdictCache(100, 100)
    cache.put("a@x.test", True)
    shard = cache._shard("a@x.test")
    with shard.lock:
        assert cache.fresh("a@x.test") is True


# ---- admin operations: peek, drop, drop_where, dump_lines ----

def _filled(max_entries: int = 1000) -> VerdictCache:
    cache = VerdictCache(600, 60, max_entries)
    for address, valid in (("a@example.net", True), ("b@example.net", False), ("c@sub.example.net", True),
                           ("d@example.org", False), ("e@notexample.net", True)):
        cache.put(address, valid)
    return cache


@pytest.mark.parametrize("max_entries", [1000, 200_000])      # one shard, and sharded
def test_drop_where_by_domain_takes_subdomains_and_only_them(max_entries):
    cache = _filled(max_entries)
    assert cache.drop_where(domain="Example.NET") == 3
    assert {line.split()[1] for line in cache.dump_lines()} == {"d@example.org", "e@notexample.net"}


def test_drop_where_invalid_keeps_valid():
    cache = _filled()
    assert cache.drop_where(valid=False) == 2
    assert cache.counts() == (3, 0)
    assert cache.drop_where() == 3 and len(cache) == 0


def test_drop_one_address_any_case():
    cache = _filled()
    assert cache.drop("A@Example.Net") == 1
    assert cache.drop("a@example.net") == 0
    assert cache.get("a@example.net") is None


def test_peek_reports_without_expiring_or_reordering():
    now = [0.0]
    cache = VerdictCache(10, 10, 2, clock=lambda: now[0], stale_grace=100)
    cache.put("old@x.test", True)
    now[0] = 1.0
    cache.put("new@x.test", True)
    now[0] = 15.0
    hit = cache.peek("old@x.test")
    assert hit is not None and hit.stale and hit.valid
    cache.put("third@x.test", True)               # peek did not make old@ the youngest
    assert cache.peek("old@x.test") is None and cache.peek("new@x.test") is not None


def test_put_with_a_shorter_ttl_never_a_longer_one():
    now = [0.0]
    cache = VerdictCache(100, 10, clock=lambda: now[0])
    cache.put("a@x.test", True, ttl=5)
    cache.put("b@x.test", True, ttl=500)
    assert cache.peek("a@x.test").expires_in == 5
    assert cache.peek("b@x.test").expires_in == 100


def test_dump_lines_are_cache_file_lines():
    cache = _filled()
    lines = list(cache.dump_lines())
    assert len(lines) == 5
    for line in lines:
        code, address, expiry = line.split()
        assert code in ("0", "1") and "@" in address and expiry.isdigit()


# ---- shared expiry seconds ----

def test_entries_expiring_in_the_same_second_share_one_expiry_object(tmp_path):
    """Expiries are whole seconds, one float object per second: a lookup's expiry read stays in
    the CPU cache however many entries there are; rounding up never cuts a TTL short."""
    now = [1000.25]
    cache = VerdictCache(3600, 1, clock=lambda: now[0])
    cache.put("a@x.test", True)
    now[0] = 1000.5
    cache.put("b@x.test", True)
    shared = cache._shard("a@x.test").valid["a@x.test"]
    assert shared == 4601.0
    assert cache._shard("b@x.test").valid["b@x.test"] is shared
    assert 3600 <= cache.peek("b@x.test").expires_in < 3601
    path = tmp_path / "cache"
    wall = 1_700_000_000
    path.write_text("".join(f"0 u{i}@x.test {wall + 30}\n" for i in range(50)))
    loaded = VerdictCache(3600, 1, clock=lambda: now[0], wallclock=lambda: wall + 0.75)
    loaded.load(str(path))
    expiries = {id(loaded._shard(f"u{i}@x.test").valid[f"u{i}@x.test"]) for i in range(50)}
    assert len(expiries) == 1
    assert loaded.peek("u7@x.test").expires_in == pytest.approx(30, abs=1)


def test_a_short_ttl_keeps_a_fine_expiry_grain():
    """A 1 s TTL is not stretched to 2 s by whole-second rounding: its grain is 1/1024 s."""
    assert cachemod.expiry_grain(86400) == cachemod.expiry_grain(1024) == 1.0
    assert cachemod.expiry_grain(100) == 1 / 16
    assert cachemod.expiry_grain(1) == 1 / 1024
    now = [1000.3]
    cache = VerdictCache(3600, 1, clock=lambda: now[0])
    cache.put("bad@x.test", False)
    assert 1 <= cache.peek("bad@x.test").expires_in < 1.001
    now[0] += 1.001
    assert cache.fresh("bad@x.test") is None
