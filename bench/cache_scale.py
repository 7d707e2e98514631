"""Benchmark 3: the verdict cache at 1,000 / 100,000 / 1,000,000 entries.

For each size: the daemon's RSS once it serves with that cache file loaded, its load time (pid
file written -> "entries loaded" log line) and its save at exit (SIGTERM -> temporary file ->
"saved" log line -> exit; libmilter needs up to ~5 s to notice SIGTERM, so the temporary file's
appearance marks the start of the write); the same load and save in-process
(scam_back.cache.VerdictCache.load/save), and get() per lookup, hits and misses.

Then the longest decision stall while a save runs: in-process, a thread saving the 1,000,000-entry
cache again and again while another thread wakes every millisecond and calls get() (how late it
completes is the stall a libmilter thread would see); and against the daemon, C connections of
cached decisions with BackListSaveInterval: 1 against the same without periodic saves and against
the do-nothing milter, each loaded back to back and then paced (a pause after each message, as
an MTA has between its SMTP client's messages).

Finally the start-up time of the daemon to its socket answering a negotiation, empty cache.

    .venv/bin/python bench/cache_scale.py [--sizes 1000,100000,1000000] [--quick]
"""

from __future__ import annotations

import argparse
import array
import bisect
import os
import random
import shutil
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from common import (print_notes, run_main, BenchDaemon, LoadResult, LoadSpec, LogWatcher, NullMilterProcess,
                    cache_max_for, daemon_conf, fmt, machine_line, percentile, proc_status, run_load, say,
                    table, write_cache_file)
from scam_back import cache as cachemod
from scam_back import config as configmod
from tests.postfix import free_ports

LOADED = "entries loaded"
SAVED = " saved"
STALL_LIMIT = 0.050          # seconds: issue 5's longest allowed stall of a decision by a save


@dataclass(frozen=True)
class Pace:
    """One way to load a milter for the stall rows: back to back, or with a pause per message."""

    name: str
    conns: int
    seconds: float
    pause: float = 0.0

    def spec(self, address: str, size: int) -> LoadSpec:
        return LoadSpec(address, self.conns, self.seconds, ("cached", size), warmup=0.5,
                        pause=self.pause)

    def text(self) -> str:
        between = f", {self.pause * 1000:g} ms between messages" if self.pause else ", back to back"
        return f"{self.conns} connections{between}"


def paces(args: argparse.Namespace) -> list[Pace]:
    """Back to back (libmilter's worst case, see the table's note), then paced like an MTA."""
    return [Pace("back to back", args.stall_conns, args.stall_seconds),
            Pace("paced", args.paced_conns, args.stall_seconds, args.pause_ms / 1000)]


def null_milter_runs(size: int, loads: Sequence[Pace]) -> dict:
    """The do-nothing milter under the same loads: libmilter's own stalls, without our code."""
    null = NullMilterProcess().start()
    try:
        return {pace.name: (run_load(pace.spec(null.address, size), watch={"milter": null.pid}), 0)
                for pace in loads}
    finally:
        null.stop()


def stall_row(name: str, size: int, pace: Pace, run: dict) -> list[str]:
    result, saves = run[pace.name]
    return [name, f"{size:,}", pace.text(), f"{result.rate:,.0f}", fmt(result.pct_ms(99)),
            fmt(result.pct_ms(99.9)), fmt(result.max_ms, 1), str(over_limit(result.latencies)),
            str(saves)]


def load_notes(name: str, result: LoadResult) -> list[str]:
    """Errors and unexpected replies of one load, for the notes under the tables."""
    notes = [f"{name}: {error}" for error in result.errors[:3]]
    if result.not_continue:
        notes.append(f"{name}: replies {dict(result.replies)}")
    return notes


def over_limit(latencies: Sequence[float]) -> int:
    """How many of these sorted latencies (seconds) are over STALL_LIMIT."""
    return len(latencies) - bisect.bisect_right(latencies, STALL_LIMIT)


def make_cache(config: configmod.Config) -> cachemod.VerdictCache:
    """A VerdictCache built the way the daemon builds it (scam_back/daemon.py serve())."""
    try:
        return cachemod.VerdictCache(config.valid_ttl, config.invalid_ttl, config.cache_max,
                                     invalid_max=config.invalid_cache_max,
                                     stale_grace=config.stale_grace)
    except TypeError:
        return cachemod.VerdictCache(config.valid_ttl, config.invalid_ttl, config.cache_max)


def config_for(size: int) -> configmod.Config:
    text = daemon_conf(25, cache_max=cache_max_for(size))
    return configmod.parse_text(text, "/bench/scam.conf")


class DirWatcher:
    """Notes when the first new entry appears in a directory (the save's temporary file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.before = set(os.listdir(path))
        self.first: float = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.first:
            try:
                if set(os.listdir(self.path)) - self.before:
                    self.first = time.monotonic()
            except OSError:
                pass
            self._stop.wait(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def daemon_size_run(size: int, backend_port: int, loads: Sequence[Pace] = (),
                    save_interval: int = 0) -> dict:
    """Start the daemon with a cache of `size`, read its RSS, drive each of `loads`, stop it."""
    conf = daemon_conf(backend_port, cache_max=cache_max_for(size), save_interval=save_interval)
    daemon = BenchDaemon(conf, cache_entries=size)
    watcher = LogWatcher(daemon.logpath, [LOADED], poll=0.002).start(from_end=False)
    out: dict = {"size": size}
    try:
        daemon.start()
        out["ready"] = daemon.ready_s
        loaded_at = watcher.wait(LOADED, 30)
        watcher.stop()
        try:
            pid_written = os.stat(daemon.pidfile).st_mtime
            loaded_wall = time.time() - (time.monotonic() - loaded_at) if loaded_at else None
            out["load_log"] = loaded_wall - pid_written if loaded_wall else float("nan")
        except OSError:
            out["load_log"] = float("nan")
        time.sleep(0.3)
        out["rss"] = daemon.rss_mb()
        out["hwm"] = proc_status(daemon.pid, "VmHWM") / 1024
        out["file_mb"] = os.path.getsize(daemon.cachefile) / 1e6
        for pace in loads:
            saves0 = daemon.count_log(SAVED)
            result = run_load(pace.spec(daemon.address, size), watch={"milter": daemon.pid})
            out[pace.name] = (result, daemon.count_log(SAVED) - saves0)
        # Stop: SIGTERM -> libmilter returns (up to ~5 s) -> save (temporary file) -> "saved" -> exit.
        saved_watch = LogWatcher(daemon.logpath, [SAVED], poll=0.002).start(from_end=True)
        dir_watch = DirWatcher(daemon.dir)
        t_sig = time.monotonic()
        daemon.terminate(120)
        t_exit = time.monotonic()
        saved_at = saved_watch.wait(SAVED, 2)
        saved_watch.stop()
        dir_watch.stop()
        out["sig_to_saved"] = saved_at - t_sig if saved_at else float("nan")
        out["sig_to_exit"] = t_exit - t_sig
        out["write"] = saved_at - dir_watch.first if saved_at and dir_watch.first else float("nan")
    finally:
        watcher.stop()
        daemon.stop()
    return out


def inprocess(size: int, lookups: int) -> dict:
    """Load, lookups and save of a VerdictCache in this process."""
    folder = tempfile.mkdtemp(prefix="scam-back-bench-cache-")
    try:
        path = os.path.join(folder, "backscatter.txt")
        write_cache_file(path, size, owner=None)
        cache = make_cache(config_for(size))
        t0 = time.perf_counter()
        cache.load(path)
        load_s = time.perf_counter() - t0
        rnd = random.Random(7)
        hits = [f"user{rnd.randrange(size)}@example.net" for _ in range(lookups)]
        misses = [f"nobody{i}@example.net" for i in range(lookups // 2)]
        get = cache.get
        t0 = time.perf_counter()
        for key in hits:
            get(key)
        hit_us = (time.perf_counter() - t0) / len(hits) * 1e6
        t0 = time.perf_counter()
        for key in misses:
            get(key)
        miss_us = (time.perf_counter() - t0) / len(misses) * 1e6
        t0 = time.perf_counter()
        saved = cache.save(os.path.join(folder, "saved.txt"))
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache.save(os.path.join(folder, "saved.txt"), serving=True)
        serving_s = time.perf_counter() - t0
        return {"load": load_s, "save": save_s, "serving": serving_s, "saved": saved, "hit_us": hit_us,
                "miss_us": miss_us, "entries": len(cache), "cache": cache, "folder": folder}
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def ticker_stalls(cache: cachemod.VerdictCache, size: int, seconds: float, folder: str,
                  with_saver: bool) -> dict:
    """A thread wakes every 1 ms and calls get(); how late each get() completes, with or without
    another thread saving the cache over and over."""
    stop = threading.Event()
    saves: list[float] = []

    def saver() -> None:
        path = os.path.join(folder, "stall.txt")
        while not stop.is_set() and len(saves) < 1000:
            t0 = time.perf_counter()
            cache.save(path, serving=True)        # as the daemon's periodic save does
            saves.append(time.perf_counter() - t0)

    thread = threading.Thread(target=saver, daemon=True) if with_saver else None
    if thread:
        thread.start()
    lateness = array.array("d")
    rnd = random.Random(3)
    keys = [f"user{rnd.randrange(size)}@example.net" for _ in range(5000)]
    end = time.perf_counter() + seconds
    target = time.perf_counter()
    i = 0
    while True:
        target += 0.001
        now = time.perf_counter()
        if target > now:
            time.sleep(target - now)
        cache.get(keys[i % len(keys)])
        i += 1
        done = time.perf_counter()
        lateness.append(done - target)
        if done >= end:
            break
        if done - target > 0.001:
            target = done            # do not try to catch up after a stall
    stop.set()
    if thread:
        thread.join(60)
    values = sorted(lateness)
    return {"max": values[-1] * 1000, "p999": percentile(values, 99.9) * 1000,
            "p99": percentile(values, 99) * 1000, "samples": len(values), "saves": len(saves),
            "over": over_limit(values),
            "save_mean": statistics.mean(saves) if saves else float("nan")}


def empty_startups(runs: int, backend_port: int) -> list[tuple[float, float]]:
    """(socket exists, negotiation answered) seconds after exec, empty cache; stopped with SIGKILL
    by pid (nothing to save)."""
    out = []
    for _ in range(runs):
        daemon = BenchDaemon(daemon_conf(backend_port))
        try:
            daemon.start()
            out.append((daemon.socket_s, daemon.ready_s))
        finally:
            if daemon.pid:
                try:
                    os.kill(daemon.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            daemon.stop(10)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--lookups", type=int, default=200_000, help="get() calls timed per size")
    parser.add_argument("--stall-seconds", type=float, default=6.0,
                        help="length of each stall measurement")
    parser.add_argument("--stall-conns", type=int, default=10,
                        help="milter connections for the daemon stall measurement")
    parser.add_argument("--paced-conns", type=int, default=30,
                        help="milter connections for the paced stall measurement")
    parser.add_argument("--pause-ms", type=float, default=3.0,
                        help="pause per message of the paced stall measurement")
    parser.add_argument("--startups", type=int, default=3, help="empty-cache start-up runs")
    parser.add_argument("--quick", action="store_true", help="sizes 1000,100000; short stalls")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.stall_seconds, args.lookups, args.startups = "1000,100000", 2.0, 50_000, 2
    args.sizes = [int(v) for v in str(args.sizes).split(",") if v]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    port = free_ports(1)[0]          # nothing listens: every probe would be trouble (none expected)
    largest = max(args.sizes)
    size_rows, stall_rows, notes = [], [], []
    loads = paces(args)
    by_way: dict[str, dict] = {}      # the stall rows' milters, each with a result per load

    for size in args.sizes:
        say(f"daemon with {size:,} entries")
        run = daemon_size_run(size, port, loads if size == largest else ())
        say(f"in-process cache with {size:,} entries")
        mem = inprocess(size, args.lookups)
        try:
            size_rows.append([f"{size:,}", fmt(run["file_mb"], 1), fmt(run["rss"], 0), fmt(run["hwm"], 0),
                              fmt(run["ready"]), fmt(run["load_log"]), fmt(mem["load"]),
                              fmt(run["write"]), fmt(run["sig_to_saved"]), fmt(run["sig_to_exit"]),
                              fmt(mem["save"]), fmt(mem["serving"]), fmt(mem["hit_us"]),
                              fmt(mem["miss_us"])])
            if mem["entries"] != size or mem["saved"] != size:
                notes.append(f"{size:,}: in-process cache holds {mem['entries']:,}, saved {mem['saved']:,}")
            if size == largest:
                say("stalls: in-process get() every 1 ms, without then with a saving thread")
                quiet = ticker_stalls(mem["cache"], size, args.stall_seconds, mem["folder"], False)
                busy = ticker_stalls(mem["cache"], size, args.stall_seconds, mem["folder"], True)
                for name, res in (("in-process, no save", quiet), ("in-process, saving in a loop", busy)):
                    stall_rows.append([name, f"{size:,}", "1 ticker (1 ms)", "-", fmt(res["p99"]),
                                       fmt(res["p999"]), fmt(res["max"], 1), str(res["over"]),
                                       f"{res['saves']} ({fmt(res['save_mean'])} s each)"
                                       if res["saves"] else "0"])
                say("the do-nothing milter under the same loads")
                by_way["do-nothing milter"] = null_milter_runs(size, loads)
                by_way["daemon, BackListSaveInterval: 0"] = run
        finally:
            shutil.rmtree(mem["folder"], ignore_errors=True)
            mem.clear()

    say(f"daemon with {largest:,} entries and BackListSaveInterval: 1 under load")
    by_way["daemon, BackListSaveInterval: 1"] = daemon_size_run(largest, port, loads, save_interval=1)
    for pace in loads:
        for way, run in by_way.items():
            stall_rows.append(stall_row(way, largest, pace, run))
            notes.extend(load_notes(f"{way}, {pace.name}", run[pace.name][0]))

    say("empty-cache start-ups")
    starts = empty_startups(args.startups, port)

    print("## cache_scale: cache size, memory, load/save, lookups, save stalls, start-up\n")
    print(f"{machine_line()}; cache files of valid entries (`0 userN@example.net EXPIRY`).\n")
    print(table(["entries", "file MB", "daemon RSS MB", "peak RSS MB", "exec->ready s",
                 "load s (pid file->log)", "load s (in-process)", "save write s (daemon)",
                 "SIGTERM->saved s", "SIGTERM->exit s", "save s (in-process)",
                 "save while serving s (in-process)", "get hit us",
                 "get miss us"], size_rows))
    print()
    print("exec->ready: from exec to the socket answering a negotiation with the cache loaded. "
          "SIGTERM->saved includes libmilter's stop latency (up to ~5 s); 'save write' is from the "
          "save's temporary file appearing to the 'saved' log line. In-process figures are "
          "VerdictCache.load/save/get in this process (save includes fsync; 'while serving' is the "
          "daemon's periodic save, made in pieces with a pause after each).")
    print()
    print(table(["decisions while saving", "entries", "load", "RCPT/s", "p99 ms", "p99.9 ms",
                 "max ms", "over 50 ms", "saves done"], stall_rows))
    print()
    print("In-process: lateness of a get() scheduled every 1 ms (GIL wait + lookup), the saving "
          "thread saving as the daemon does while serving (VerdictCache.save(serving=True): in "
          "pieces, pausing after each). Daemon: RCPT decision latency over the milter protocol; "
          "'saves done' counts 'saved' log lines in the window; 'over 50 ms' counts decisions "
          "slower than that. Back to back, libmilter's worker pool stalls on its own, the "
          "do-nothing milter too: a worker keeps serving one connection while its next command "
          "comes within 1 ms (mi_rd_socket_ready), and a connection whose wake-up went to a "
          "worker already woken waits until some worker's connection pauses. An MTA pauses "
          "between messages; so do the paced rows, where a stall would be the save's.")
    print()
    print(table(["empty-cache start-up", "socket exists s", "negotiation answered s"],
                [[f"run {i + 1}", fmt(s, 3), fmt(r, 3)] for i, (s, r) in enumerate(starts)]))
    print()
    print("Targets (issue 5): RSS <= 250 MB at 1,000,000; load and save each < 3 s; no decision "
          "stalled > 50 ms by a save; start-up to ready < 1 s with an empty cache.")
    print_notes(notes)
    return 0


if __name__ == "__main__":
    run_main(main, "cache_scale")
