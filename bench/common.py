"""Shared benchmark helpers: the real daemon and a do-nothing milter started and stopped by pid,
pre-generated cache files, a multi-process milter-protocol load generator, /proc readings,
percentiles and tables.

Nothing here asserts anything: the scripts print what they measure.
"""

from __future__ import annotations

import array
import multiprocessing
import os
import pwd
import queue
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.conftest import IS_ROOT, RUN_USER, Daemon, user_dir  # noqa: E402
from tests.milterclient import MilterClient, MilterError  # noqa: E402
from tests import milterclient as mc  # noqa: E402
from tests.procs import pid_alive  # noqa: E402
from tests.smtpbackend import Backend  # noqa: E402

DOMAIN = "example.net"
CLIENT_HOST = "client.bench.example"
DAEMON_NAME = "mx.bench.example"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
STOP_TIMEOUT = 60.0          # libmilter needs up to ~5 s to notice SIGTERM, then a save


# ---------------------------------------------------------------- cache files

def cached_address(i: int, domain: str = DOMAIN) -> str:
    """The i-th address of a generated cache file."""
    return f"user{i}@{domain}"


def write_cache_file(path: str, entries: int, extra: Iterable[str] = (), valid: bool = True,
                     ttl: int = 86400, domain: str = DOMAIN, owner: Optional[str] = RUN_USER) -> float:
    """Write `entries` lines `0 user{i}@domain EXPIRY` (plus `extra` addresses) in the cache file
    format, fast (chunked joins); owned by the daemon's user. Returns the seconds it took.

    Expiries spread over the second half of the TTL, one per second, as a cache filled over
    hours has them (none is near enough to expiry to be refreshed)."""
    start = time.monotonic()
    code = "0" if valid else "1"
    expiry = int(time.time()) + ttl
    spread = max(1, ttl // 2)
    chunk = 200_000
    with open(path, "w", encoding="ascii") as handle:
        for first in range(0, entries, chunk):
            handle.write("".join([f"{code} user{i}@{domain} {expiry - i % spread}\n"
                                  for i in range(first, min(entries, first + chunk))]))
        handle.write("".join(f"{code} {address} {expiry}\n" for address in extra))
    os.chmod(path, 0o600)
    if IS_ROOT and owner:
        entry = pwd.getpwnam(owner)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return time.monotonic() - start


INVALID_CACHE_MAX = 100_000     # scam-back's default BackInvalidCacheMax


def cache_max_for(valid_entries: int) -> int:
    """A BackCacheMax that holds `valid_entries` valid entries: the invalid share
    (BackInvalidCacheMax) is set apart from BackCacheMax, so the default 1,000,000 keeps only
    900,000 valid ones and a 1,000,000-line file would lose its first 100,000 at load."""
    return max(1_000_000, valid_entries + INVALID_CACHE_MAX)


def daemon_conf(backend_port: int, extra: str = "", log_level: str = "info",
                cache_max: Optional[int] = None, save_interval: int = 0) -> str:
    """scam.conf for the benchmarks: example.net verified at 127.0.0.1:backend_port."""
    if cache_max is None:
        cache_max = cache_max_for(0)
    return (f"BackSMTPPort: {backend_port}\nBackSMTPServer: 127.0.0.1\nBackAddrDomain: {DOMAIN}\n"
            "HeloName: mx.bench.example\nTimeoutSMTPConnect: 2\nTimeoutSMTPReply: 5\n"
            f"BackCacheMax: {cache_max}\nBackListSaveInterval: {save_interval}\n"
            f"BackInvalidCacheMax: {INVALID_CACHE_MAX}\nLogLevel: {log_level}\n" + extra)


# ---------------------------------------------------------------- /proc readings

def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: Optional[int]) -> float:
    """utime + stime of a process (all its threads), seconds; 0 if it is gone."""
    if not pid:
        return 0.0
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int, key: str) -> int:
    """A kB value (VmRSS, VmHWM...) from /proc/PID/status; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(pid: int) -> float:
    return proc_status(pid, "VmRSS") / 1024


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


def stop_pid(pid: Optional[int], timeout: float = STOP_TIMEOUT, proc: Optional[subprocess.Popen] = None) -> None:
    """SIGTERM one process by pid, bounded wait, then SIGKILL."""
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return
        if proc is None and not pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


# ---------------------------------------------------------------- milters

PROTOCOL_NAMES = [(getattr(mc, name), name) for name in (
    "P_NOCONNECT", "P_NOHELO", "P_NOMAIL", "P_NORCPT", "P_NOBODY", "P_NOHDRS", "P_NOEOH",
    "P_NR_HDR", "P_NOUNKNOWN", "P_NODATA", "P_SKIP", "P_RCPT_REJ", "P_NR_CONN", "P_NR_HELO",
    "P_NR_MAIL", "P_NR_RCPT", "P_NR_DATA", "P_NR_UNKN", "P_NR_EOH", "P_NR_BODY", "P_HDR_LEADSPC")]


def protocol_text(bits: int) -> str:
    """Negotiated protocol bits as names (P_SKIP omitted)."""
    return " ".join(name[2:] for bit, name in PROTOCOL_NAMES if bits & bit and name != "P_SKIP")


def wait_ready(address: str, timeout: float) -> tuple[float, int]:
    """Wait until the milter answers an option negotiation; (seconds waited, protocol bits).

    libmilter's socket exists (and queues connections) before the milter serves, so only a
    negotiation reply means ready."""
    start = time.monotonic()
    deadline = start + timeout
    last: Exception = TimeoutError("not tried")
    while time.monotonic() < deadline:
        try:
            with MilterClient(address, timeout=max(0.1, deadline - time.monotonic())) as client:
                client.negotiate()
                return time.monotonic() - start, client.protocol
        except (MilterError, OSError) as exc:
            last = exc
            time.sleep(0.01)
    raise RuntimeError(f"milter at {address} not ready in {timeout} s: {last}")


class BenchDaemon(Daemon):
    """The real scam-back (tests.conftest.Daemon) with a pre-generated cache file, ready = the
    first answered negotiation, and long stop timeouts (a million entries are saved at exit)."""

    def __init__(self, conf_text: str, cache_entries: int = 0, cache_extra: Sequence[str] = (),
                 extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(conf_text, extra_args)
        os.rmdir(self.dir)                   # the same layout, under a name of our own
        self.dir = user_dir("scam-back-bench-")
        for name, base in (("socket", "scam-back.sock"), ("pidfile", "scam-back.pid"),
                           ("cachefile", "backscatter.txt"), ("conf", "scam.conf"),
                           ("logpath", "stderr.log")):
            setattr(self, name, os.path.join(self.dir, base))
        self.cache_entries = cache_entries
        self.cache_extra = tuple(cache_extra)
        self.cache_write_s = 0.0
        self.socket_s = self.ready_s = 0.0
        self.protocol = 0
        self.started_at = 0.0

    def start(self, timeout: float = 120.0) -> "BenchDaemon":  # type: ignore[override]
        if self.cache_entries or self.cache_extra:
            self.cache_write_s = write_cache_file(self.cachefile, self.cache_entries, self.cache_extra)
        t0 = self.started_at = time.monotonic()
        super().start(timeout=timeout)
        self.socket_s = time.monotonic() - t0
        try:
            _, self.protocol = wait_ready(self.address, timeout)
        except RuntimeError:
            self.stop()
            raise
        self.ready_s = time.monotonic() - t0
        return self

    def rss_mb(self) -> float:
        return rss_mb(self.pid) if self.pid else 0.0

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def count_log(self, needle: str) -> int:
        try:
            with open(self.logpath, "rb") as handle:
                return handle.read().count(needle.encode())
        except OSError:
            return 0

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:  # type: ignore[override]
        self.terminate(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)


class AcceptAllBackend(Backend):
    """tests.smtpbackend.Backend that accepts every recipient: a cache miss in a benchmark then
    costs a probe (counted: rcpt_count()) but never a rejection."""

    def rcpt_reply_for(self, address: str) -> str:
        return "250 2.1.5 OK"

    def rcpt_count(self) -> int:
        with self._cond:
            return sum(1 for line in self.transcript if line[:4].upper() == "RCPT")


class NullMilterProcess:
    """bench/null_milter.py as a subprocess on a unix socket in its own directory."""

    def __init__(self) -> None:
        self.dir = user_dir("scam-back-bench-null-")
        self.socket = os.path.join(self.dir, "null.sock")
        self.address = f"unix:{self.socket}"
        self.logpath = os.path.join(self.dir, "stderr.log")
        self.proc: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None
        self.ready_s = 0.0
        self.protocol = 0

    def start(self, timeout: float = 30.0) -> "NullMilterProcess":
        log = open(self.logpath, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "null_milter.py"), self.address],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        self.pid = self.proc.pid
        try:
            _, self.protocol = wait_ready(self.address, timeout)
        except RuntimeError:
            self.stop()
            raise
        self.ready_s = time.monotonic() - t0
        return self

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return rss_mb(self.pid) if self.pid else 0.0

    def stop(self, timeout: float = 15.0) -> None:
        stop_pid(self.pid, timeout, self.proc)
        self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- load generator

@dataclass(frozen=True)
class LoadSpec:
    """What each of `connections` MTA-side milter connections sends, for `seconds` after a
    `warmup` whose decisions are not counted.

    recipients: ("cached", N) random user{k}@example.net with k < N; ("unique", tag) a new
    address for every RCPT. tx_per_conn: transactions per milter connection (0: one
    connection for the whole run); each transaction is MAIL, `rcpts` RCPTs, then end of message
    (end="eom") or abort (end="abort"). pause: seconds a connection waits after each
    transaction, as an MTA waits for its SMTP client's next message (0: back to back).
    """

    address: str
    connections: int
    seconds: float
    recipients: tuple = ("cached", 1000)
    rcpts: int = 5
    warmup: float = 0.5
    tx_per_conn: int = 0
    end: str = "eom"
    procs: int = 0
    timeout: float = 15.0
    seed: int = 1
    pause: float = 0.0


@dataclass
class LoadResult:
    """Decisions completed inside the measuring window, their latencies (seconds, sorted)."""

    window: float
    decisions: int = 0
    latencies: list = field(default_factory=list)
    replies: Counter = field(default_factory=Counter)
    errors: list = field(default_factory=list)
    client_cpu: float = 0.0          # seconds of CPU used by the load processes in the window
    procs: int = 0
    connections_opened: int = 0
    transactions: int = 0
    all_decisions: int = 0           # every RCPT answered, warm-up and tail included
    watched_cpu: dict = field(default_factory=dict)   # name -> CPU seconds in the window
    system_busy: float = 0.0         # fraction of all cores busy during the window

    @property
    def rate(self) -> float:
        return self.decisions / self.window if self.window > 0 else 0.0

    def pct_ms(self, p: float) -> float:
        return percentile(self.latencies, p) * 1000

    @property
    def max_ms(self) -> float:
        return self.latencies[-1] * 1000 if self.latencies else float("nan")

    @property
    def not_continue(self) -> int:
        return sum(n for kind, n in self.replies.items() if kind != "continue")


def auto_procs(connections: int) -> int:
    """Client processes: enough that no single GIL limits the load (about 10 connections each)."""
    return max(1, min(connections, max(2, (connections + 9) // 10)))


def _recipient_source(spec: LoadSpec, wid: int, tid: int):  # type: ignore[no-untyped-def]
    kind = spec.recipients[0]
    if kind == "cached":
        count = int(spec.recipients[1])
        rnd = random.Random(spec.seed * 1_000_003 + wid * 1009 + tid)
        randrange = rnd.randrange
        return lambda: f"user{randrange(count)}@{DOMAIN}"
    if kind == "unique":
        tag = spec.recipients[1]
        domain = spec.recipients[2] if len(spec.recipients) > 2 else DOMAIN
        counter = iter(range(1 << 62))
        return lambda: f"new-{tag}-{wid}-{tid}-{next(counter)}@{domain}"
    raise ValueError(f"unknown recipients spec {spec.recipients!r}")


def _open(spec: LoadSpec, wid: int, tid: int) -> MilterClient:
    client = MilterClient(spec.address, timeout=spec.timeout)
    client.negotiate()
    client.connect(CLIENT_HOST, "inet", f"192.0.2.{1 + (wid * 37 + tid) % 250}", 40000 + tid,
                   macros={"j": DAEMON_NAME, "{daemon_name}": DAEMON_NAME})
    client.helo(CLIENT_HOST)
    return client


def _connection_thread(spec: LoadSpec, wid: int, tid: int, opened_barrier: threading.Barrier,
                       barrier: threading.Barrier, times: list, out: dict) -> None:
    latencies = array.array("d")
    replies: Counter = Counter()
    errors: list[str] = []
    opened = transactions = answered = 0
    next_rcpt = _recipient_source(spec, wid, tid)
    client: Optional[MilterClient] = None
    try:
        client = _open(spec, wid, tid)
        opened += 1
    except Exception as exc:  # reported, the thread still meets the barrier
        errors.append(f"open: {exc}")
    try:
        opened_barrier.wait(60)
        barrier.wait(180)
    except threading.BrokenBarrierError:
        errors.append("barrier broken")
        if client is not None:
            client.close()
            client = None
    if client is not None:
        w0, t_end = times[0], times[1]
        monotonic = time.monotonic
        done_here = 0
        try:
            while monotonic() < t_end:
                if client is None:
                    client = _open(spec, wid, tid)
                    opened += 1
                    done_here = 0
                # As Postfix and sendmail do, the queue id comes with MAIL FROM.
                client.mail("<sender@example.org>", macros={
                    "{mail_addr}": "sender@example.org", "i": f"{wid:X}Q{tid:X}Q{transactions:X}"})
                for _ in range(spec.rcpts):
                    rcpt = next_rcpt()
                    sent = monotonic()
                    reply = client.rcpt(f"<{rcpt}>", macros={"{rcpt_addr}": rcpt})
                    got = monotonic()
                    answered += 1
                    if sent >= w0 and got <= t_end:
                        latencies.append(got - sent)
                        replies[reply.action if reply.action != "replycode" else
                                "reject" if reply.code.startswith("5") else "tempfail"] += 1
                if spec.end == "eom":
                    client.eom()
                else:
                    client.abort()
                transactions += 1
                done_here += 1
                if spec.pause:
                    time.sleep(spec.pause)
                if spec.tx_per_conn and done_here >= spec.tx_per_conn:
                    client.quit()
                    client = None
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if client is not None:
                try:
                    client.quit()
                except Exception:
                    pass
    out[tid] = (latencies, replies, errors, opened, transactions, answered)


def _worker(spec: LoadSpec, wid: int, nconns: int, results: "multiprocessing.Queue",
            go: "multiprocessing.synchronize.Event", start_at: "multiprocessing.sharedctypes.Synchronized") -> None:
    """One load process: nconns connection threads, released together at the parent's go."""
    times: list = [0.0, 0.0]
    out: dict = {}
    opened_barrier = threading.Barrier(nconns + 1)
    barrier = threading.Barrier(nconns + 1)
    threads = [threading.Thread(target=_connection_thread,
                                args=(spec, wid, t, opened_barrier, barrier, times, out),
                                daemon=True) for t in range(nconns)]
    for thread in threads:
        thread.start()
    try:
        opened_barrier.wait(60)
    except threading.BrokenBarrierError:
        pass
    results.put(("ready", wid))
    if not go.wait(120):
        barrier.abort()
        results.put(("done", wid, b"", Counter(), ["no go signal"], 0, 0, 0.0, 0))
        return
    go_at = start_at.value
    times[0] = go_at + spec.warmup
    times[1] = times[0] + spec.seconds
    while time.monotonic() < go_at:
        time.sleep(0.001)
    try:
        barrier.wait(60)
    except threading.BrokenBarrierError:
        pass
    time.sleep(max(0.0, times[0] - time.monotonic()))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(max(0.0, times[1] - time.monotonic()))
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    for thread in threads:
        thread.join(max(0.1, times[1] + spec.timeout + 5 - time.monotonic()))
    latencies = array.array("d")
    replies: Counter = Counter()
    errors: list[str] = []
    opened = transactions = answered = 0
    for lat, rep, err, op, tx, ans in out.values():
        answered += ans
        latencies.extend(lat)
        replies.update(rep)
        errors.extend(err)
        opened += op
        transactions += tx
    if len(out) < nconns:
        errors.append(f"{nconns - len(out)} connection threads did not finish")
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    results.put(("done", wid, latencies.tobytes(), replies, errors[:20], opened, transactions, cpu,
                 answered))


def run_load(spec: LoadSpec, watch: Optional[dict] = None) -> LoadResult:
    """Drive a milter from spec.connections connections spread over several processes.

    watch: name -> pid whose CPU seconds in the measuring window are reported."""
    procs = spec.procs or auto_procs(spec.connections)
    procs = min(procs, spec.connections)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    shares = [spec.connections // procs + (1 if i < spec.connections % procs else 0) for i in range(procs)]
    workers = [ctx.Process(target=_worker, args=(spec, wid, n, results, go, start_at), daemon=True)
               for wid, n in enumerate(shares)]
    result = LoadResult(window=spec.seconds, procs=procs)
    try:
        for worker in workers:
            worker.start()
        ready = 0
        deadline = time.monotonic() + 60
        while ready < procs and time.monotonic() < deadline:
            try:
                message = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if message[0] == "ready":
                ready += 1
        if ready < procs:
            result.errors.append(f"only {ready} of {procs} load processes started")
        go_at = time.monotonic() + 0.3 + 0.002 * spec.connections
        start_at.value = go_at
        go.set()
        w0 = go_at + spec.warmup
        w1 = w0 + spec.seconds
        time.sleep(max(0.0, w0 - time.monotonic()))
        cpu0 = {name: cpu_seconds(pid) for name, pid in (watch or {}).items()}
        sys0 = system_cpu()
        time.sleep(max(0.0, w1 - time.monotonic()))
        cpu1 = {name: cpu_seconds(pid) for name, pid in (watch or {}).items()}
        sys1 = system_cpu()
        result.watched_cpu = {name: cpu1[name] - cpu0[name] for name in cpu0}
        result.system_busy = (sys1[0] - sys0[0]) / max(1, sys1[1] - sys0[1])
        latencies = array.array("d")
        done = 0
        deadline = w1 + spec.timeout + 30
        while done < procs and time.monotonic() < deadline:
            try:
                message = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if message[0] != "done":
                continue
            _, _, raw, replies, errors, opened, transactions, cpu, answered = message
            result.all_decisions += answered
            done += 1
            chunk = array.array("d")
            chunk.frombytes(raw)
            latencies.extend(chunk)
            result.replies.update(replies)
            result.errors.extend(errors)
            result.connections_opened += opened
            result.transactions += transactions
            result.client_cpu += cpu
        if done < procs:
            result.errors.append(f"only {done} of {procs} load processes reported")
        result.latencies = sorted(latencies)
        result.decisions = len(result.latencies)
    finally:
        go.set()
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.terminate()          # SIGTERM to that worker's pid
                worker.join(5)
        results.close()
    return result


# ---------------------------------------------------------------- numbers and tables

def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan if empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-p * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def fmt(value: float, digits: int = 2) -> str:
    if value != value:  # nan
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and a == a and b == b else "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table, columns padded for plain-text reading."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line([str(h) for h in headers]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def pin_process(pid: int, cpus: set[int]) -> None:
    """Move every thread of a process to these CPUs (threads it starts later inherit them)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:             # the thread ended meanwhile
            pass


def machine_line() -> str:
    """One line describing the machine, for the report headers."""
    model = ""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{CORES} cores ({model or 'unknown CPU'}), Python {sys.version.split()[0]}"


def say(*parts: object) -> None:
    """Progress on stderr (stdout carries only the report)."""
    print(*parts, file=sys.stderr, flush=True)


class LogWatcher:
    """Polls a growing log file (bounded) and notes when each needle first appears after start()."""

    def __init__(self, path: str, needles: Sequence[str], poll: float = 0.002) -> None:
        self.path, self.needles, self.poll = path, list(needles), poll
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._offset = 0

    def start(self, from_end: bool = True) -> "LogWatcher":
        try:
            self._offset = os.path.getsize(self.path) if from_end else 0
        except OSError:
            self._offset = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        tail = b""
        while not self._stop.is_set() and len(self.seen) < len(self.needles):
            try:
                with open(self.path, "rb") as handle:
                    handle.seek(self._offset)
                    data = handle.read()
            except OSError:
                data = b""
            now = time.monotonic()
            if data:
                self._offset += len(data)
                text = tail + data
                for needle in self.needles:
                    if needle not in self.seen and needle.encode() in text:
                        self.seen[needle] = now
                tail = text[-200:]
            self._stop.wait(self.poll)

    def wait(self, needle: str, timeout: float) -> Optional[float]:
        deadline = time.monotonic() + timeout
        while needle not in self.seen and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.seen.get(needle)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)


def print_notes(notes: list[str]) -> None:
    """The '- note' lines under a benchmark's tables, and the closing blank line."""
    if notes:
        print()
        for note in notes:
            print(f"- {note}")
    print()


def run_main(main: "Callable[[list[str]], int]", name: str) -> None:
    """Run a benchmark's main(argv), say how long it took, exit with its code."""
    start = time.monotonic()
    code = main(sys.argv[1:])
    say(f"{name} done in {time.monotonic() - start:.0f} s")
    sys.exit(code)
