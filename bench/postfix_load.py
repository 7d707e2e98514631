"""Benchmark 2: messages per second through a real Postfix, without a milter, with the do-nothing
pymilter milter, and with scam-back (every recipient cached), same Postfix, same settings, same run.

One private Postfix (tests/postfix.py) on 127.0.0.1 relays example.net to a loopback smtp-sink;
three smtpd listeners differ only in smtpd_milters (none, bench/null_milter.py, scam-back), each
on a unix socket. Postfix's smtp-source sends -m messages over -s parallel sessions, one message
of 5 recipients (rcpt@, 2rcpt@ ... 5rcpt@example.net, all in scam-back's cache) per connection.
The three ways alternate for --rounds rounds; the median is reported. Postfix's own throttles are
off: smtpd_hard_error_limit raised, smtpd_error_sleep_time and in_flow_delay 0. The instance,
queue included, lives on the tmpfs /dev/shm when there is one: on disk, each round's rate varied by
a third with the queue files' fsyncs whichever way was measured (--queue-on-disk to see it).

    .venv/bin/python bench/postfix_load.py [--messages 2000] [--sessions 20] [--rounds 5] [--queue-on-disk]
    .venv/bin/python bench/postfix_load.py --quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Optional

from common import (print_notes, run_main, CORES, BenchDaemon, NullMilterProcess, cache_max_for, cpu_seconds,
                    daemon_conf, fmt, machine_line, ratio, say, stop_pid, system_cpu, table)
from tests.postfix import PostfixInstance, free_ports, listening_ports, postfix_available

RECIPIENT = "rcpt@example.net"
TMPFS = "/dev/shm"


def queue_parent(on_disk: bool) -> tuple[Optional[str], str]:
    """Where the Postfix instance goes, and how the table says it: a tmpfs unless asked not to."""
    if not on_disk and os.path.isdir(TMPFS) and os.access(TMPFS, os.W_OK) and \
            "tmpfs" in fs_type(TMPFS):
        return TMPFS, f"Postfix queue on tmpfs ({TMPFS})"
    return None, f"Postfix queue in {tempfile.gettempdir()} ({fs_type(tempfile.gettempdir())})"


def fs_type(path: str) -> str:
    """The file system type of the mount holding path, from /proc/self/mounts ('' if unknown)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and (real + "/").startswith(fields[1].rstrip("/") + "/") \
                        and len(fields[1]) >= len(best):
                    best, kind = fields[1], fields[2]
    except OSError:
        pass
    return kind


def find_tool(name: str) -> str:
    for folder in ("/usr/sbin", "/usr/lib/postfix/sbin", "/usr/bin"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found (it ships with Debian's postfix package)")
    return found


def recipients(count: int) -> list[str]:
    """The addresses smtp-source -r COUNT -t rcpt@example.net sends: rcpt@, 2rcpt@, ... COUNTrcpt@."""
    local, _, domain = RECIPIENT.partition("@")
    return [RECIPIENT] + [f"{n}{local}@{domain}" for n in range(2, count + 1)]


class Sink:
    """smtp-sink on 127.0.0.1 (a C accept-all SMTP server), stopped by pid."""

    def __init__(self) -> None:
        self.port = free_ports(1)[0]
        self.proc = subprocess.Popen([find_tool("smtp-sink"), "-u", "postfix", f"127.0.0.1:{self.port}",
                                      "1024"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.port not in listening_ports():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("smtp-sink did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        stop_pid(self.proc.pid, 5, self.proc)


def queue_files(instance: PostfixInstance) -> int:
    count = 0
    for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
        for _root, _dirs, files in os.walk(os.path.join(instance.queue, sub)):
            count += len(files)
    return count


def wait_queue_empty(instance: PostfixInstance, timeout: float = 120.0) -> int:
    """Wait (bounded) until Postfix has delivered everything; returns what is left."""
    deadline = time.monotonic() + timeout
    left = queue_files(instance)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = queue_files(instance)
    return left


def smtp_source(port: int, messages: int, sessions: int, rcpts: int, size: int,
                timeout: float) -> tuple[float, int, str]:
    """Run smtp-source; (seconds, exit code, first lines of its output)."""
    command = [find_tool("smtp-source"), "-s", str(sessions), "-m", str(messages), "-r", str(rcpts),
               "-t", RECIPIENT, "-f", "sender@example.org", "-M", "client.bench.example"]
    if size:
        command += ["-l", str(size)]
    command.append(f"127.0.0.1:{port}")
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        return time.monotonic() - start, -1, f"timed out after {timeout:.0f} s {text[:200]}"
    elapsed = time.monotonic() - start
    text = (done.stdout + done.stderr).strip()
    return elapsed, done.returncode, "\n".join(text.splitlines()[:3])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per measured run")
    parser.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions")
    parser.add_argument("--rcpts", type=int, default=5, help="recipients per message")
    parser.add_argument("--size", type=int, default=0, help="smtp-source -l payload bytes (0: default)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median counts")
    parser.add_argument("--cache-entries", type=int, default=1000,
                        help="other entries in scam-back's cache besides the 5 recipients")
    parser.add_argument("--log-level", default="info", help="scam-back LogLevel")
    parser.add_argument("--cpu-affinity", default="auto",
                        help="scam-back's CPUAffinity (auto, its default: one CPU for all its "
                             "threads; all: wherever the kernel puts them)")
    parser.add_argument("--queue-on-disk", action="store_true",
                        help=f"keep Postfix's queue in $TMPDIR, not on the tmpfs {TMPFS}: its "
                             "fsyncs then vary each round by a third, whatever the milter")
    parser.add_argument("--quick", action="store_true", help="500 messages, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.rounds = 500, 1
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    ok, why = postfix_available()
    if not ok:
        print(f"## postfix_load: skipped\n\n{why}\n")
        return 0
    sink = Sink()
    null = daemon = instance = None
    rows, notes = [], []
    parent, where = queue_parent(args.queue_on_disk)
    try:
        null = NullMilterProcess().start()
        conf = daemon_conf(sink.port, extra=f"BackSkipLoopback: no\nCPUAffinity: {args.cpu_affinity}\n",
                           log_level=args.log_level,
                           cache_max=cache_max_for(args.cache_entries + args.rcpts), save_interval=0)
        daemon = BenchDaemon(conf, cache_entries=args.cache_entries,
                             cache_extra=recipients(args.rcpts), extra_args=("-g", "postfix"))
        daemon.start()
        say(f"scam-back ready in {daemon.ready_s:.2f} s; starting Postfix")
        instance = PostfixInstance(
            daemon.address, sink.port, milter_default_action="tempfail", parent=parent,
            listeners={"nomilter": {"smtpd_milters": ""}, "null": {"smtpd_milters": null.address}},
            main_extra={"smtpd_hard_error_limit": "1000", "smtpd_soft_error_limit": "1000",
                        "smtpd_error_sleep_time": "0", "in_flow_delay": "0",
                        "smtpd_client_connection_count_limit": "0",
                        "smtpd_client_connection_rate_limit": "0",
                        "milter_command_timeout": "30s"})
        instance.start()
        ways = [("no milter", instance.ports["nomilter"], None),
                ("do-nothing milter", instance.ports["null"], null),
                ("scam-back (cached)", instance.port, daemon)]
        results: dict[str, list[float]] = {name: [] for name, _, _ in ways}
        cpu: dict[str, list[float]] = {name: [] for name, _, _ in ways}
        busy: dict[str, list[float]] = {name: [] for name, _, _ in ways}
        warm = max(50, args.messages // 20)
        for name, port, _ in ways:                       # warm-up: smtpd processes, milter threads
            wait_queue_empty(instance)
            smtp_source(port, warm, args.sessions, args.rcpts, args.size, 120)
        cached0 = daemon.count_log("source=cache")
        other0 = daemon.count_log("source=") - cached0
        for round_no in range(args.rounds):
            order = ways[round_no % 3:] + ways[:round_no % 3]
            for name, port, milter in order:
                left = wait_queue_empty(instance)
                if left:
                    notes.append(f"round {round_no + 1} {name}: {left} queue files still undelivered")
                say(f"round {round_no + 1}: {name}")
                c0 = cpu_seconds(milter.pid) if milter else 0.0
                s0 = system_cpu()
                elapsed, code, output = smtp_source(port, args.messages, args.sessions, args.rcpts,
                                                    args.size, max(120, args.messages / 20))
                s1 = system_cpu()
                c1 = cpu_seconds(milter.pid) if milter else 0.0
                if code != 0 or output:
                    notes.append(f"round {round_no + 1} {name}: smtp-source exit {code}: {output[:300]}")
                rate = args.messages / elapsed if code == 0 else float("nan")
                results[name].append(rate)
                cpu[name].append((c1 - c0) / elapsed)
                busy[name].append((s1[0] - s0[0]) / max(1, s1[1] - s0[1]) * CORES)
                say(f"  {rate:,.0f} msg/s")
        cached = daemon.count_log("source=cache") - cached0
        other = daemon.count_log("source=") - cached0 - cached - other0
        expected = args.rounds * args.messages * args.rcpts
        notes.append(f"scam-back logged {cached:,} cached decisions in the measured runs "
                     f"(expected {expected:,}) and {other:,} other decisions")
        wait_queue_empty(instance)
        maillog = instance.maillog()
        milter_warnings = [line for line in maillog.splitlines() if "milter" in line and
                           ("warning" in line or "error" in line)]
        if milter_warnings:
            notes.append(f"{len(milter_warnings)} milter warnings in the Postfix log, e.g. "
                         f"{milter_warnings[0][-200:]}")
        medians = {name: statistics.median(values) for name, values in results.items()}
        for name, _, _ in ways:
            rows.append([name, fmt(medians[name], 0),
                         " / ".join(fmt(v, 0) for v in results[name]),
                         fmt(statistics.median(cpu[name])) if name != "no milter" else "-",
                         fmt(statistics.median(busy[name]))])
        sb, nm, none = medians["scam-back (cached)"], medians["do-nothing milter"], medians["no milter"]
    finally:
        if instance is not None:
            instance.cleanup()
        if daemon is not None:
            daemon.stop()
        if null is not None:
            null.stop()
        sink.stop()

    print("## postfix_load: messages/s through Postfix (smtp-source -> Postfix -> smtp-sink)\n")
    print(f"{machine_line()}; smtp-source -s {args.sessions} -m {args.messages} -r {args.rcpts}, "
          f"one message per connection; {args.rounds} alternating round(s); milters on unix "
          f"sockets; scam-back LogLevel {args.log_level}, CPUAffinity {args.cpu_affinity}, "
          f"{args.cache_entries + args.rcpts:,} cached entries; {where}.\n")
    print(table(["Postfix with", "msg/s (median)", "each round", "milter CPU (cores)",
                 "machine busy (cores)"], rows))
    print()
    print(table(["ratio", "value"], [["scam-back / do-nothing milter", ratio(sb, nm)],
                                     ["scam-back / no milter", ratio(sb, none)],
                                     ["do-nothing milter / no milter", ratio(nm, none)]]))
    print()
    print("Target (issue 5): scam-back >= 0.95x the do-nothing milter.")
    print_notes(notes)
    return 0


if __name__ == "__main__":
    run_main(main, "postfix_load")
