"""Run the four benchmarks one after another and print their tables (optionally to a file too).

    .venv/bin/python bench/run_all.py                  # full run (about 5-10 minutes on 2 cores)
    .venv/bin/python bench/run_all.py --write          # also write bench/results.md
    .venv/bin/python bench/run_all.py --quick          # each script's --quick smoke test
    .venv/bin/python bench/run_all.py --only milter_load,cache_scale

Progress goes to stderr; stdout (and the file) get only the tables. Each script runs as its own
process, bounded by --timeout seconds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SCRIPTS = ["milter_load", "postfix_load", "cache_scale", "backend_probes"]
# milter_load runs a second time with the milters pinned to one CPU (not with --quick).
PINNED = ["--pin", "--conns", "10,50"]


def git_describe() -> str:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "scam_back"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + (" (scam_back/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--write", action="store_true", help="also write bench/results.md")
    parser.add_argument("--output", help="also write the tables to this file")
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated scripts to run")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per script")
    args = parser.parse_args(argv)
    output = args.output or (str(BENCH / "results.md") if args.write else None)
    chosen = [name.strip().removesuffix(".py") for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SCRIPTS]
    if unknown:
        parser.error(f"unknown script(s): {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")

    sys.path.insert(0, str(BENCH))
    from common import machine_line  # noqa: E402  (after the path is set)

    started = time.monotonic()
    command = " ".join(["bench/run_all.py", *argv])
    parts = [f"# scam-back benchmarks\n\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
             f"{git_describe()}, {machine_line()}.\nCommand: `.venv/bin/python {command}` "
             "(`make bench`).\n"]
    print(parts[0], flush=True)
    failed = 0
    runs = [(name, ["--quick"] if args.quick else []) for name in chosen]
    if "milter_load" in chosen and not args.quick:
        runs.insert(chosen.index("milter_load") + 1, ("milter_load", PINNED))
    for name, extra in runs:
        cmd = [sys.executable, str(BENCH / f"{name}.py")] + extra
        label = " ".join([name, *extra])
        print(f"[run_all] {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout,
                                  cwd=str(REPO), stdin=subprocess.DEVNULL)
            text, code = done.stdout, done.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or ""
            text = (out.decode(errors="replace") if isinstance(out, bytes) else out)
            text += f"\n{label}: stopped after {args.timeout:.0f} s\n"
            code = -1
        if code != 0:
            failed += 1
            text += f"\n{label} exited {code} (see its stderr above)\n"
        text = text.rstrip() + f"\n\n_{label}: {time.monotonic() - t0:.0f} s_\n"
        parts.append(text)
        print(text, flush=True)
    total = f"_all: {time.monotonic() - started:.0f} s_\n"
    parts.append(total)
    print(total, flush=True)
    if output:
        Path(output).write_text("\n".join(parts))
        print(f"[run_all] tables written to {output}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
