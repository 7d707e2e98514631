"""Process faults (issue 4): stop signals, kill -9 under load, 1,000 concurrent MTA connections."""

from __future__ import annotations

import os
import random
import resource
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import pytest

from ..milterclient import MilterError
from ..smtpbackend import Backend, ScriptedBackend
from .conftest import (FaultDaemon, Mta, ask, cache_entries, chown_to_run_user, conf, is_invalid,
                       random_ip, show)

STOP_BOUND = 7.0
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP, "SIGINT": signal.SIGINT}


# ---- stop signals ----

class Stopped:
    """One daemon per stop signal, each having learned a verdict, all signalled at once."""

    def __init__(self, module_daemons, backend: Backend) -> None:  # type: ignore[no-untyped-def]
        self.daemons = {name: module_daemons(conf({"example.net": backend.port},
                                                  "BackListSaveInterval: 0\n"))
                        for name in SIGNALS}
        for name, daemon in self.daemons.items():
            reply = ask(daemon, f"learned-{name.lower()}@example.net")[0]
            assert is_invalid(reply), show(reply)
        with ThreadPoolExecutor(max_workers=len(SIGNALS)) as pool:
            results = pool.map(lambda n: self.daemons[n].signal_and_wait(SIGNALS[n]), SIGNALS)
        self.results = dict(zip(SIGNALS, results))


@pytest.fixture(scope="module")
def stopped(module_daemons) -> Iterator[Stopped]:  # type: ignore[no-untyped-def]
    with Backend() as backend:
        yield Stopped(module_daemons, backend)


@pytest.mark.parametrize("name", list(SIGNALS))
def test_stop_signal_exits_cleanly_within_7_s_saving_the_cache(stopped: Stopped, name: str) -> None:
    daemon = stopped.daemons[name]
    code, elapsed = stopped.results[name]
    assert code is not None and elapsed <= STOP_BOUND, f"still running after {elapsed:.1f} s"
    assert code == 0, f"exit code {code}"
    assert not os.path.exists(daemon.pidfile), "pid file left behind"
    entries = cache_entries(daemon.cachefile)
    assert entries.get(f"learned-{name.lower()}@example.net") == "1", entries


# ---- kill -9 under load ----

KILLS = 20
SAVE_INTERVAL = 1.0
SAVE_SLACK = 0.7          # a save's own duration and scheduling, on top of the interval
PRELOAD = 20_000          # entries already cached, so that every save is a heavy write


def verdict_by_name(verb: str, line: str, number: int) -> Optional[bytes]:
    if verb != "RCPT":
        return None
    return b"250 2.1.5 Ok\r\n" if "-good@" in line else b"550 5.1.1 No such user\r\n"


class Load:
    """Keeps verifying new addresses, four per MTA connection, recording when each was learned."""

    def __init__(self, daemon: FaultDaemon, prefix: str, rng: random.Random) -> None:
        self.daemon, self.prefix, self.rng = daemon, prefix, rng
        self.learned: list[tuple[str, str, float]] = []       # address, code, when answered
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.counter = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with Mta(self.daemon, ip=random_ip(self.rng), timeout=5) as mta:
                    for _ in range(4):
                        self.counter += 1
                        good = self.counter % 2 == 0
                        address = f"{self.prefix}-{self.counter}-{'good' if good else 'bad'}@example.net"
                        reply = mta.rcpt(address)
                        if (good and reply.action == "continue") or (not good and is_invalid(reply)):
                            self.learned.append((address, "0" if good else "1", time.monotonic()))
            except (MilterError, OSError):
                if self.stop.wait(0.05):
                    return


def test_kill_9_twenty_times_under_load_leaves_a_complete_cache_file(daemons) -> None:
    rng = random.Random(9)
    with ScriptedBackend(replies=verdict_by_name) as backend:
        expiry = int(time.time()) + 86400

        def preload(d: FaultDaemon) -> None:
            with open(d.cachefile, "w") as handle:
                handle.writelines(f"0 preloaded{i}@example.net {expiry}\n" for i in range(PRELOAD))
            chown_to_run_user(d.cachefile)
        daemon = daemons(conf({"example.net": backend.port},
                              f"BackListSaveInterval: {int(SAVE_INTERVAL)}\n"), prepare=preload)
        previous = set(cache_entries(daemon.cachefile))
        for round_number in range(KILLS):
            if round_number:
                daemon.start()                   # stale pid file and socket left by kill -9
            started_at = time.monotonic()
            log_start = len(daemon.log())
            load = Load(daemon, f"k{round_number}", rng)
            load.thread.start()
            time.sleep(rng.uniform(0.3, 3.0))
            killed_at = time.monotonic()
            daemon.kill()
            load.stop.set()
            load.thread.join(10)
            assert not load.thread.is_alive()
            entries = cache_entries(daemon.cachefile)       # every line well formed
            lost = previous - set(entries)
            assert not lost, f"round {round_number}: {len(lost)} earlier entries lost"
            due = [(a, c) for a, c, t in load.learned if t <= killed_at - SAVE_INTERVAL - SAVE_SLACK]
            missing = [a for a, c in due if entries.get(a) != c]
            saves = [line for line in daemon.log()[log_start:].splitlines() if "saved" in line]
            assert not missing, (f"round {round_number}: {len(missing)} of {len(due)} verdicts "
                                 f"learned before the last save are missing, e.g. {missing[:3]}; "
                                 f"killed {killed_at - started_at:.2f} s after the start, first "
                                 f"answer after {load.learned[0][2] - started_at:.2f} s; "
                                 f"saves logged in this run: {saves}")
            previous = set(entries)
        assert len(previous) > PRELOAD


# ---- 1,000 concurrent MTA connections ----

CONNECTIONS = 1000
RSS_BOUND_KB = 300 * 1024


def test_a_thousand_concurrent_mta_connections_are_all_served(daemons) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * CONNECTIONS + 1024
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    rng = random.Random(1000)
    users = {f"user{i}@example.net" for i in range(0, 40, 2)}
    with Backend(users=users) as backend:
        daemon = daemons(conf({"example.net": backend.port}))
        ips = [random_ip(rng) for _ in range(CONNECTIONS)]
        clients: list[Optional[Mta]] = [None] * CONNECTIONS

        def open_one(index: int) -> None:
            clients[index] = Mta(daemon, ip=ips[index], timeout=60)

        def ask_one(index: int) -> bool:
            address = f"user{index % 40}@example.net"
            client = clients[index]
            assert client is not None
            reply = client.rcpt(address)
            return reply.action == "continue" if address in users else is_invalid(reply)
        try:
            with ThreadPoolExecutor(max_workers=64) as pool:
                list(pool.map(open_one, range(CONNECTIONS), timeout=120))
                assert all(c is not None for c in clients)
                threads_open = int(daemon.status()["Threads"])
                answered = list(pool.map(ask_one, range(CONNECTIONS), timeout=120))
            rss_open = daemon.rss_kb()
            fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        finally:
            with ThreadPoolExecutor(max_workers=64) as pool:
                list(pool.map(lambda c: c.close() if c else None, clients, timeout=120))
        assert sum(answered) == CONNECTIONS, f"{CONNECTIONS - sum(answered)} wrong or missing answers"
        assert fds > CONNECTIONS, f"only {fds} descriptors open in the daemon"
        assert daemon.alive()
        assert rss_open < RSS_BOUND_KB, f"VmRSS {rss_open} kB with {CONNECTIONS} connections open"
        good, bad = ask(daemon, "user0@example.net", "user1@example.net")
        assert good.action == "continue" and is_invalid(bad), (show(good), show(bad))
        assert daemon.rss_kb() < RSS_BOUND_KB
        print(f"threads with {CONNECTIONS} open: {threads_open}, fds {fds}, VmRSS {rss_open} kB")


