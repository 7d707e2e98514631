"""Prober: one RCPT question to a route's backends, over pooled sessions, failing over in order."""

from __future__ import annotations

import time

from .backend import BackendError, BackendSession, SessionSettings
from .config import HostSpec
from .health import Backoff
from .pool import SessionPool
from .resolve import Resolver
from .stats import Stats
from .verdict import Kind, Verdict, classify


class Prober:
    """Asks about an address at the first backend that can answer; every failure is counted."""

    def __init__(self, settings: SessionSettings, pool: SessionPool, resolver: Resolver,
                 backoff: Backoff, stats: Stats) -> None:
        self.settings, self.pool, self.resolver = settings, pool, resolver
        self.backoff, self.stats = backoff, stats

    def _ask(self, session: BackendSession, address: str, deadline: float) -> Verdict:
        started = time.monotonic()
        code, text = session.rcpt(address, deadline)
        self.stats.count("probes", session.label)
        self.stats.latency(session.label, round((time.monotonic() - started) * 1000, 1))
        first = text.splitlines()[0] if text else ""
        kind = classify(code, text, self.settings.mail_from)
        return Verdict(kind, "backend", session.label, f"{code} {first}"[:200],
                       why=f"backend said {code}" if kind is Kind.TROUBLE else "")

    def probe(self, hosts: tuple[HostSpec, ...], address: str, deadline: float,
              record_health: bool = True) -> Verdict:
        """Ask the backend, reusing a pooled session where there is one, failing over in order
        (record_health False: failed connects do not count towards BackSMTPBackoffFailures,
        for side probes such as the accept-all check, which run beside a real one)."""
        errors: list[str] = []
        why = ""
        label = ",".join(str(spec) for spec in hosts)

        def failed(where: str, exc: BackendError) -> Verdict:
            nonlocal why
            errors.append(f"{where} {exc}")
            why = exc.kind
            self.stats.count("backend-errors", f"{where} {exc.kind}")
            return Verdict(Kind.TROUBLE, "backend", where, "; ".join(errors)[:300], why=why)

        for spec in hosts:
            for host, port in self.resolver.addresses(spec, deadline):
                key = (host, port)
                lmtp, tls_name = spec.protocol == "lmtp", None if spec.mx else spec.host
                session = self.pool.take((host, port, lmtp, tls_name))
                if session is not None:
                    try:
                        return self._ask_and_return(session, address, deadline)
                    except BackendError as exc:
                        trouble = failed(session.label, exc)
                        if time.monotonic() >= deadline:
                            return trouble
                        if exc.kind == "timeout":
                            continue        # a stalled backend: fail over to the next one
                        # A pooled session the backend has since closed or spoilt (421 on RSET,
                        # say) is retried once on a fresh one.
                session = BackendSession(host, port, self.settings, lmtp, tls_name)
                label = session.label
                if self.backoff.blocked(key):
                    errors.append(f"{label} in backoff")
                    why = why or "backoff"
                    continue
                try:
                    session.open(deadline)
                except BackendError as exc:
                    trouble = failed(label, exc)
                    if exc.kind in ("connect", "banner") and record_health:
                        # Refused, or accepting and never greeting: either way, skip it a while.
                        self.backoff.failed(key, label, exc.detail)
                    if time.monotonic() >= deadline:
                        return trouble
                    continue
                if record_health:
                    self.backoff.succeeded(key, label)
                try:
                    return self._ask_and_return(session, address, deadline)
                except BackendError as exc:
                    failed(label, exc)
                    if time.monotonic() >= deadline:
                        break
        if not errors:
            errors.append(f"no address found for {label}")
            why = "no address"
        return Verdict(Kind.TROUBLE, "backend", label, "; ".join(errors)[:300], why=why)

    def _ask_and_return(self, session: BackendSession, address: str, deadline: float) -> Verdict:
        """One RCPT on a session, which goes back to the pool after (if it is still usable)."""
        try:
            return self._ask(session, address, deadline)
        finally:
            self.pool.give(session)
