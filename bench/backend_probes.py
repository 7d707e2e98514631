"""Benchmark 4: uncached recipients, and what they cost the backend.

A counting backend (tests/smtpbackend.Backend, aiosmtpd, in its own process so that its GIL and
CPU are apart from the load client's) accepts every recipient but scam-back's accept-all check
addresses (as a backend that knows its users would) and counts its TCP connections and commands. scam-back starts with an empty cache and BackErrorTempfail: yes (so that any backend
trouble shows as a tempfail instead of a silent accept).

1. Verifications per second from C=50 concurrent milter connections, every RCPT a new address:
   a) a new milter connection per transaction (as Postfix opens one per SMTP session), and
   b) persistent milter connections; with backend connections and commands per 100
   verifications. A last row verifies against Postfix's smtp-sink (C, accept-all, not counted)
   for the throughput the verifier reaches when the backend is not the limit.
2. 50 connections ask for the same new address at once (released by a barrier): how many RCPTs
   reach the backend (want 1), with a backend that answers that RCPT after 200 ms and with one
   that answers at once.

    .venv/bin/python bench/backend_probes.py [--seconds 5] [--conns 50] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import threading
import time
import uuid
from collections import Counter
from typing import Any

from common import (print_notes, run_main, CORES, BenchDaemon, LoadSpec, daemon_conf, fmt, machine_line,
                    percentile, run_load, say, stop_pid, table, CLIENT_HOST, DAEMON_NAME)
from tests.milterclient import MilterClient
from tests.postfix import free_ports, listening_ports
from tests.smtpbackend import SMTP, Backend, _Handler, _RecordingSMTP

SLOW_PREFIX = "slow-"
CHECK_MARK = "scam-back-check-"       # the local part of an accept-all check probe
SINK_DOMAIN = "example.org"


# ---------------------------------------------------------------- the counting backend (child)

class _SlowHandler(_Handler):
    """Answers RCPT TO:<slow-...> only after a delay (others at once)."""

    delay = 0.2

    async def handle_RCPT(self, server, session, envelope, address, options):  # type: ignore[no-untyped-def]
        if address.lower().startswith(SLOW_PREFIX):
            await asyncio.sleep(self.delay)
        return await super().handle_RCPT(server, session, envelope, address, options)


class _SlowSMTP(_RecordingSMTP):
    def __init__(self, backend: Backend, **kwargs: Any) -> None:  # noqa: D107
        SMTP.__init__(self, _SlowHandler(backend), **kwargs)
        self._backend, self._partial = backend, b""


class CountingBackend(Backend):
    """Every recipient exists, except scam-back's accept-all check addresses (a backend that
    knows its users); RCPTs for slow-... addresses are answered after 200 ms."""

    def rcpt_reply_for(self, address: str) -> str:
        if CHECK_MARK in address.lower():
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        return "250 2.1.5 OK"

    def _factory(self) -> _SlowSMTP:
        self._record(connection=True)
        return _SlowSMTP(self, hostname=self.hostname, ident=self.banner,
                         enable_SMTPUTF8=True, loop=self._loop)


def backend_child(pipe: Any) -> None:
    """Runs in its own process: serve, and answer ("stats", needle) / ("stop",) on the pipe."""
    backend = CountingBackend().start()
    parent = os.getppid()
    pipe.send(("port", backend.port, os.getpid()))
    seen = 0
    verbs: Counter = Counter()
    try:
        for _ in range(100_000):                 # bounded: 100,000 polls of 0.5 s at most
            if os.getppid() != parent:
                break
            if not pipe.poll(0.5):
                continue
            message = pipe.recv()
            if message[0] == "stop":
                break
            if message[0] == "stats":
                with backend._cond:
                    lines = backend.transcript[seen:]
                    seen = len(backend.transcript)
                    connections = backend.connections
                    needle = message[1]
                    needle_hits = sum(1 for line in backend.transcript
                                      if needle and line.upper().startswith("RCPT")
                                      and needle in line.lower())
                for line in lines:
                    verb = line.split(" ", 1)[0].upper().rstrip(":")
                    verbs["CHECK" if verb == "RCPT" and CHECK_MARK in line.lower() else verb] += 1
                pipe.send(("stats", connections, dict(verbs), needle_hits))
    finally:
        backend.stop()


class BackendProcess:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=backend_child, args=(child,), daemon=True)
        self.proc.start()
        if not self.pipe.poll(30):
            self.stop()
            raise RuntimeError("counting backend did not start")
        _, self.port, self.pid = self.pipe.recv()

    def stats(self, needle: str = "") -> tuple[int, Counter, int]:
        self.pipe.send(("stats", needle.lower()))
        if not self.pipe.poll(30):
            raise RuntimeError("counting backend does not answer")
        _, connections, verbs, hits = self.pipe.recv()
        return connections, Counter(verbs), hits

    def stop(self) -> None:
        try:
            self.pipe.send(("stop",))
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()               # SIGTERM to the child's pid
            self.proc.join(5)


class Sink:
    """smtp-sink on 127.0.0.1, stopped by pid."""

    def __init__(self) -> None:
        self.port = free_ports(1)[0]
        tool = next((p for p in ("/usr/sbin/smtp-sink", "/usr/lib/postfix/sbin/smtp-sink")
                     if os.access(p, os.X_OK)), None)
        self.proc = None
        if tool is None:
            return
        self.proc = subprocess.Popen([tool, "-u", "postfix", f"127.0.0.1:{self.port}", "1024"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.port not in listening_ports() and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid, 5, self.proc)


# ---------------------------------------------------------------- measurements

def same_address(address: str, conns: int, timeout: float = 30.0) -> dict:
    """`conns` milter connections send RCPT TO:<one new address> at the same moment."""
    barrier = threading.Barrier(conns + 1)
    replies: Counter = Counter()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        client = None
        try:
            client = MilterClient(address_spec, timeout=timeout)
            client.negotiate()
            client.connect(CLIENT_HOST, "inet", f"198.51.100.{1 + i}", 40000 + i,
                           macros={"j": DAEMON_NAME, "{daemon_name}": DAEMON_NAME})
            client.mail("<sender@example.org>")
        except Exception as exc:
            with lock:
                errors.append(f"open: {exc}")
            client = None
        try:
            barrier.wait(timeout)
        except threading.BrokenBarrierError:
            return
        if client is None:
            return
        try:
            t0 = time.monotonic()
            reply = client.rcpt(f"<{address}>", macros={"{rcpt_addr}": address})
            with lock:
                latencies.append(time.monotonic() - t0)
                replies[reply.action if reply.action != "replycode" else reply.code] += 1
            client.abort()
            client.quit()
        except Exception as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")

    address_spec = same_address.milter  # type: ignore[attr-defined]
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(conns)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait(timeout)
    except threading.BrokenBarrierError:
        errors.append("barrier broken")
    for thread in threads:
        thread.join(timeout)
    latencies.sort()
    return {"replies": replies, "errors": errors, "max": latencies[-1] * 1000 if latencies else float("nan"),
            "p50": percentile(latencies, 50) * 1000}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--rcpts", type=int, default=5, help="recipients per transaction")
    parser.add_argument("--procs", type=int, default=0, help="client processes (0: about C/10)")
    parser.add_argument("--same-rounds", type=int, default=2, help="rounds of each same-address test")
    parser.add_argument("--log-level", default="info", help="scam-back LogLevel")
    parser.add_argument("--quick", action="store_true", help="2 s runs, 1 same-address round")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.same_rounds = 2.0, 1
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    backend = BackendProcess()
    sink = Sink()
    daemon = None
    rows, same_rows, notes = [], [], []
    try:
        extra = "BackErrorTempfail: yes\n"
        if sink.proc is not None:
            extra += (f"BackSMTPPort: {sink.port}\nBackSMTPServer: 127.0.0.1\n"
                      f"BackAddrDomain: {SINK_DOMAIN}\n")
        conf = daemon_conf(backend.port, extra=extra, log_level=args.log_level)
        daemon = BenchDaemon(conf).start()
        same_address.milter = daemon.address  # type: ignore[attr-defined]
        say(f"scam-back ready in {daemon.ready_s:.2f} s")

        # 2 first, on a fresh daemon: 50 asks for one new address at once.
        for round_no in range(args.same_rounds):
            for slow in (True, False):
                address = f"{SLOW_PREFIX if slow else 'once-'}{uuid.uuid4().hex[:12]}@example.net"
                before = backend.stats(address)
                result = same_address(address, args.conns)
                time.sleep(0.3)
                after = backend.stats(address)
                probes_logged = daemon.count_log(f"rcpt=<{address}>")
                same_rows.append([f"{round_no + 1}", "200 ms" if slow else "at once", args.conns,
                                  after[2], after[1]["CHECK"] - before[1]["CHECK"],
                                  after[0] - before[0],
                                  ", ".join(f"{k} {v}" for k, v in sorted(result["replies"].items())),
                                  fmt(result["p50"], 1), fmt(result["max"], 1), probes_logged])
                for error in result["errors"][:3]:
                    notes.append(f"same address {address}: {error}")
                say(f"same address ({'slow' if slow else 'fast'} backend): {after[2]} RCPT at the backend")

        cases = [("new milter connection per transaction", 1, "example.net"),
                 ("persistent milter connections", 0, "example.net")]
        if sink.proc is not None:
            cases.append(("new milter connection per transaction, smtp-sink backend", 1, SINK_DOMAIN))
        for index, (name, tx_per_conn, domain) in enumerate(cases):
            say(f"uncached load: {name}")
            conn0, verbs0, _ = backend.stats()
            spec = LoadSpec(daemon.address, args.conns, args.seconds, ("unique", f"r{index}", domain),
                            rcpts=args.rcpts, tx_per_conn=tx_per_conn, procs=args.procs, timeout=30)
            result = run_load(spec, watch={"milter": daemon.pid, "backend": backend.pid,
                                           **({"sink": sink.proc.pid} if sink.proc else {})})
            time.sleep(0.3)
            conn1, verbs1, _ = backend.stats()
            counted = domain == "example.net"
            total = max(1, result.all_decisions)
            per100 = lambda n: fmt(100 * n / total) if counted else "-"  # noqa: E731
            verbs = verbs1 - verbs0
            backend_cpu = result.watched_cpu.get("backend" if counted else "sink", 0) / args.seconds
            rows.append([name + ("" if counted else " (not counted)"), args.conns,
                         f"{result.rate:,.0f}", fmt(result.pct_ms(50)), fmt(result.pct_ms(99)),
                         per100(conn1 - conn0), per100(verbs["RCPT"]), per100(verbs["CHECK"]),
                         per100(verbs["MAIL"]),
                         per100(verbs["EHLO"] + verbs["HELO"]), per100(verbs["RSET"]),
                         per100(verbs["QUIT"]),
                         fmt(result.watched_cpu.get("milter", 0) / args.seconds),
                         fmt(backend_cpu), fmt(result.client_cpu / args.seconds),
                         result.not_continue + len(result.errors)])
            if result.not_continue:
                notes.append(f"{name}: replies {dict(result.replies)}")
            for error in result.errors[:3]:
                notes.append(f"{name}: {error}")
            say(f"  {result.rate:,.0f} verifications/s; backend connections {conn1 - conn0} for "
                f"{result.all_decisions} verifications")
    finally:
        if daemon is not None:
            daemon.stop()
        sink.stop()
        backend.stop()

    print("## backend_probes: uncached recipients and the backend's cost\n")
    print(f"{machine_line()}; {args.seconds:g} s per run, {args.rcpts} new recipients per "
          f"transaction, every recipient exists (accept-all check addresses do not); "
          f"counting backend = aiosmtpd in its own process; "
          f"scam-back LogLevel {args.log_level}, BackErrorTempfail: yes.\n")
    print(table(["uncached load", "C", "verifications/s", "p50 ms", "p99 ms",
                 "backend conns /100", "RCPT /100", "accept-all check RCPT /100", "MAIL /100",
                 "EHLO /100", "RSET /100",
                 "QUIT /100", "milter CPU", "backend CPU", "client CPU", "errors"], rows))
    print()
    print("'/100' columns: backend connections or commands per 100 verifications (all RCPTs "
          f"answered during the run, warm-up included); RCPT excludes the accept-all checks "
          f"(BackCatchAllCheck: one per domain and backend every 6 h, in the background), counted "
          f"apart. CPU columns are cores of {CORES}.")
    print()
    print(table(["round", "backend answers", "connections asking", "RCPTs for the address",
                 "accept-all check RCPTs", "backend connections", "replies", "p50 ms", "max ms", "verdict log lines"],
                same_rows))
    print()
    print("Targets (issue 5): at most 10 backend connections per 100 verifications under 50 "
          "concurrent connections; 50 simultaneous asks for one new address send exactly 1 RCPT.")
    print_notes(notes)
    return 0


if __name__ == "__main__":
    run_main(main, "backend_probes")
