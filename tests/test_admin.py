"""Admin commands against the real daemon: the control socket and scam-back-ctl (check, flush,
dump, stats, reload), the periodic stats line, the Prometheus endpoint and BackDryRun.

Three real daemons are shared by the module (each clean stop costs ~5 s of libmilter):
  main     example.net and other.test on one real SMTP backend, dead.test on a refused port,
           StatsListen on a free loopback port;
  dry      BackDryRun and BackErrorTempfail, started in main's directory with its own -P (so its
           control socket sits beside main's);
  reload   its own ControlSocket and StatsInterval: 1; its config is rewritten by the tests.
Every test uses its own addresses and compares counters before and after, so the tests do not
depend on their order.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scam_back.cache import VerdictCache

from .conftest import IS_ROOT, RUN_USER, Daemon, run_cli
from .faults.conftest import Mta, ask, is_invalid, is_tempfail, show, verdict_lines, wait_until
from .smtpbackend import Backend, refused_port

CTL = str(Path(sys.executable).with_name("scam-back-ctl"))
CTL_TIMEOUT = 30.0
VALID_TTL, INVALID_TTL = 1000, 500
BASE = ("TimeoutSMTPConnect: 1\nTimeoutSMTPReply: 1\nBackSkipLoopback: no\n"
        "HeloName: mx.test.example\nBackCatchAllCheck: 0\n"
        f"BackValidAddrExp: {VALID_TTL}\nBackInvalidAddrExp: {INVALID_TTL}\n")
USERS = {"chk-good@example.net", "live@example.net", "fa@example.net", "fc@other.test",
         "dump-good@example.net", "s-good@example.net", "m-good@example.net",
         "dry-good@example.net", "r-good@example.net", "n-good@new.test", "a-good@auto.test"}
CACHE_LINE = re.compile(r"([01]) (\S+@\S+) (\d+)")
AGE_LINE = re.compile(r"cache: (valid|invalid), age (\d+) s, expires in (\d+) s")
RUN_UID = pwd.getpwnam(RUN_USER).pw_uid if IS_ROOT else os.getuid()


# ---- helpers ----

def ctl(*args: str) -> subprocess.CompletedProcess:
    """Run the real scam-back-ctl to completion (bounded)."""
    return subprocess.run([CTL, *args], capture_output=True, text=True, timeout=CTL_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def ctl_ok(sock: str, *args: str) -> list[str]:
    """scam-back-ctl -s SOCK ARGS, which must succeed; its stdout lines."""
    done = ctl("-s", sock, *args)
    assert done.returncode == 0, f"ctl {args}: exit {done.returncode}: {done.stderr}"
    return done.stdout.splitlines()


def stats_json(sock: str) -> dict:
    lines = ctl_ok(sock, "stats", "--json")
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def control_path(daemon: Daemon) -> str:
    return os.path.splitext(daemon.pidfile)[0] + ".ctl"


def rcpt_count(backend: Backend, address: str) -> int:
    """How many RCPT TO the backend has seen for an address."""
    wanted = f"rcpt to:<{address.lower()}>"
    return sum(1 for line in list(backend.transcript) if line.lower().startswith(wanted))


def cache_line(lines: list[str]) -> str:
    found = [line for line in lines if line.startswith("cache: ")]
    assert len(found) == 1, lines
    return found[0]


def assert_age(lines: list[str], verdict: str, ttl: int) -> None:
    """The check answer shows a fresh cached verdict whose age and expiry add up to its TTL."""
    match = AGE_LINE.fullmatch(cache_line(lines))
    assert match, lines
    assert match.group(1) == verdict, lines
    age, left = int(match.group(2)), int(match.group(3))
    assert ttl - 1 <= age + left <= ttl, lines
    assert 0 < left <= ttl and age < ttl // 2, lines


def delta(before: dict, after: dict, group: str, label: str) -> int:
    return after[group].get(label, 0) - before[group].get(label, 0)


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def routes(port: int, *domains: str) -> str:
    return (f"BackSMTPPort: {port}\nBackSMTPServer: 127.0.0.1\n" +
            "".join(f"BackAddrDomain: {d}\n" for d in domains))


def write_atomically(path: str, text: str) -> None:
    """Replace a config file the way an editor or deploy tool would (readable by the daemon)."""
    tmp = f"{path}.new"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def stop_all(daemons: list[Daemon]) -> list[str]:
    """SIGTERM every daemon by pid at once (each takes ~5 s), then remove the directories;
    returns what went wrong (an exit code not 0, a control socket left behind)."""
    codes: dict[int, Optional[int]] = {}

    def stop(index: int, daemon: Daemon) -> None:
        codes[index] = daemon.terminate()

    threads = [threading.Thread(target=stop, args=(i, d)) for i, d in enumerate(daemons)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    problems = []
    for index, daemon in enumerate(daemons):
        if daemon.alive() and daemon.pid is not None:
            os.kill(daemon.pid, signal.SIGKILL)
            problems.append(f"{daemon.conf}: still running, killed")
        elif codes.get(index) != 0:
            problems.append(f"{daemon.conf}: exit code {codes.get(index)}")
        leftover = [p for p in (control_path(daemon), os.path.join(daemon.dir, "custom.ctl"))
                    if os.path.exists(p)]
        if leftover:
            problems.append(f"{daemon.conf}: control socket left behind: {leftover}")
    for directory in {d.dir for d in daemons}:
        shutil.rmtree(directory, ignore_errors=True)
    return problems


class Fleet:
    def __init__(self, backend: Backend, dead_port: int, metrics_port: int) -> None:
        self.backend, self.dead_port, self.metrics_port = backend, dead_port, metrics_port
        self.main: Optional[Daemon] = None
        self.dry: Optional[Daemon] = None
        self.reload: Optional[Daemon] = None


def reload_conf(daemon: Daemon, port: int, *domains: str, broken: str = "") -> str:
    return (BASE + routes(port, "example.net", *domains) +
            f"ControlSocket: {daemon.dir}/custom.ctl\nStatsInterval: 1\n" + broken)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    backend = Backend(users=USERS).start()
    fleet = Fleet(backend, refused_port(), free_port())
    started: list[Daemon] = []
    try:
        main = Daemon(BASE + routes(backend.port, "example.net", "other.test") +
                      routes(fleet.dead_port, "dead.test") +
                      f"BackSkipRecipient: postmaster\nStatsListen: 127.0.0.1:{fleet.metrics_port}\n")
        started.append(main)
        fleet.main = main.start()

        # A second instance in the same directory, told apart by its -P only.
        dry = Daemon(BASE + routes(backend.port, "example.net") + routes(fleet.dead_port, "dead.test") +
                     "BackDryRun: yes\nBackErrorTempfail: yes\n")
        shutil.rmtree(dry.dir, ignore_errors=True)
        dry.dir = main.dir
        dry.socket = os.path.join(main.dir, "dry.sock")
        dry.pidfile = os.path.join(main.dir, "dry.pid")
        dry.cachefile = os.path.join(main.dir, "dry-cache.txt")
        dry.conf = os.path.join(main.dir, "dry.conf")
        dry.logpath = os.path.join(main.dir, "dry.log")
        started.append(dry)
        fleet.dry = dry.start()

        rel = Daemon("")
        rel.conf_text = reload_conf(rel, backend.port)
        # A socket left at the ControlSocket path by a killed daemon is cleared at start.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(os.path.join(rel.dir, "custom.ctl"))
        stale.close()
        started.append(rel)
        fleet.reload = rel.start()
        yield fleet
    finally:
        problems = stop_all(started)
        backend.stop()
    assert not problems, problems


@pytest.fixture(scope="module")
def main(fleet: Fleet) -> Daemon:
    assert fleet.main is not None
    return fleet.main


@pytest.fixture(scope="module")
def main_ctl(main: Daemon) -> str:
    return os.path.join(main.dir, "scam-back.ctl")


# ---- the control socket ----

def test_control_socket_is_0600_owned_by_the_daemon_user_beside_the_pid_file(fleet, main, main_ctl):
    assert main_ctl == control_path(main)
    info = os.stat(main_ctl)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
    assert info.st_uid == RUN_UID
    assert "control " + main_ctl in main.log()


def test_two_daemons_in_one_directory_get_their_own_control_sockets(fleet, main):
    dry = fleet.dry
    assert dry.dir == main.dir and dry.pidfile != main.pidfile
    main_sock, dry_sock = control_path(main), control_path(dry)
    assert main_sock != dry_sock
    for path in (main_sock, dry_sock):
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == RUN_UID
    # -P picks the instance, as the daemon's own -P did.
    for daemon, dry_run in ((main, False), (dry, True)):
        done = ctl("-f", daemon.conf, "-P", daemon.pidfile, "stats", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["dry_run"] is dry_run
    done = ctl("-f", dry.conf, "-P", dry.pidfile, "check", "x@example.net")
    assert done.returncode == 0 and "mode: BackDryRun: verdicts are logged, never enforced" in \
        done.stdout.splitlines(), done.stdout


def test_a_control_socket_in_use_or_not_a_socket_stops_start_up(main, main_ctl):
    other = Daemon("")
    try:
        for target, reason in ((main_ctl, "is in use by a running scam-back"),
                               (os.path.join(other.dir, "plain-file"), "exists and is not a socket")):
            if not target.startswith(main.dir):
                Path(target).write_text("not a socket\n")
            with open(other.conf, "w") as handle:
                handle.write(BASE + routes(refused_port(), "example.net") + f"ControlSocket: {target}\n")
            done = subprocess.run(other.args(), capture_output=True, text=True, timeout=30,
                                  stdin=subprocess.DEVNULL)
            assert done.returncode == 73, (done.returncode, done.stderr)
            assert f"{other.conf}:" in done.stderr and reason in done.stderr, done.stderr
        # The running daemon's socket was left alone.
        assert stat.S_ISSOCK(os.stat(main_ctl).st_mode)
        assert stats_json(main_ctl)["dry_run"] is False
    finally:
        shutil.rmtree(other.dir, ignore_errors=True)


def test_unreachable_socket_exits_69_with_a_clear_message(tmp_path):
    missing = str(tmp_path / "nothing.ctl")
    done = ctl("-s", missing, "stats")
    assert done.returncode == 69
    assert f"cannot reach scam-back at {missing}" in done.stderr and "is it running?" in done.stderr
    assert done.stdout == ""
    # A socket left by a killed daemon: the file is there, nobody listens.
    stale = str(tmp_path / "stale.ctl")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(stale)
    sock.close()
    done = ctl("-s", stale, "dump")
    assert done.returncode == 69 and f"cannot reach scam-back at {stale}" in done.stderr
    # -P naming a pid file with no daemon beside it.
    done = ctl("-f", str(tmp_path / "none.conf"), "-P", str(tmp_path / "x.pid"), "stats")
    assert done.returncode == 69 and str(tmp_path / "x.ctl") in done.stderr


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["check"], ["check", "a@example.net", "b@example.net"],
    ["check", "a@example.net", "--update"], ["check", "a@example.net", "--bogus"],
    ["flush"], ["flush", "a@example.net", "--all"], ["flush", "--invalid", "--all"],
    ["dump", "extra"], ["stats", "--live"], ["reload", "now"], ["-t", "soon", "stats"],
])
def test_usage_errors_exit_64(argv, tmp_path):
    done = ctl("-s", str(tmp_path / "unused.ctl"), *argv)
    assert done.returncode == 64, (argv, done.returncode, done.stderr)
    assert done.stderr.startswith("scam-back-ctl: ") and "usage: scam-back-ctl" in done.stderr
    assert "cannot reach" not in done.stderr


def test_help_exits_0():
    done = ctl("-h")
    assert done.returncode == 0 and done.stdout.startswith("usage: scam-back-ctl")


def test_refused_command_exits_1_with_the_reason(main_ctl):
    done = ctl("-s", main_ctl, "check", "a b@example.net")
    assert done.returncode == 1 and "unquoted" in done.stderr and done.stdout == ""
    done = ctl("-s", main_ctl, "flush", "@")
    assert done.returncode == 1 and "flush @DOMAIN needs a domain" in done.stderr


# ---- check ----

def test_check_shows_route_backend_and_cached_verdicts_with_age_and_expiry(fleet, main, main_ctl):
    port = fleet.backend.port
    assert cache_line(ctl_ok(main_ctl, "check", "chk-good@example.net")) == "cache: none"
    good, bad = ask(main, "chk-good@example.net", "chk-bad@example.net")
    assert good.is_continue and is_invalid(bad), (show(good), show(bad))

    lines = ctl_ok(main_ctl, "check", "chk-good@example.net")
    assert lines[0] == "address: chk-good@example.net"
    assert f"route: example.net -> 127.0.0.1:{port}" in lines
    backend = [line for line in lines if line.startswith("backend: ")]
    assert len(backend) == 1 and backend[0].startswith(
        f"backend: 127.0.0.1:{port} at 127.0.0.1:{port}: up, "), lines
    assert_age(lines, "valid", VALID_TTL)

    assert_age(ctl_ok(main_ctl, "check", "CHK-Bad@Example.NET"), "invalid", INVALID_TTL)
    # A check is no probe: the backend saw each address once.
    assert rcpt_count(fleet.backend, "chk-good@example.net") == 1
    assert rcpt_count(fleet.backend, "chk-bad@example.net") == 1


def test_check_unrouted_domain_and_skipped_recipient(main_ctl):
    lines = ctl_ok(main_ctl, "check", "someone@unrouted.test")
    assert "route: none: unrouted.test is not verified (recipients there are accepted)" in lines
    assert not any(line.startswith("backend: ") for line in lines)
    assert cache_line(lines) == "cache: none"
    lines = ctl_ok(main_ctl, "check", "postmaster@example.net")
    assert "rule: BackSkipRecipient names it: never verified, always accepted" in lines


def test_check_live_probes_without_touching_the_cache_and_update_stores(fleet, main, main_ctl):
    backend, address = fleet.backend, "live@example.net"
    assert ask(main, address)[0].is_continue
    assert rcpt_count(backend, address) == 1
    assert_age(ctl_ok(main_ctl, "check", address), "valid", VALID_TTL)

    backend.users.discard(address)          # the mailbox is deleted on the backend
    try:
        lines = ctl_ok(main_ctl, "check", address, "--live")
        live = [line for line in lines if line.startswith("live: ")]
        assert len(live) == 1, lines
        assert live[0].startswith(f"live: invalid from 127.0.0.1:{backend.port} in "), live
        assert live[0].endswith(f": 550 5.1.1 <{address}>: Recipient address rejected: User unknown")
        assert "cache: unchanged (add --update to store the live verdict)" in lines
        assert rcpt_count(backend, address) == 2
        # The cache still says valid, and the MTA is still answered from it.
        assert_age(ctl_ok(main_ctl, "check", address), "valid", VALID_TTL)
        assert ask(main, address)[0].is_continue
        assert rcpt_count(backend, address) == 2

        lines = ctl_ok(main_ctl, "check", address, "--live", "--update")
        assert any(line.startswith("live: invalid from ") for line in lines), lines
        assert "cache: updated with the live verdict" in lines
        assert rcpt_count(backend, address) == 3
        assert_age(ctl_ok(main_ctl, "check", address), "invalid", INVALID_TTL)
        reply = ask(main, address)[0]
        assert is_invalid(reply), show(reply)
        assert rcpt_count(backend, address) == 3     # answered from the updated cache
    finally:
        backend.users.add(address)


def test_check_live_on_an_unrouted_domain_probes_nothing(fleet, main_ctl):
    before = len(fleet.backend.transcript)
    lines = ctl_ok(main_ctl, "check", "x@unrouted.test", "--live")
    assert any(line.startswith("live: skipped") for line in lines), lines
    assert len(fleet.backend.transcript) == before


# ---- flush ----

def test_flush_address_domain_invalid_and_all(fleet, main, main_ctl):
    backend = fleet.backend
    seeded = ["fa@example.net", "fb@example.net", "fc@other.test", "fd@other.test"]

    def ask_all() -> None:
        replies = ask(main, *seeded)
        assert [r.is_continue for r in replies] == [True, False, True, False], \
            [show(r) for r in replies]
        assert is_invalid(replies[1]) and is_invalid(replies[3])

    def counts() -> list[int]:
        return [rcpt_count(backend, a) for a in seeded]

    ask_all()
    ask_all()
    assert counts() == [1, 1, 1, 1]

    assert ctl_ok(main_ctl, "flush", "FA@Example.NET") == \
        ["flushed address fa@example.net: 1 local entries"]
    assert cache_line(ctl_ok(main_ctl, "check", "fa@example.net")) == "cache: none"
    ask_all()
    assert counts() == [2, 1, 1, 1]
    assert ctl_ok(main_ctl, "flush", "nobody-cached@example.net") == \
        ["flushed address nobody-cached@example.net: 0 local entries"]

    assert ctl_ok(main_ctl, "flush", "@Other.Test") == ["flushed domain other.test: 2 local entries"]
    ask_all()
    assert counts() == [2, 1, 2, 2]

    lines = ctl_ok(main_ctl, "flush", "--invalid")
    match = re.fullmatch(r"flushed invalid: (\d+) local entries", lines[0])
    assert len(lines) == 1 and match and int(match.group(1)) >= 2, lines
    assert not any(line.startswith("1 ") for line in ctl_ok(main_ctl, "dump"))
    ask_all()
    assert counts() == [2, 2, 2, 3]        # only the invalid ones went to the backend again

    lines = ctl_ok(main_ctl, "flush", "--all")
    match = re.fullmatch(r"flushed all: (\d+) local entries", lines[0])
    assert len(lines) == 1 and match and int(match.group(1)) >= 4, lines
    assert ctl_ok(main_ctl, "dump") == []
    ask_all()
    assert counts() == [3, 3, 3, 4]
    assert "admin: flushed all:" in main.log()


# ---- dump ----

def test_dump_lines_are_the_cache_file_format_and_match_what_was_verified(main, main_ctl, tmp_path):
    good, bad, skipped = "dump-good@example.net", "dump-bad@example.net", "dump@unrouted.test"
    replies = ask(main, good, bad, skipped, "postmaster@example.net")
    assert replies[0].is_continue and is_invalid(replies[1]) and replies[2].is_continue
    now = time.time()
    lines = ctl_ok(main_ctl, "dump")
    entries = {}
    for line in lines:
        match = CACHE_LINE.fullmatch(line)
        assert match, f"not a cache file line: {line!r}"
        entries[match.group(2)] = (match.group(1), int(match.group(3)))
    assert entries[good][0] == "0" and entries[bad][0] == "1"
    assert abs(entries[good][1] - (now + VALID_TTL)) < 120, entries[good]
    assert abs(entries[bad][1] - (now + INVALID_TTL)) < 120, entries[bad]
    assert skipped not in entries and "postmaster@example.net" not in entries
    # The dump loads as a cache file.
    path = tmp_path / "dump.txt"
    path.write_text("".join(f"{line}\n" for line in lines))
    cache = VerdictCache(VALID_TTL, INVALID_TTL)
    result = cache.load(str(path))
    assert result.loaded == len(lines) and result.malformed == 0
    assert cache.peek(good).valid is True and cache.peek(bad).valid is False


# ---- stats ----

def test_stats_counts_a_known_sequence_in_text_and_json(fleet, main, main_ctl):
    port, dead = fleet.backend.port, fleet.dead_port
    before = stats_json(main_ctl)
    with Mta(main) as mta:
        replies = [mta.rcpt(a) for a in (
            "s-good@example.net",        # valid, from the backend
            "s-good@example.net",        # valid, from the cache
            "s-bad@example.net",         # invalid, from the backend
            "s-bad@example.net",         # invalid, from the cache
            "s@unrouted.test",           # skipped: domain not routed
            "postmaster@example.net",    # skipped: BackSkipRecipient
            "s1@dead.test",              # unverified: connection refused
            "s2@dead.test",              # unverified: the address is now in backoff
        )]
    assert [r.is_continue for r in replies] == [True, True, False, False, True, True, True, True]
    after = stats_json(main_ctl)
    text = ctl_ok(main_ctl, "stats")
    again = stats_json(main_ctl)

    assert after["recipients"] - before["recipients"] == 8
    assert delta(before, after, "valid", "backend") == 1
    assert delta(before, after, "valid", "cache") == 1
    assert delta(before, after, "invalid", "backend") == 1
    assert delta(before, after, "invalid", "cache") == 1
    assert delta(before, after, "skipped", "domain not routed") == 1
    assert delta(before, after, "skipped", "BackSkipRecipient") == 1
    assert delta(before, after, "unverified", "connect") == 1
    assert delta(before, after, "unverified", "backoff") == 1
    assert sum(after["unverified"].values()) - sum(before["unverified"].values()) == 2
    assert after["cache"]["hits"] - before["cache"]["hits"] == 2
    assert after["cache"]["misses"] - before["cache"]["misses"] == 4
    assert delta(before, after, "probes", f"127.0.0.1:{port}") == 2
    assert delta(before, after, "backend_errors", f"127.0.0.1:{dead} connect") == 1
    assert sum(after["backend_errors"].values()) - sum(before["backend_errors"].values()) == 1
    assert after["backends"][f"127.0.0.1:{port}"] == "up"
    assert after["backends"][f"127.0.0.1:{dead}"].startswith("skipped for "), after["backends"]
    latency = after["latency_ms"][f"127.0.0.1:{port}"]
    assert set(latency) == {"samples", "p50", "p90", "p99", "max"}
    assert latency["samples"] >= 2 and 0 <= latency["p50"] <= latency["p90"] <= latency["p99"] \
        <= latency["max"]
    assert after["dry_run"] is False and after["shared_cache"] is None
    assert after["cache_entries"]["valid"] >= 1 and after["cache_entries"]["invalid"] >= 1

    # The text report, taken between two identical JSON snapshots, shows the same numbers.
    for key in ("recipients", "valid", "invalid", "skipped", "unverified", "probes",
                "backend_errors", "cache"):
        assert again[key] == after[key], key
    assert f"recipients seen: {after['recipients']}" in text
    for group in ("valid", "invalid", "skipped", "unverified", "backend_errors"):
        heading = f"{group.replace('_', ' ')}: {sum(after[group].values())}"
        assert heading in text, (heading, text)
        start = text.index(heading)
        shown = []
        for line in text[start + 1:]:
            if not line.startswith("  "):
                break
            shown.append(line)
        assert shown == [f"  {label or '-'}: {value}" for label, value in after[group].items()]
    assert f"  127.0.0.1:{dead} connect: {after['backend_errors'][f'127.0.0.1:{dead} connect']}" \
        in text
    assert any(line.startswith(f"cache: hits {after['cache']['hits']}, misses "
                               f"{after['cache']['misses']}") for line in text), text
    assert any(line.startswith(f"probe latency 127.0.0.1:{port}: samples ") for line in text), text
    assert f"backend 127.0.0.1:{port}: up" in text
    assert any(line.startswith(f"backend 127.0.0.1:{dead}: skipped for ") for line in text), text
    assert "dry run: no" in text


def test_prometheus_exposition_shows_the_same_counters(fleet, main, main_ctl):
    replies = ask(main, "m-good@example.net", "m-bad@example.net", "m-good@example.net")
    assert replies[0].is_continue and is_invalid(replies[1]) and replies[2].is_continue
    url = f"http://127.0.0.1:{fleet.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        body = response.read().decode()
    snap = stats_json(main_ctl)
    assert "scam_back_recipients_total{" in body
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    recipients = {labels: value for (name, labels), value in samples.items()
                  if name == "scam_back_recipients_total"}
    expected = {(("reason", reason), ("verdict", verdict)): float(value)
                for verdict in ("valid", "invalid", "skipped", "unverified")
                for reason, value in snap[verdict].items()}
    assert recipients == expected
    assert recipients[(("reason", "backend"), ("verdict", "valid"))] >= 1
    assert recipients[(("reason", "cache"), ("verdict", "valid"))] >= 1
    assert recipients[(("reason", "backend"), ("verdict", "invalid"))] >= 1
    port = fleet.backend.port
    assert samples[("scam_back_backend_probes_total", (("backend", f"127.0.0.1:{port}"),))] == \
        snap["probes"][f"127.0.0.1:{port}"]
    assert samples[("scam_back_cache_lookups_total", (("cache", "local"), ("result", "hit")))] == \
        snap["cache"]["hits"]
    assert samples[("scam_back_backend_up", (("backend", f"127.0.0.1:{port}"),))] == 1.0


# ---- BackDryRun ----

def test_dry_run_continues_invalid_and_never_tempfails_but_logs_and_counts(fleet):
    dry = fleet.dry
    sock = control_path(dry)
    before = stats_json(sock)
    bad, good = "dry-bad@example.net", "dry-good@example.net"
    replies = ask(dry, bad, bad, good, "dry@dead.test")
    for reply in replies:
        assert reply.is_continue and not reply.is_reject and not is_tempfail(reply), show(reply)
    assert rcpt_count(fleet.backend, bad) == 1      # verified for real, then from the cache
    after = stats_json(sock)
    assert after["dry_run"] is True
    assert delta(before, after, "invalid", "backend") == 1
    assert delta(before, after, "invalid", "cache") == 1
    assert delta(before, after, "valid", "backend") == 1
    assert delta(before, after, "unverified", "connect") == 1

    assert wait_until(lambda: len(verdict_lines(dry, bad)) >= 2 and verdict_lines(dry, "dry@dead.test"),
                      10)
    first, second = verdict_lines(dry, bad)[:2]
    for line in (first, second):
        assert "verdict=invalid" in line and line.endswith(" dry-run=not-enforced"), line
    assert "source=backend" in first and "source=cache" in second
    dead = verdict_lines(dry, "dry@dead.test")[0]
    assert "verdict=unverified" in dead and dead.endswith(" dry-run=not-enforced"), dead
    good_line = verdict_lines(dry, good)[0]
    assert "verdict=valid" in good_line and good_line.endswith(" dry-run=not-enforced")
    assert "BackDryRun is on" in dry.log()
    assert "dry run: yes" in ctl_ok(sock, "stats")


# ---- reload, ControlSocket, -f, scam-back ctl, StatsInterval ----

def test_configured_control_socket_found_with_f_and_by_scam_back_ctl(fleet):
    rel = fleet.reload
    custom = os.path.join(rel.dir, "custom.ctl")
    info = os.stat(custom)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == RUN_UID
    assert not os.path.exists(control_path(rel))        # ControlSocket replaces the default
    done = ctl("-f", rel.conf, "stats", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dry_run"] is False
    done = run_cli("ctl", "-f", rel.conf, "check", "r@example.net")
    assert done.returncode == 0, done.stderr
    assert f"route: example.net -> 127.0.0.1:{fleet.backend.port}" in done.stdout.splitlines()
    done = run_cli("ctl", "-s", custom, "stats")
    assert done.returncode == 0 and "recipients seen: " in done.stdout
    done = run_cli("ctl", "-s", custom)
    assert done.returncode == 64 and "usage: scam-back-ctl" in done.stderr
    done = run_cli("ctl", "-s", os.path.join(rel.dir, "missing.ctl"), "stats")
    assert done.returncode == 69


def test_stats_interval_writes_a_stats_line_to_the_log(fleet):
    rel = fleet.reload
    assert wait_until(lambda: "stats: uptime=" in rel.log(), 10), rel.log()[-2000:]
    line = next(line for line in rel.log().splitlines() if "stats: uptime=" in line)
    assert re.search(r"stats: uptime=\d+s recipients=\d+ valid=\d+ invalid=\d+ skipped=\d+ "
                     r"unverified=\d+ cache_hits=\d+ cache_misses=\d+ probes=\d+ "
                     r"backend_errors=\d+$", line), line


def test_reload_takes_a_good_config_and_refuses_a_bad_one(fleet):
    rel, backend = fleet.reload, fleet.backend
    sock = os.path.join(rel.dir, "custom.ctl")
    assert any(line.startswith("route: none") for line in ctl_ok(sock, "check", "n-bad@new.test"))
    assert ask(rel, "n-bad@new.test")[0].is_continue
    assert rcpt_count(backend, "n-bad@new.test") == 0

    write_atomically(rel.conf, reload_conf(rel, backend.port, "new.test"))
    done = ctl("-f", rel.conf, "reload")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"reloaded {rel.conf}"
    assert f"route: new.test -> 127.0.0.1:{backend.port}" in ctl_ok(sock, "check", "n-bad@new.test")
    good, bad = ask(rel, "n-good@new.test", "n-bad@new.test")
    assert good.is_continue and is_invalid(bad), (show(good), show(bad))
    assert rcpt_count(backend, "n-bad@new.test") == 1

    text = reload_conf(rel, backend.port, "new.test", "gone.test", broken="BackSMTPPort: 99999\n")
    bad_line = text.splitlines().index("BackSMTPPort: 99999") + 1
    write_atomically(rel.conf, text)
    done = ctl("-f", rel.conf, "reload")        # -f still finds ControlSocket in a bad config
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert f"{rel.conf}:{bad_line}: BackSMTPPort" in done.stderr, done.stderr
    assert "refused" in done.stderr and "still serving the previous config" in done.stderr
    # The previous config keeps serving: new.test verified, gone.test not.
    assert f"route: new.test -> 127.0.0.1:{backend.port}" in ctl_ok(sock, "check", "x@new.test")
    assert any(line.startswith("route: none") for line in ctl_ok(sock, "check", "x@gone.test"))
    assert is_invalid(ask(rel, "n-bad2@new.test")[0])
    assert rcpt_count(backend, "n-bad2@new.test") == 1
    assert "reload refused" in rel.log()

    # Fixed on disk: noticed without being asked.
    write_atomically(rel.conf, reload_conf(rel, backend.port, "new.test", "auto.test"))
    assert wait_until(lambda: f"route: auto.test -> 127.0.0.1:{backend.port}" in
                      ctl_ok(sock, "check", "a-bad@auto.test"), 10, step=0.5), rel.log()[-2000:]
    good, bad = ask(rel, "a-good@auto.test", "a-bad@auto.test")
    assert good.is_continue and is_invalid(bad), (show(good), show(bad))
    assert rcpt_count(backend, "a-bad@auto.test") == 1
    assert "(changed on disk)" in rel.log()
    # The daemon still answers ctl on the same socket after all that.
    assert stats_json(sock)["recipients"] >= 5


def test_reload_works_for_a_daemon_started_with_relative_paths_and_detached(backend):
    """-f and -P relative to the start directory: -D moves to /, reload still finds the files."""
    daemon = Daemon(BASE + routes(backend.port, "example.net"), detach=True)
    with open(daemon.conf, "w") as handle:
        handle.write(daemon.conf_text)
    user = ["-u", RUN_USER] if IS_ROOT else []
    subprocess.run([str(Path(sys.executable).with_name("scam-back")), "-p", daemon.address,
                    "-f", "scam.conf", "-P", "scam-back.pid", "-b", "cache.txt", *user, "-D"],
                   cwd=daemon.dir, check=True, timeout=30, stdin=subprocess.DEVNULL,
                   capture_output=True)
    try:
        assert wait_until(lambda: os.path.exists(daemon.pidfile), 15), daemon.log()
        daemon.pid = int(Path(daemon.pidfile).read_text())
        sock = control_path(daemon)
        assert wait_until(lambda: os.path.exists(sock), 5)
        write_atomically(daemon.conf, BASE + routes(backend.port, "example.net", "new.test"))
        lines = ctl_ok(sock, "reload")
        assert lines[-1] == f"reloaded {daemon.conf}", lines
        assert any(line.startswith("route: new.test") for line in ctl_ok(sock, "check", "x@new.test"))
    finally:
        daemon.stop()
    assert not os.path.exists(sock)
