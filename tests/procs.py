"""Process helpers shared by the test fixtures and the benchmarks."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while pid runs; a zombie (an orphan nobody may reap here) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
