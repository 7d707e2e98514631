"""CPUAffinity: every thread of the milter on one CPU, so the GIL never moves between CPUs.

Python runs one thread at a time whatever the number of CPUs, and libmilter gives every MTA
connection a thread that takes the GIL for each callback. Spread over CPUs, each hand-off of
the GIL wakes a thread on another CPU, which then fetches the decision's data from the first
CPU's cache: on 2 shared cores that cost more than the decisions themselves (README,
Performance). On one CPU the hand-offs stay cheap, and the kernel can run the MTA's processes on
the others.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from .config import Config, ConfigError

log = logging.getLogger("scam-back")
TASKS = "/proc/self/task"


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (systemd CPUAffinity=, taskset, cgroup cpusets)."""
    if not hasattr(os, "sched_getaffinity"):
        return set()
    return set(os.sched_getaffinity(0))


def choose(setting: str, allowed: set[int]) -> Optional[int]:
    """The CPU for a CPUAffinity setting, or None to leave placement to the kernel.

    auto: the last allowed CPU (None when only one is allowed, or the system cannot pin);
    all: None; a number: that CPU, ValueError(why and how to mend) if it is not allowed.
    """
    if setting == "all":
        return None
    if setting == "auto":
        return max(allowed) if len(allowed) > 1 else None
    cpu = int(setting)
    if not allowed:
        raise ValueError(f"CPUAffinity {cpu}: this system cannot pin threads to a CPU; "
                         "use CPUAffinity: all")
    if cpu not in allowed:
        raise ValueError(f"CPUAffinity {cpu}: not a CPU this process may use (allowed: "
                         f"{', '.join(map(str, sorted(allowed)))}); give one of them, or auto")
    return cpu


def chosen_cpu(config: Config) -> Optional[int]:
    """The one CPU to serve on, or None for any; ConfigError at CPUAffinity's line if not allowed."""
    try:
        return choose(config.cpu_affinity, allowed_cpus())
    except ValueError as exc:
        raise ConfigError(config.path, config.key_lines.get("cpu_affinity", 0), str(exc)) from None


def serve_on(cpu: Optional[int]) -> str:
    """Pin every thread to the chosen CPU (libmilter's threads, started next, inherit it);
    returns where the milter serves, for the start-up line."""
    if cpu is None:
        return "on any CPU"
    try:
        pin(cpu)
    except OSError as exc:
        log.warning("CPUAffinity: cannot keep the milter on CPU %d (%s); serving on any CPU",
                    cpu, exc.strerror or exc)
        return "on any CPU"
    return f"on CPU {cpu}"


def pin(cpu: int) -> None:
    """Move every thread of this process to one CPU; threads started later inherit it."""
    try:
        threads = [int(tid) for tid in os.listdir(TASKS)]
    except OSError:                 # no /proc: the calling thread, and what it starts later
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, {cpu})
        except ProcessLookupError:  # the thread ended meanwhile
            pass
