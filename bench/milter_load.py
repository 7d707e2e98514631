"""Benchmark 1: cached RCPT decisions over the milter protocol, scam-back against a do-nothing milter.

The real daemon starts with a cache file of N entries (user0..user{N-1}@example.net, all valid)
and is driven from C concurrent milter connections (unix socket), each sending transactions of
5 RCPTs that all hit the cache (random addresses among the N), then end of message. The
do-nothing pymilter milter (bench/null_milter.py: same pymilter, same libmilter, CONTINUE on
every RCPT) is driven the same way in the same run, cell by cell. The load comes from several
client processes (threads inside each), and their CPU is reported: on 2 cores the client shares
the machine with the milter, so the ratios are the meaningful numbers.

    .venv/bin/python bench/milter_load.py [--seconds 3] [--repeat 6] [--sizes 1000,1000000] [--conns 1,10,50]
    .venv/bin/python bench/milter_load.py --quick      # N=1000, C=1 and 10, 2 s per cell
    .venv/bin/python bench/milter_load.py --pin        # milters on CPU 0, load on the others

With --pin each milter runs on one CPU and the load client on the rest, as when the MTA has
CPUs of its own: the GIL then never moves between cores, and the client never preempts a
thread that holds it.
"""

from __future__ import annotations

import argparse
import os
from statistics import median

from common import (print_notes, run_main, CORES, AcceptAllBackend, BenchDaemon, LoadSpec, NullMilterProcess,
                    cache_max_for, daemon_conf, fmt, machine_line, pin_process, protocol_text, ratio,
                    run_load, say, table)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="uncounted start of each cell")
    parser.add_argument("--sizes", default="1000,1000000", help="cache sizes N")
    parser.add_argument("--conns", default="1,10,50", help="concurrent milter connections C")
    parser.add_argument("--procs", type=int, default=0, help="client processes (0: about C/10)")
    parser.add_argument("--rcpts", type=int, default=5, help="recipients per transaction")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs per milter and cell, alternating ABBA; medians are shown "
                             "(default 6; 1 with --quick)")
    parser.add_argument("--tx-per-conn", type=int, default=0,
                        help="transactions per milter connection (0: one connection per run)")
    parser.add_argument("--end", choices=("eom", "abort"), default="eom")
    parser.add_argument("--log-level", default="info", help="scam-back LogLevel")
    parser.add_argument("--quick", action="store_true", help="N=1000, C=1,10, 2 s: a smoke test")
    parser.add_argument("--cpu-affinity", default="auto",
                        help="scam-back's CPUAffinity (auto, its default: one CPU for all its "
                             "threads; all: wherever the kernel puts them)")
    parser.add_argument("--pin", action="store_true",
                        help="run the milters on CPU 0 and the load client on the other CPUs")
    args = parser.parse_args(argv)
    if args.pin and CORES < 2:
        parser.error("--pin needs at least 2 CPUs")
    if args.quick:
        args.sizes, args.conns, args.seconds = "1000", "1,10", 2.0
    if args.repeat is None:
        args.repeat = 1 if args.quick else 6
    args.sizes = [int(v) for v in str(args.sizes).split(",") if v]
    args.conns = [int(v) for v in str(args.conns).split(",") if v]
    return args


def cpus_text(pid: int) -> str:
    """The CPUs a process's main thread may run on, as "0-1" or "1"."""
    cpus = sorted(os.sched_getaffinity(pid))
    if len(cpus) == 1:
        return str(cpus[0])
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    rows, ratios, notes = [], [], []
    if args.pin:
        os.sched_setaffinity(0, set(range(1, CORES)))   # inherited by the load processes
    backend = AcceptAllBackend().start()     # counts any cache miss (there should be none)
    null = NullMilterProcess().start()
    if args.pin:
        pin_process(null.pid, {0})
    say(f"do-nothing milter ready in {null.ready_s:.2f} s")
    try:
        for size in args.sizes:
            conf = daemon_conf(backend.port, log_level=args.log_level,
                               cache_max=cache_max_for(size), save_interval=0,
                               extra=f"CPUAffinity: {args.cpu_affinity}\n")
            daemon = BenchDaemon(conf, cache_entries=size)
            say(f"starting scam-back with {size:,} cached entries")
            daemon.start()
            if args.pin:
                pin_process(daemon.pid, {0})
            say(f"  ready in {daemon.ready_s:.2f} s (cache file written in {daemon.cache_write_s:.2f} s), "
                f"RSS {daemon.rss_mb():.0f} MB")
            notes.append(f"N={size:,}: scam-back ready {daemon.ready_s:.2f} s after exec, "
                         f"RSS {daemon.rss_mb():.0f} MB, BackCacheMax {cache_max_for(size):,}, "
                         f"threads on CPU {cpus_text(daemon.pid)} (do-nothing milter: CPU "
                         f"{cpus_text(null.pid)})")
            if daemon.protocol != null.protocol and not any("negotiated" in n for n in notes):
                notes.append(f"negotiated steps differ: scam-back [{protocol_text(daemon.protocol)}] "
                             f"vs do-nothing [{protocol_text(null.protocol)}]")
            try:
                for index, conns in enumerate(args.conns):
                    runs: dict = {"do-nothing": [], "scam-back": []}
                    order = [("do-nothing", null), ("scam-back", daemon)]
                    if index % 2:
                        order.reverse()          # neither milter always runs first
                    for rep in range(args.repeat):
                        for name, milter in (order if rep % 2 == 0 else order[::-1]):   # ABBA
                            spec = LoadSpec(milter.address, conns, args.seconds, ("cached", size),
                                            rcpts=args.rcpts, warmup=args.warmup,
                                            tx_per_conn=args.tx_per_conn, end=args.end,
                                            procs=args.procs, seed=rep + 1)
                            before = backend.rcpt_count()
                            result = run_load(spec, watch={"milter": milter.pid})
                            result.misses = backend.rcpt_count() - before  # type: ignore[attr-defined]
                            runs[name].append(result)
                            say(f"  N={size:,} C={conns} {name}: {result.rate:,.0f} RCPT/s "
                                f"p50 {result.pct_ms(50):.2f} ms p99 {result.pct_ms(99):.2f} ms "
                                f"client {result.client_cpu / args.seconds:.2f} cores")
                    cell = {}
                    for name in ("do-nothing", "scam-back"):
                        done = runs[name]
                        cell[name] = medians = {
                            "rate": median(r.rate for r in done),
                            "p50": median(r.pct_ms(50) for r in done),
                            "p99": median(r.pct_ms(99) for r in done),
                            "p99.9": median(r.pct_ms(99.9) for r in done)}
                        misses = sum(r.misses for r in done)  # type: ignore[attr-defined]
                        problems = sum(r.not_continue + len(r.errors) for r in done) + misses
                        rows.append([f"{size:,}", conns, name, f"{medians['rate']:,.0f}",
                                     " / ".join(f"{r.rate:,.0f}" for r in done),
                                     fmt(medians["p50"]), fmt(medians["p99"]),
                                     " / ".join(fmt(r.pct_ms(99)) for r in done),
                                     fmt(medians["p99.9"]), fmt(max(r.max_ms for r in done), 1),
                                     fmt(median(r.watched_cpu.get("milter", 0) for r in done)
                                         / args.seconds),
                                     fmt(median(r.client_cpu for r in done) / args.seconds),
                                     f"{done[0].procs}",
                                     fmt(median(max(0.0, r.system_busy * CORES - (
                                         r.watched_cpu.get("milter", 0) + r.client_cpu)
                                         / args.seconds) for r in done)),
                                     problems])
                        for r in done:
                            for error in r.errors[:3]:
                                notes.append(f"N={size:,} C={conns} {name}: {error}")
                            if r.not_continue:
                                notes.append(f"N={size:,} C={conns} {name}: replies {dict(r.replies)}")
                        if misses:
                            notes.append(f"N={size:,} C={conns} {name}: {misses} RCPTs reached the "
                                         "backend (cache misses)")
                    sb, nm = cell["scam-back"], cell["do-nothing"]
                    ratios.append([f"{size:,}", conns, ratio(sb["rate"], nm["rate"]),
                                   ratio(sb["p50"], nm["p50"]), ratio(sb["p99"], nm["p99"])])
            finally:
                say("  stopping scam-back (saves its cache)")
                daemon.stop()
    finally:
        null.stop()
        backend.stop()

    print("## milter_load: cached RCPT decisions, scam-back vs do-nothing pymilter milter"
          + (", pinned: milters on CPU 0, load client on the others" if args.pin else "") + "\n")
    print(f"{machine_line()}; {args.seconds:g} s per run after {args.warmup:g} s warm-up, "
          f"{args.repeat} run(s) per milter and cell in ABBA order; each figure is the median "
          "of the runs (max ms: the largest); "
          f"{args.rcpts} RCPTs per transaction, then {args.end}; unix sockets; scam-back "
          f"LogLevel {args.log_level}, CPUAffinity {args.cpu_affinity}"
          + (" (overridden by --pin)" if args.pin else "") + ".\n")
    print(table(["N cached", "C", "milter", "RCPT/s", "each run", "p50 ms", "p99 ms", "each run",
                 "p99.9 ms", "max ms",
                 "milter CPU", "client CPU", "client procs", "other CPU", "errors/misses"], rows))
    print()
    print("CPU columns are cores (of %d) used during the window: the milter process, the load "
          "client processes, and everything else on the machine (other CPU > 0.1 means something "
          "else ran: the numbers of that row are disturbed). When milter + client CPU is near %d, "
          "the client shares the machine with the milter and absolute rates are partly client-bound; "
          "compare the ratios." % (CORES, CORES))
    print()
    print(table(["N cached", "C", "throughput scam-back/do-nothing", "p50 ratio",
                 "p99 ratio"], ratios))
    print()
    print("Targets (issue 5): throughput >= 0.80x, p99 <= 1.25x of the do-nothing milter.")
    print_notes(notes)
    return 0


if __name__ == "__main__":
    run_main(main, "milter_load")
