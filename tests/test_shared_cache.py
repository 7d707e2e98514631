"""The shared cache (BackCache: redis://...): verdicts shared between scam-back daemons through a
real redis-server on 127.0.0.1.

Two real daemons share one Redis: what one learns from the backend the other answers with no
probe; a flush given to either (scam-back-ctl over its control socket) reaches Redis and both
local caches; Redis killed or hung costs no verdict and no recipient (each daemon carries on with
its local cache, logs the outage and the recovery once each); a Redis password comes from
BackCachePasswordFile, read before the privilege drop. SharedCache itself is tested against the
real Redis too.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis

from scam_back.sharedcache import ADDRESS_PREFIX, FLUSH_CHANNEL, SharedCache
from scam_back.stats import Stats

from .conftest import IS_ROOT, RUN_USER, backend_conf, run_cli, user_dir
from .faults.conftest import (FaultDaemon, Mta, ask, is_invalid, is_tempfail, route_lines, show,
                              verdict_lines, wait_until)
from .redisserver import RedisServer
from .smtpbackend import Backend, refused_port

VALID_TTL, INVALID_TTL = 600, 300
CACHE_TIMEOUT = 0.2
CTL = Path(sys.executable).with_name("scam-back-ctl")
PROMPT = 5.0            # generous bound on one MTA conversation that must not wait for Redis
RECOVERY = 40.0         # the breaker leaves Redis alone for up to 30 s

# The backend's users; every other address in one.test or two.test is unknown (550 5.1.1).
USERS = {f"{name}@{domain}" for name in ("alice", "bob", "carol", "dave", "erin", "frank",
                                         "grace", "heidi", "ivan", "judy", "mallory", "oscar",
                                         "peggy", "trent", "victor", "walter")
         for domain in ("one.test", "two.test")}


# ---- fixtures ----

@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1 (free port, no persistence), stopped by pid at the end."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def smtp() -> Iterator[Backend]:
    """A real SMTP backend for one.test and two.test that knows USERS."""
    with Backend(users=USERS) as server:
        yield server


class Daemons:
    """Starts FaultDaemons; each is killed by pid (and its directory removed) at teardown."""

    def __init__(self) -> None:
        self.started: list[FaultDaemon] = []

    def __call__(self, conf_text: str) -> FaultDaemon:
        daemon = FaultDaemon(conf_text)
        self.started.append(daemon)
        return daemon.start()

    def discard(self) -> None:
        for daemon in self.started:
            daemon.discard()


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    started = Daemons()
    yield started
    started.discard()


class Records(logging.Handler):
    """The scam-back logger's records, caught on the logger itself (setup() may have stopped
    it propagating to the root logger, where caplog listens)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, word: str) -> list[str]:
        return [r.getMessage() for r in list(self.records) if word in r.getMessage()]


@pytest.fixture
def scam_log() -> Iterator[Records]:
    logger = logging.getLogger("scam-back")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def root_dir() -> Iterator[str]:
    """A directory only root can enter (for password files the daemon's user must not read)."""
    path = tempfile.mkdtemp(prefix="scam-back-secret-")
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---- helpers ----

def shared_conf(smtp: Backend, server: RedisServer, extra: str = "") -> str:
    """one.test and two.test routed to the backend, BackCache on the test Redis."""
    return backend_conf(smtp, route_lines("two.test", smtp.port) +
                        f"BackCache: {server.url}\nBackCacheTimeout: {CACHE_TIMEOUT}\n"
                        f"BackValidAddrExp: {VALID_TTL}\nBackInvalidAddrExp: {INVALID_TTL}\n"
                        "BackMaxInvalidPerConnection: 0\n" + extra, domain="one.test")


def key(address: str) -> str:
    return ADDRESS_PREFIX + address.lower()


def control(daemon: FaultDaemon) -> str:
    """The default control socket: the pid file's name with .ctl for .pid."""
    return os.path.join(daemon.dir, "scam-back.ctl")


def ctl(daemon: FaultDaemon, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(CTL), "-s", control(daemon), *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def ctl_ok(daemon: FaultDaemon, *args: str) -> str:
    done = ctl(daemon, *args)
    assert done.returncode == 0, f"scam-back-ctl {' '.join(args)}: exit {done.returncode}: " \
                                 f"{done.stdout}{done.stderr}"
    return done.stdout


def local_cache(daemon: FaultDaemon) -> dict[str, str]:
    """The daemon's own cache (scam-back-ctl dump): address -> '0' valid or '1' invalid."""
    entries = {}
    for line in ctl_ok(daemon, "dump").splitlines():
        code, address = line.split()[:2]
        entries[address] = code
    return entries


def shared_keys(server: RedisServer) -> dict[str, bytes]:
    """scam-back's keys in Redis: address -> value."""
    client = server.client()
    try:
        found = {k.decode()[len(ADDRESS_PREFIX):]: client.get(k)
                 for k in client.scan_iter(match=ADDRESS_PREFIX + "*")}
    finally:
        client.close()
    return {address: value for address, value in found.items() if value is not None}


def rcpts(smtp: Backend, address: str) -> int:
    """How many times the backend was asked about an address."""
    wanted = f"RCPT TO:<{address}>".lower()
    return sum(1 for line in list(smtp.transcript) if line.lower() == wanted)


def last_source(daemon: FaultDaemon, address: str) -> str:
    lines = verdict_lines(daemon, address)
    assert lines, f"no verdict line for {address}: {daemon.log()[-2000:]}"
    match = re.search(r" source=(\S+)", lines[-1])
    assert match, lines[-1]
    return match.group(1)


def log_count(daemon: FaultDaemon, *words: str) -> int:
    return sum(1 for line in daemon.log().splitlines() if all(w in line for w in words))


def outages(daemon: FaultDaemon) -> int:
    return log_count(daemon, "shared cache", "unavailable")


def recoveries(daemon: FaultDaemon) -> int:
    return log_count(daemon, "shared cache", "available again")


def expect(replies, addresses, valid: set[str]) -> None:  # type: ignore[no-untyped-def]
    """Each reply is `continue` for a valid address and 550 5.1.1 for the others."""
    for address, reply in zip(addresses, replies):
        if address.lower() in valid:
            assert reply.action == "continue", f"{address}: {show(reply)}"
        else:
            assert is_invalid(reply), f"{address}: {show(reply)}"


def ask_expect(daemon: FaultDaemon, *addresses: str) -> float:
    """Ask about addresses on one MTA connection, check the verdicts, return the time taken."""
    started = time.monotonic()
    replies = ask(daemon, *addresses)
    elapsed = time.monotonic() - started
    expect(replies, addresses, USERS)
    return elapsed


def assert_clean_log(daemon: FaultDaemon) -> None:
    text = daemon.log()
    assert "Traceback" not in text, text[-3000:]
    assert "internal error" not in text, text[-3000:]


def shared_state(daemon: FaultDaemon, address: str) -> str:
    """The "shared cache:" line of `scam-back-ctl check` (asks Redis when the breaker lets it)."""
    for line in ctl_ok(daemon, "check", address).splitlines():
        if line.startswith("shared cache: "):
            return line[len("shared cache: "):]
    raise AssertionError(f"no shared cache line in check {address}")


def wait_shared_up(daemon: FaultDaemon, probe: str, timeout: float = RECOVERY) -> None:
    """Ask `check` until the daemon reaches Redis again (bounded: the breaker waits <= 30 s)."""
    ok = wait_until(lambda: "unavailable" not in shared_state(daemon, probe), timeout, step=0.25)
    assert ok, f"the shared cache did not come back in {timeout} s: {daemon.log()[-2000:]}"


def learn_through(first: FaultDaemon, other: FaultDaemon, smtp: Backend, *addresses: str) -> None:
    """Verify addresses through `first` (one probe each), then have `other` served them from the
    shared cache (no probe): both local caches then hold them."""
    before = {a: rcpts(smtp, a) for a in addresses}
    ask_expect(first, *addresses)
    for address in addresses:
        assert rcpts(smtp, address) == before[address] + 1, (address, list(smtp.transcript))
    connections = smtp.connections
    ask_expect(other, *addresses)
    assert smtp.connections == connections, "the second daemon opened a backend connection"
    for address in addresses:
        assert rcpts(smtp, address) == before[address] + 1, f"{address} probed twice"
        assert last_source(other, address) == "shared-cache", verdict_lines(other, address)


# ---- two daemons sharing verdicts ----

def test_a_verdict_learnt_by_one_daemon_is_answered_by_the_other_without_a_probe(
        redis_server, smtp, daemons):
    text = shared_conf(smtp, redis_server)
    a, b = daemons(text), daemons(text)
    good, bad = "alice@one.test", "nobody-here@one.test"

    replies = ask(a, good, bad)
    expect(replies, (good, bad), USERS)
    assert rcpts(smtp, good) == 1 and rcpts(smtp, bad) == 1, list(smtp.transcript)
    assert last_source(a, good) == "backend" and last_source(a, bad) == "backend"

    connections = smtp.connections
    replies = ask(b, good, bad)
    assert replies[0].action == "continue", show(replies[0])
    assert is_invalid(replies[1]), show(replies[1])
    assert smtp.connections == connections, "daemon B connected to the backend"
    assert rcpts(smtp, good) == 1 and rcpts(smtp, bad) == 1, list(smtp.transcript)
    for address, verdict in ((good, "valid"), (bad, "invalid")):
        line = verdict_lines(b, address)[-1]
        assert " source=shared-cache" in line and f" verdict={verdict}" in line, line

    # B now holds them itself: its next answers come from its own cache.
    expect(ask(b, good, bad), (good, bad), USERS)
    assert last_source(b, good) == "cache" and last_source(b, bad) == "cache"
    assert local_cache(b) == {good: "0", bad: "1"}

    # And the other way round, with the address written in mixed case: one key per address.
    mixed = "Carol@One.TEST"
    expect(ask(b, mixed), (mixed,), USERS)
    assert rcpts(smtp, mixed) == 1
    expect(ask(a, "carol@one.test"), ("carol@one.test",), USERS)
    assert rcpts(smtp, mixed) == 1, "carol probed again by daemon A"
    assert last_source(a, "carol@one.test") == "shared-cache"
    assert smtp.connections == connections + 1     # B's own probe of carol, nothing else
    for daemon in (a, b):
        assert outages(daemon) == 0
        assert_clean_log(daemon)


def test_redis_keys_are_namespaced_with_the_verdict_code_and_its_ttl_as_expiry(
        redis_server, smtp, daemons):
    a = daemons(shared_conf(smtp, redis_server))
    good, bad = "Bob@One.Test", "ghost@two.test"
    expect(ask(a, good, bad), (good, bad), USERS)

    client = redis_server.client()
    try:
        assert {k.decode() for k in client.keys("*")} == {
            "scam-back:v1:addr:bob@one.test", "scam-back:v1:addr:ghost@two.test"}
        assert client.get("scam-back:v1:addr:bob@one.test") == b"0"
        assert client.get("scam-back:v1:addr:ghost@two.test") == b"1"
        valid_ttl = client.ttl("scam-back:v1:addr:bob@one.test")
        invalid_ttl = client.ttl("scam-back:v1:addr:ghost@two.test")
        assert VALID_TTL - 30 <= valid_ttl <= VALID_TTL, valid_ttl
        assert INVALID_TTL - 30 <= invalid_ttl <= INVALID_TTL, invalid_ttl

        # `check` shows both caches.
        out = ctl_ok(a, "check", good)
        assert "shared cache: valid, expires in" in out, out
        out = ctl_ok(a, "check", bad)
        assert "shared cache: invalid, expires in" in out, out

        # An entry put into Redis by another daemon is served with no probe, and its remaining
        # expiry (not the full TTL) is what the local copy keeps.
        client.set(key("dave@one.test"), b"0", ex=120)
        client.set(key("judy@two.test"), b"1", ex=120)     # a valid user the cluster says is not
        replies = ask(a, "dave@one.test", "judy@two.test")
        assert replies[0].action == "continue", show(replies[0])
        assert is_invalid(replies[1]), show(replies[1])
        assert rcpts(smtp, "dave@one.test") == 0 and rcpts(smtp, "judy@two.test") == 0
        dumped = {line.split()[1]: int(line.split()[2]) for line in ctl_ok(a, "dump").splitlines()}
        assert dumped["dave@one.test"] - time.time() <= 125, dumped

        # Anything else under the prefix is no verdict: a miss, verified by the backend.
        client.set(key("erin@one.test"), b"garbage", ex=120)
        expect(ask(a, "erin@one.test"), ("erin@one.test",), USERS)
        assert rcpts(smtp, "erin@one.test") == 1
        assert client.get(key("erin@one.test")) == b"0"
    finally:
        client.close()
    assert_clean_log(a)


# ---- flushes reach every daemon ----

def test_flushes_through_either_daemon_reach_redis_and_both_local_caches(
        redis_server, smtp, daemons):
    text = shared_conf(smtp, redis_server)
    a, b = daemons(text), daemons(text)
    one_good, one_bad = "alice@one.test", "nope@one.test"
    two_good, two_bad = "bob@two.test", "nope@two.test"
    everything = (one_good, one_bad, two_good, two_bad)

    def learn_all() -> None:
        """Every address cached by both (A asks first; B is then served from Redis)."""
        missing = [x for x in everything if x not in local_cache(a)]
        if missing:
            ask_expect(a, *missing)
        missing = [x for x in everything if x not in local_cache(b)]
        if missing:
            connections = smtp.connections
            ask_expect(b, *missing)
            assert smtp.connections == connections, "B probed what Redis holds"
            for address in missing:
                assert last_source(b, address) == "shared-cache", verdict_lines(b, address)
        codes = {one_good: "0", one_bad: "1", two_good: "0", two_bad: "1"}
        assert local_cache(a) == codes and local_cache(b) == codes
        assert shared_keys(redis_server) == {k: v.encode() for k, v in codes.items()}

    def flushed_everywhere(gone: set[str], kept: set[str]) -> None:
        for daemon in (a, b):
            ok = wait_until(lambda: not gone & set(local_cache(daemon)), 5.0, step=0.1)
            assert ok, f"still cached in {daemon.dir}: {local_cache(daemon)}"
            assert kept <= set(local_cache(daemon)), local_cache(daemon)
        in_redis = set(shared_keys(redis_server))
        assert not gone & in_redis and kept <= in_redis, in_redis

    learn_all()

    # flush ADDRESS through B: gone from Redis and from A's cache; A probes it again.
    out = ctl_ok(b, "flush", one_good)
    assert "1 local entries" in out and "1 shared entries" in out, out
    flushed_everywhere({one_good}, {one_bad, two_good, two_bad})
    assert log_count(a, "shared cache: flushed address", one_good, "locally") == 1, a.log()
    assert rcpts(smtp, one_good) == 1
    expect(ask(a, one_good), (one_good,), USERS)
    assert rcpts(smtp, one_good) == 2, "A did not probe the flushed address again"
    assert last_source(a, one_good) == "backend"
    learn_all()

    # flush @DOMAIN through A: one.test gone everywhere, two.test kept.
    out = ctl_ok(a, "flush", "@one.test")
    assert "2 local entries" in out and "2 shared entries" in out, out
    flushed_everywhere({one_good, one_bad}, {two_good, two_bad})
    probes = rcpts(smtp, one_bad)
    expect(ask(b, one_bad), (one_bad,), USERS)
    assert rcpts(smtp, one_bad) == probes + 1 and last_source(b, one_bad) == "backend"
    learn_all()

    # flush --invalid through B: the invalid verdicts gone everywhere, the valid ones kept.
    out = ctl_ok(b, "flush", "--invalid")
    assert "2 local entries" in out and "2 shared entries" in out, out
    flushed_everywhere({one_bad, two_bad}, {one_good, two_good})
    assert set(shared_keys(redis_server)) == {one_good, two_good}
    learn_all()

    # flush --all through A: nothing left anywhere; B probes again.
    out = ctl_ok(a, "flush", "--all")
    assert "4 local entries" in out and "4 shared entries" in out, out
    flushed_everywhere(set(everything), set())
    assert shared_keys(redis_server) == {}
    assert local_cache(a) == {} and local_cache(b) == {}
    probes = rcpts(smtp, two_good)
    expect(ask(b, two_good), (two_good,), USERS)
    assert rcpts(smtp, two_good) == probes + 1 and last_source(b, two_good) == "backend"
    for daemon in (a, b):
        assert outages(daemon) == 0
        assert_clean_log(daemon)


# ---- Redis failures cost nothing ----

def test_redis_killed_mid_test_loses_no_served_verdict_and_sharing_resumes_after_restart(
        redis_server, smtp, daemons):
    text = shared_conf(smtp, redis_server, "BackErrorTempfail: yes\n")
    a, b = daemons(text), daemons(text)
    from_a = ("alice@one.test", "bob@two.test", "unknown-a@one.test", "unknown-a@two.test")
    from_b = ("carol@one.test", "dave@two.test", "unknown-b@one.test", "unknown-b@two.test")
    learn_through(a, b, smtp, *from_a)
    learn_through(b, a, smtp, *from_b)
    served = from_a + from_b
    assert set(local_cache(a)) == set(served) == set(local_cache(b))

    redis_server.kill()
    probes = {x: rcpts(smtp, x) for x in served}

    # Both daemons keep every verdict they served and verify new addresses with the backend.
    for daemon, tag in ((a, "a"), (b, "b")):
        fresh = ("erin@one.test" if tag == "a" else "frank@one.test", f"new-{tag}1@two.test")
        with Mta(daemon) as mta:
            started = time.monotonic()
            replies = [mta.rcpt(x) for x in served + fresh]
            elapsed = time.monotonic() - started
        for reply in replies:
            assert not is_tempfail(reply), show(reply)
        expect(replies, served + fresh, USERS)
        assert elapsed < PROMPT, f"{elapsed:.2f} s for {len(replies)} recipients with Redis down"
        for address in fresh:
            assert rcpts(smtp, address) == 1, f"{address} not verified by the backend"
            assert last_source(daemon, address) == "backend"
        for address in served:
            assert last_source(daemon, address) == "cache"
    assert {x: rcpts(smtp, x) for x in served} == probes, "a served verdict was probed again"
    for daemon in (a, b):
        assert outages(daemon) == 1, daemon.log()[-3000:]
        snapshot = json.loads(ctl_ok(daemon, "stats", "--json"))
        assert snapshot["shared_cache"]["up"] is False, snapshot["shared_cache"]
        assert "shared cache" in ctl_ok(daemon, "stats") and "DOWN" in ctl_ok(daemon, "stats")

    # A flush cannot reach the other daemons now, and says so (the local one is done).
    done = ctl(a, "flush", "erin@one.test")
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "shared cache" in done.stderr and "unreachable" in done.stderr, done.stderr
    assert "erin@one.test" not in local_cache(a)

    # Past the first pause (2 s) Redis is asked again and fails again: still logged only once.
    time.sleep(2.3)
    for daemon, tag in ((a, "a"), (b, "b")):
        elapsed = ask_expect(daemon, f"new-{tag}2@one.test", "grace@two.test", *served)
        assert elapsed < PROMPT, f"{elapsed:.2f} s with Redis down"
        assert outages(daemon) == 1, daemon.log()[-3000:]
        assert recoveries(daemon) == 0

    # Redis back (empty: no persistence) on the same port: each daemon notices it once.
    redis_server.restart()
    for daemon in (a, b):
        wait_shared_up(daemon, "alice@one.test")
    for daemon in (a, b):
        assert recoveries(daemon) == 1, daemon.log()[-3000:]
        assert outages(daemon) == 1, daemon.log()[-3000:]
        assert json.loads(ctl_ok(daemon, "stats", "--json"))["shared_cache"]["up"] is True

    # Sharing works again, both ways; the verdicts served before are all still answered locally.
    learn_through(a, b, smtp, "heidi@one.test", "unknown-c@two.test")
    learn_through(b, a, smtp, "ivan@two.test", "unknown-d@one.test")
    expected = {"heidi@one.test": b"0", "unknown-c@two.test": b"1", "ivan@two.test": b"0",
                "unknown-d@one.test": b"1"}
    assert shared_keys(redis_server) == expected
    for daemon in (a, b):
        ask_expect(daemon, *served)
    assert {x: rcpts(smtp, x) for x in served} == probes, "a served verdict was probed again"

    # And flushes reach the other daemon again: its listener reconnects within a second or two
    # of Redis coming back, and one flush, given once, reaches it.
    for daemon in (a, b):
        assert wait_until(lambda: json.loads(ctl_ok(daemon, "stats", "--json"))["shared_cache"][
            "listening"] is True, 5), daemon.log()[-3000:]
    told = ctl_ok(b, "flush", "heidi@one.test")
    assert "2 daemons listening were told" in str(told), told
    assert wait_until(lambda: "heidi@one.test" not in local_cache(a), 5), a.log()[-3000:]
    for daemon in (a, b):
        assert recoveries(daemon) == 1 and outages(daemon) == 1, daemon.log()[-3000:]
        assert_clean_log(daemon)


def test_a_hung_redis_delays_no_recipient_beyond_the_cache_timeout(redis_server, smtp, daemons):
    text = shared_conf(smtp, redis_server, "BackErrorTempfail: yes\n")
    a, b = daemons(text), daemons(text)
    learn_through(a, b, smtp, "alice@one.test", "unknown@one.test")

    redis_server.pause()                     # SIGSTOP: connections hang, nothing is answered
    try:
        for daemon, fresh in ((a, ("bob@one.test", "nope-a@two.test")),
                              (b, ("nope-b@one.test", "carol@two.test"))):
            with Mta(daemon) as mta:
                for address in fresh:
                    reply, elapsed = mta.timed_rcpt(address)
                    assert not is_tempfail(reply), show(reply)
                    expect([reply], [address], USERS)
                    assert elapsed < PROMPT, f"{address}: {elapsed:.2f} s with Redis hung"
                    assert rcpts(smtp, address) == 1
                    assert last_source(daemon, address) == "backend"
                for address in ("alice@one.test", "unknown@one.test"):
                    reply, elapsed = mta.timed_rcpt(address)
                    expect([reply], [address], USERS)
                    assert elapsed < PROMPT
            assert outages(daemon) == 1, daemon.log()[-3000:]
            # The admin commands do not hang either.
            started = time.monotonic()
            assert "shared cache: " in ctl_ok(daemon, "check", "alice@one.test")
            assert time.monotonic() - started < 10
    finally:
        redis_server.resume()

    for daemon in (a, b):
        wait_shared_up(daemon, "alice@one.test")
        assert recoveries(daemon) == 1 and outages(daemon) == 1, daemon.log()[-3000:]
    learn_through(b, a, smtp, "dave@two.test")
    for daemon in (a, b):
        assert_clean_log(daemon)


# ---- the Redis password ----

def password_file(directory: str, password: str) -> str:
    path = os.path.join(directory, "redis.pass")
    with open(path, "w") as handle:
        handle.write(password + "\n")
    os.chmod(path, 0o600)            # root's: the daemon reads it before the privilege drop
    return path


def test_requirepass_with_a_password_file_read_before_the_privilege_drop(smtp, daemons, root_dir):
    password = f"pw-{os.getpid()}-{time.monotonic_ns()}"
    with RedisServer(password=password) as server:
        path = password_file(root_dir, password)
        text = shared_conf(smtp, server, f"BackCachePasswordFile: {path}\n")
        a, b = daemons(text), daemons(text)
        if IS_ROOT:
            # The file is root's (0600, in a 0700 directory) and the daemons run as RUN_USER:
            # they read it before dropping privileges.
            uid = pwd.getpwnam(RUN_USER).pw_uid
            for daemon in (a, b):
                assert daemon.status()["Uid"].split()[0] == str(uid), daemon.status()["Uid"]
        learn_through(a, b, smtp, "alice@two.test", "unknown@two.test")
        assert shared_keys(server) == {"alice@two.test": b"0", "unknown@two.test": b"1"}
        for daemon in (a, b):
            log = daemon.log()
            assert "shared cache" in log and "connected" in log, log
            assert outages(daemon) == 0, log
            assert password not in log
            assert_clean_log(daemon)

        # Without the password the daemon still answers every recipient: an outage, not a failure.
        c = daemons(shared_conf(smtp, server, "BackErrorTempfail: yes\n"))
        elapsed = ask_expect(c, "alice@two.test", "bob@two.test", "unknown-c@one.test")
        assert elapsed < PROMPT
        assert rcpts(smtp, "alice@two.test") == 2, "C must probe: it cannot read the shared cache"
        assert outages(c) == 1, c.log()
        assert_clean_log(c)


def config_with_password_file(path: str, server_url: str, backend_port: int) -> tuple[str, int]:
    """A config in a daemon directory naming a password file; returns (config path, its line)."""
    directory = user_dir()
    lines = [f"BackSMTPPort: {backend_port}", "BackSMTPServer: 127.0.0.1",
             "BackAddrDomain: one.test", "HeloName: mx.test.example", "BackSkipLoopback: no",
             f"BackCache: {server_url}", f"BackCachePasswordFile: {path}",
             f"BackCacheTimeout: {CACHE_TIMEOUT}"]
    conf = os.path.join(directory, "scam.conf")
    with open(conf, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return conf, lines.index(f"BackCachePasswordFile: {path}") + 1


def test_a_missing_or_empty_password_file_stops_start_up_naming_the_config_line(
        redis_server, smtp, root_dir):
    good = password_file(root_dir, "secret")
    empty = os.path.join(root_dir, "empty.pass")
    Path(empty).write_text("\n")
    missing = os.path.join(root_dir, "no-such.pass")
    made: list[str] = []
    try:
        conf, _ = config_with_password_file(good, redis_server.url, smtp.port)
        made.append(os.path.dirname(conf))
        done = run_cli("-t", "-f", conf)
        assert done.returncode == 0, done.stderr

        for path, why in ((missing, "cannot read"), (empty, "empty")):
            conf, line = config_with_password_file(path, redis_server.url, smtp.port)
            directory = os.path.dirname(conf)
            made.append(directory)
            done = run_cli("-t", "-f", conf)
            assert done.returncode == 78, (done.returncode, done.stderr)
            assert f"{conf}:{line}:" in done.stderr and "BackCachePasswordFile" in done.stderr, \
                done.stderr
            assert why in done.stderr, done.stderr

            socket_path = os.path.join(directory, "scam-back.sock")
            pid_file = os.path.join(directory, "scam-back.pid")
            user = ["-u", RUN_USER] if IS_ROOT else []
            done = run_cli("-p", f"unix:{socket_path}", "-f", conf, "-P", pid_file, *user,
                           timeout=20)
            assert done.returncode == 78, (done.returncode, done.stderr)
            assert f"{conf}:{line}:" in done.stderr and why in done.stderr, done.stderr
            assert not os.path.exists(socket_path) and not os.path.exists(pid_file)
    finally:
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)


# ---- SharedCache itself, against the real Redis ----

def test_shared_cache_get_put_peek_and_flush(redis_server):
    stats = Stats()
    cache = SharedCache(redis_server.url, 1.0, stats)
    client = redis_server.client()
    try:
        assert cache.ping() and cache.up
        cache.put("a@one.test", True, 60)
        cache.put("b@one.test", False, 30)
        cache.put("c@sub.one.test", True, 60)
        cache.put("d@two.test", False, 60)
        cache.put("e@notone.test", True, 60)
        cache.put("never@one.test", True, 0)          # a TTL of 0: not cached
        client.set("someone-else:key", b"1")          # not scam-back's: never touched
        assert client.get(ADDRESS_PREFIX + "a@one.test") == b"0"
        assert client.get(ADDRESS_PREFIX + "b@one.test") == b"1"
        assert 55_000 <= client.pttl(ADDRESS_PREFIX + "a@one.test") <= 60_000
        assert 25_000 <= client.pttl(ADDRESS_PREFIX + "b@one.test") <= 30_000
        assert client.get(ADDRESS_PREFIX + "never@one.test") is None

        valid, left = cache.get("a@one.test")
        assert valid is True and 55 <= left <= 60
        valid, left = cache.get("b@one.test")
        assert valid is False and 25 <= left <= 30
        assert cache.get("nobody@one.test") is None
        assert cache.peek("a@one.test")[0] is True
        assert cache.peek("nobody@one.test") is None
        assert stats.value("cache", "shared-hit") == 2
        assert stats.value("cache", "shared-miss") == 1      # peek is not counted

        client.set(ADDRESS_PREFIX + "junk@one.test", b"2")
        client.set(ADDRESS_PREFIX + "forever@one.test", b"0")   # no expiry: not a verdict
        assert cache.get("junk@one.test") is None
        assert cache.get("forever@one.test") is None
        client.delete(ADDRESS_PREFIX + "junk@one.test", ADDRESS_PREFIX + "forever@one.test")

        assert cache.flush("address", "a@one.test")[0] == 1
        assert cache.get("a@one.test") is None
        assert cache.flush("address", "a@one.test")[0] == 0
        assert cache.flush("domain", "one.test")[0] == 2          # b@one.test, c@sub.one.test
        assert cache.get("e@notone.test") is not None and cache.get("d@two.test") is not None
        cache.put("f@two.test", True, 60)
        assert cache.flush("invalid")[0] == 1                     # d@two.test
        assert {k.decode() for k in client.keys(ADDRESS_PREFIX + "*")} == {
            ADDRESS_PREFIX + "e@notone.test", ADDRESS_PREFIX + "f@two.test"}
        assert cache.flush("all")[0] == 2
        assert client.keys(ADDRESS_PREFIX + "*") == []
        assert client.get("someone-else:key") == b"1"
        assert stats.value("cache", "shared-error") == 0 and cache.up
    finally:
        client.close()
        cache.close()


def test_flushes_are_published_to_the_other_shared_caches_only(redis_server, scam_log):
    mine, theirs = SharedCache(redis_server.url, 1.0), SharedCache(redis_server.url, 1.0)
    heard: list[tuple[str, str]] = []
    client = redis_server.client()
    try:
        mine.listen(lambda what, value: heard.append((what, value)))
        assert wait_until(lambda: client.pubsub_numsub(FLUSH_CHANNEL)[0][1] >= 1, 5.0)
        theirs.flush("domain", "one.test")
        theirs.flush("address", "x@two.test")
        assert wait_until(lambda: len(heard) >= 2, 5.0), heard
        assert heard == [("domain", "one.test"), ("address", "x@two.test")]
        mine.flush("all")                                  # its own flush: already done locally
        client.publish(FLUSH_CHANNEL, "not json")           # ignored, with a warning
        client.publish(FLUSH_CHANNEL, json.dumps({"what": "everything", "origin": "x"}))
        theirs.flush("invalid")
        assert wait_until(lambda: len(heard) >= 3, 5.0), heard
        time.sleep(0.3)
        assert heard == [("domain", "one.test"), ("address", "x@two.test"), ("invalid", "")]
        assert scam_log.messages("malformed flush message")
    finally:
        client.close()
        mine.close()
        theirs.close()


def test_shared_cache_on_a_dead_port_is_a_quick_miss_logged_once(scam_log):
    stats = Stats()
    cache = SharedCache(f"redis://127.0.0.1:{refused_port()}/0", 0.2, stats)
    try:
        started = time.monotonic()
        assert cache.get("a@one.test") is None
        assert time.monotonic() - started < 2.0
        started = time.monotonic()
        for _ in range(5):
            assert cache.get("a@one.test") is None
            cache.put("a@one.test", True, 60)          # never raises
            assert cache.peek("a@one.test") is None
        assert time.monotonic() - started < 1.0, "Redis asked again inside the pause"
        assert not cache.up
        assert stats.value("cache", "shared-error") == 1
        assert stats.value("cache", "shared-hit") == stats.value("cache", "shared-miss") == 0
        with pytest.raises((redis.RedisError, OSError)):
            cache.flush("all")                          # an admin must hear of it
        unavailable = [r for r in scam_log.records if "unavailable" in r.getMessage()]
        assert len(unavailable) == 1 and unavailable[0].levelno == logging.WARNING, \
            [r.getMessage() for r in scam_log.records]
    finally:
        cache.close()


def test_shared_cache_pauses_double_while_redis_stays_away_and_recovery_is_logged_once(
        redis_server, scam_log):
    now = [1000.0]
    stats = Stats()
    cache = SharedCache(redis_server.url, 0.5, stats, clock=lambda: now[0])
    try:
        cache.put("a@one.test", True, 600)
        assert cache.get("a@one.test")[0] is True
        redis_server.kill()

        def errors() -> int:
            return stats.value("cache", "shared-error")

        assert cache.get("a@one.test") is None and errors() == 1      # pause 2 s
        now[0] += 1.9
        assert cache.get("a@one.test") is None and errors() == 1      # left alone
        now[0] += 0.2
        assert cache.get("a@one.test") is None and errors() == 2      # asked: pause 4 s
        now[0] += 3.9
        cache.put("b@one.test", True, 600)
        assert errors() == 2
        now[0] += 0.2
        assert cache.get("a@one.test") is None and errors() == 3      # pause 8 s
        for _ in range(6):                                             # 16, 30, 30, ...
            now[0] += 30.1
            assert cache.get("a@one.test") is None
        assert errors() == 9
        now[0] += 29.9
        assert cache.get("a@one.test") is None and errors() == 9      # at most 30 s
        assert not cache.up

        redis_server.restart()                    # empty: no persistence
        now[0] += 0.2
        assert cache.get("a@one.test") is None                         # a miss, but reached
        assert cache.up and errors() == 9
        cache.put("a@one.test", False, 60)
        assert cache.get("a@one.test")[0] is False
        assert len(scam_log.messages("unavailable")) == 1, scam_log.messages("")
        assert len(scam_log.messages("available again")) == 1, scam_log.messages("")
    finally:
        cache.close()


def test_shared_cache_on_a_hung_redis_waits_only_its_timeout(redis_server, scam_log):
    cache = SharedCache(redis_server.url, 0.2)
    answers: list[object] = []
    try:
        cache.put("a@one.test", True, 600)
        redis_server.pause()
        # In a thread, so that a get() that ignores its timeout fails the test instead of
        # hanging it (resuming Redis frees it).
        asker = threading.Thread(target=lambda: answers.append(cache.get("a@one.test")),
                                 daemon=True)
        started = time.monotonic()
        asker.start()
        asker.join(5.0)
        elapsed = time.monotonic() - started
        redis_server.resume()
        asker.join(5.0)
        assert elapsed < 2.0, f"get() waited {elapsed:.1f} s for a hung Redis (timeout 0.2 s)"
        assert answers == [None]
        assert not cache.up
        assert len(scam_log.messages("unavailable")) == 1, scam_log.messages("")
    finally:
        redis_server.resume()
        cache.close()


def test_an_accept_all_backend_found_by_one_daemon_leaves_no_positive_in_redis(redis_server):
    """A positive that reached Redis before the check came back is flushed from it too."""
    from scam_back.cache import VerdictCache
    from .conftest import backend_conf, make_verifier
    with Backend() as backend:
        backend.rcpt_reply_for = lambda address: "250 2.1.5 OK"
        shared = SharedCache(redis_server.url, 1.0)
        shared.put("early@example.net", True, 600)        # written by another daemon before
        verifier = make_verifier(backend_conf(backend, "BackCatchAllCheck: 600\n"),
                                 VerdictCache(600, 300))
        verifier.shared = shared
        try:
            verifier.verify("<anyone@example.net>")
            assert verifier.refresher.wait_idle(5)
            assert shared.peek("early@example.net") is None
            assert shared.peek("anyone@example.net") is None
        finally:
            verifier.refresher.stop()
            verifier.pool.close()
            shared.close()
