"""SessionPool: idle backend sessions per backend address, shared by every MTA connection."""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from .backend import BackendSession, PoolKey, SessionSettings


class SessionPool:
    """Keeps sessions between uses so most verifications cost one RSET, MAIL and RCPT.

    A session is used by one thread at a time: take() removes it from the pool, give() puts it
    back (its transaction is reset before the next MAIL FROM). Sessions idle for longer than
    idle_timeout are closed by reap(), which the daemon calls every few seconds.
    """

    def __init__(self, idle_timeout: float = 30.0, max_idle_per_backend: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout, self.max_idle = idle_timeout, max_idle_per_backend
        self.clock = clock
        self._idle: dict[PoolKey, list[tuple[float, BackendSession]]] = {}
        self._lock = threading.Lock()
        self.settings: Optional[SessionSettings] = None    # sessions with others are not kept

    def take(self, key: PoolKey) -> Optional[BackendSession]:
        """The most recently used idle session of this kind (BackendSession.pool_key), or None."""
        with self._lock:
            idle = self._idle.get(key)
            while idle:
                _, session = idle.pop()
                if session.is_open:
                    return session
        return None

    def give(self, session: BackendSession) -> None:
        """Return a session after use; a closed one is dropped, a surplus one closed."""
        if not session.is_open:
            return
        if self.settings is not None and session.settings != self.settings:
            session.close()         # opened before a reload changed how sessions are opened
            return
        session.reset()
        with self._lock:
            idle = self._idle.setdefault(session.pool_key, [])
            if len(idle) < self.max_idle:
                idle.append((self.clock(), session))
                return
        session.close()

    def reap(self) -> int:
        """Close sessions idle for longer than idle_timeout; returns how many."""
        cutoff = self.clock() - self.idle_timeout
        stale: list[BackendSession] = []
        with self._lock:
            for key, idle in self._idle.items():
                keep = [(t, s) for t, s in idle if t > cutoff]
                stale.extend(s for t, s in idle if t <= cutoff)
                self._idle[key] = keep
        _close_all(stale)
        return len(stale)

    def close(self) -> None:
        """QUIT every idle session (at shutdown), all within one short deadline."""
        with self._lock:
            sessions = [s for idle in self._idle.values() for _, s in idle]
            self._idle.clear()
        _close_all(sessions)

    def idle_at(self, host: str, port: int) -> int:
        """Idle sessions to one backend address, of any kind."""
        with self._lock:
            return sum(len(idle) for key, idle in self._idle.items() if key[:2] == (host, port))

    def idle_count(self) -> int:
        with self._lock:
            return sum(len(idle) for idle in self._idle.values())


CLOSE_WITHIN = 1.0      # a silent backend must not hold up shutdown or the periodic saves


def _close_all(sessions: list[BackendSession]) -> None:
    """Say RSET/QUIT to each session, all within CLOSE_WITHIN seconds together; then close."""
    deadline = time.monotonic() + CLOSE_WITHIN
    for session in sessions:
        session.close(deadline)
