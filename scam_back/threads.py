"""Background threads that never take the stop signals: libmilter's own thread must get them."""

from __future__ import annotations

import signal
import threading
from typing import Callable

STOP_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}


def start_quiet_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread with SIGTERM, SIGHUP and SIGINT blocked.

    A thread that could take one of them would let the signal kill the process instead of
    stopping libmilter, which saves the cache and removes the pid file on its way out.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return thread
