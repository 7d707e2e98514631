"""Verifier.verify(address) -> Verdict: address rules, route, cache, then the backend."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time
from dataclasses import replace
from typing import Callable, NamedTuple, Optional, TypeVar

from . import address as addr
from . import log as logmod
from .backend import SessionSettings, TLSContexts, tls_contexts_for
from .cache import DUE, VerdictCache
from .catchall import AcceptAllCheck
from .health import Backoff
from .pool import SessionPool
from .probes import ProbeGate
from .prober import Prober
from .refresh import Refresher
from .config import Config, HostSpec
from .resolve import Resolver
from .routing import Route, Router
from .sharedcache import SharedCache
from .stats import Stats
from .verdict import Kind, Verdict

log = logging.getLogger("scam-back")
T = TypeVar("T")


MEMO_MAX = 10_000           # domains or clients remembered before the memo starts over


DRY_RUN_MARK = " dry-run=not-enforced"     # BackDryRun: the verdict is only reported


def verdict_line(qid: str, raw: str, verdict: Verdict, dry_run: bool = False) -> str:
    """The log line of one decision (rendered off the MTA's thread in the daemon)."""
    shown = raw.strip("<>")[:300]
    if not shown.isprintable():
        shown = shown.encode("unicode_escape").decode("ascii")
    return (f"qid={qid or '-'} rcpt=<{shown}> backend={verdict.backend} "
            f"verdict={verdict.kind.value} source={verdict.source} "
            f"reply=\"{verdict.reply}\" ms={verdict.ms}" + (DRY_RUN_MARK if dry_run else ""))


class CachedAnswers(NamedTuple):
    """A route's verdicts from the cache, and the ends of their log lines, made once per route."""

    valid: Verdict
    invalid: Verdict
    valid_tail: str             # the log line after "rcpt=<...> "
    invalid_tail: str


def remember(memo: dict, key: object, value: T) -> T:
    """Store value in a small memo, starting it over once it holds MEMO_MAX entries."""
    if len(memo) >= MEMO_MAX:
        memo.clear()
    memo[key] = value
    return value


def cached_answers(label: str, dry_run: bool = False) -> CachedAnswers:
    """The CachedAnswers of a route with this backend label."""
    valid = Verdict(Kind.VALID, "cache", label, "cached")
    invalid = Verdict(Kind.INVALID, "cache", label, "cached")
    tails = [verdict_line("", "", v, dry_run).split("rcpt=<> ", 1)[1] for v in (valid, invalid)]
    return CachedAnswers(valid, invalid, *tails)


def checked_domain(route: Route, domain: str) -> str:
    """What an accept-all check stands for: the recipient's domain for an exact or catch-all
    route; the route's key for one matched by a parent, so a flood of random subdomains costs
    one check, not one each."""
    return domain if route.key in (domain, "*", ".") else route.key.lstrip(".")


def backend_hosts(route: Route, domain: str) -> tuple[HostSpec, ...]:
    """The route's hosts, with an empty host (a nexthop of "the recipient's domain") filled in."""
    if all(spec.host for spec in route.hosts):
        return route.hosts
    return tuple(spec if spec.host else replace(spec, host=domain) for spec in route.hosts)


class Verifier:
    """Decides about one recipient; shared by every MTA connection (thread-safe)."""

    def __init__(self, config: Config, router: Router, cache: VerdictCache,
                 resolver: Optional[Resolver] = None,
                 clock: Callable[[], float] = time.monotonic,
                 pool: Optional[SessionPool] = None, stats: Optional[Stats] = None,
                 shared: Optional[SharedCache] = None, secret: Optional[bytes] = None,
                 tls_contexts: Optional[TLSContexts] = None) -> None:
        self.cache, self.clock, self.shared = cache, clock, shared
        self.stats = stats or Stats()
        self.tls_contexts = tls_contexts or tls_contexts_for(config)   # BackTLS: read once
        self.catchall = AcceptAllCheck(secret or secrets.token_bytes(32), config.catchall_check)
        self.refresher = Refresher(self.refresh)
        self.pool = pool or SessionPool(config.idle_timeout, config.max_probes)
        self.backoff = Backoff(config.backoff, config.backoff_failures, clock)
        self.gate = ProbeGate(config.max_probes)
        self._hit_valid = self.stats.counter("valid", "cache")
        self._hit_invalid = self.stats.counter("invalid", "cache")
        self.reconfigure(config, router, resolver)

    def reconfigure(self, config: Config, router: Router,
                    resolver: Optional[Resolver] = None) -> None:
        """Take a new config and routing (a reload) while MTA threads keep asking.

        Cached verdicts, pooled sessions, backoff state and statistics carry over (the cache's
        TTLs are the reloader's business: a test may give a cache its own). The memos are
        replaced after the router: a thread still holding an old memo only fills that one.
        """
        self.config, self.router = config, router
        self.resolver = resolver or Resolver(config.dns_server, config.prefer_ip_version,
                                             lifetime=min(3.0, config.verify_timeout))
        self.settings = SessionSettings(config.helo_name, config.probe_sender, config.ehlo,
                                        config.timeout_connect, config.timeout_reply, config.tls,
                                        self.tls_contexts)
        self.prober = Prober(self.settings, self.pool, self.resolver, self.backoff, self.stats)
        if self.pool.settings != self.settings:
            # New HeloName, BackMailFrom, timeouts...: sessions opened with the old ones go.
            self.pool.settings = self.settings
            self.pool.close()
        self.catchall.interval = config.catchall_check
        self.backoff.seconds, self.backoff.failures = config.backoff, max(1, config.backoff_failures)
        if self.gate.max_probes != config.max_probes:
            self.gate = ProbeGate(config.max_probes)
        self.pool.idle_timeout, self.pool.max_idle = config.idle_timeout, config.max_probes
        self.skip_daemons = frozenset(d.lower() for d in config.skip_daemons)
        self.skip_recipients = frozenset(r.lower() for r in config.skip_recipients)
        self._domains: dict[str, Optional[CachedAnswers]] = {}     # domain -> answers
        self._skip_memo: dict[tuple[Optional[str], Optional[str]], str] = {}

    def skip_client(self, ip: Optional[str], daemon_name: Optional[str]) -> str:
        """Why a connection is not verified ("" if it is): unix socket, loopback, skip list, daemon."""
        key = (ip, daemon_name)
        memo = self._skip_memo
        reason = memo.get(key)
        if reason is None:
            reason = remember(memo, key, self._skip_reason(ip, daemon_name))
        if reason:
            self.stats.count("connection-skipped", reason.split(" ", 1)[0])
        return reason

    def _skip_reason(self, ip: Optional[str], daemon_name: Optional[str]) -> str:
        if ip is None:
            return "not an IP connection"
        try:
            client = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return f"unparsable client address {ip!r}"
        if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
            client = client.ipv4_mapped
        if self.config.skip_loopback and client.is_loopback:
            return "loopback (BackSkipLoopback)"
        for network in self.config.skip_verify:
            if client.version == network.version and client in network:
                return f"BackSkipVerify {network}"
        if daemon_name and daemon_name.lower() in self.skip_daemons:
            return f"BackSkipDaemon {daemon_name}"
        return ""

    def verify(self, raw: str, qid: str = "") -> Verdict:
        """The verdict for one RCPT address, logged as one line."""
        # The hot path: the RCPT text, lower-cased, is a cache key with a fresh verdict. Only
        # addresses in their normal form (parsed, or checked as the cache file loads) are ever
        # cached, so a hit is an everyday address the slow path would look up under that same
        # key. ASCII only: Unicode case folding could turn some other text into a key.
        text = raw[1:-1] if raw[:1] == "<" and raw[-1:] == ">" else raw
        if text.isascii():
            key = text.lower()
            fresh = self.cache.fresh(key)
            if fresh is not None:
                local, _, domain = key.rpartition("@")
                answers = self._domains.get(domain) or self._answers_for(domain)
                if answers is not None and not self.skipped_recipient(local, key):
                    logmod.verdict_bytes((f"qid={qid or '-'} rcpt=<{text}> "
                                          f"{answers.valid_tail if fresh else answers.invalid_tail}"
                                          ).encode())
                    (self._hit_valid if fresh else self._hit_invalid)()
                    if fresh == DUE:
                        self.refresher.due(raw)     # after the answer, in the background
                    return answers.valid if fresh else answers.invalid
        start = time.monotonic()
        verdict = self._decide(raw, start)
        verdict = verdict._replace(ms=int((time.monotonic() - start) * 1000))
        logmod.verdict_later(verdict_line, qid, raw, verdict, self.config.dry_run)
        self._count(verdict)
        return verdict

    def _count(self, verdict: Verdict) -> None:
        """One decision in the statistics: its group, and its source or reason."""
        kind = verdict.kind
        if kind is Kind.VALID or kind is Kind.INVALID:
            self.stats.count(kind.value, verdict.source)
        elif kind is Kind.BAD_SYNTAX:
            self.stats.count("invalid", "syntax")
        elif kind is Kind.SKIPPED:
            self.stats.count("skipped", verdict.reply.split(" (", 1)[0])
        else:
            self.stats.count("unverified", verdict.why or "backend")

    def skipped_recipient(self, local: str, key: str) -> bool:
        """True if BackSkipRecipient names the local part or the (lower-cased) address."""
        skip = self.skip_recipients
        return bool(skip) and (local.lower() in skip or key in skip)

    def _answers_for(self, domain: str) -> Optional[CachedAnswers]:
        """The cached-verdict answers of a domain's route (None: not verified), memoised."""
        memo = self._domains
        answers = memo.get(domain, False)
        if answers is False:
            route = self.route_of(addr.Address("", domain))
            answers = remember(memo, domain, None if route is None else
                               cached_answers(route.label, self.config.dry_run))
        return answers  # type: ignore[return-value]

    def _decide(self, raw: str, start: float) -> Verdict:
        try:
            address = addr.parse(raw)
        except addr.AddressError as exc:
            # Control characters are an attack and <> is nobody, whatever the domain; other
            # syntax faults are judged only for domains scam-back verifies, the rest go on.
            domain = addr.rough_domain(raw)
            hopeless = bool(addr.CONTROL.search(raw)) or not raw.strip(" <>")
            if not hopeless and (not domain or self.router.route(domain) is None):
                return Verdict(Kind.SKIPPED, "rule", reply=f"domain not routed ({exc})")
            return Verdict(Kind.BAD_SYNTAX, "rule", reply=str(exc))
        if self.skipped_recipient(address.local, address.text.lower()):
            return Verdict(Kind.SKIPPED, "rule", reply="BackSkipRecipient")
        route = self.route_of(address)
        if route is None:
            return Verdict(Kind.SKIPPED, "rule", reply="domain not routed")
        if address.is_utf8:
            return Verdict(Kind.SKIPPED, "rule", route.label, "SMTPUTF8 address, not verified")
        hit = self.cache.get(address.text)
        if hit is not None and not hit.stale:
            if hit.valid and hit.expires_in < self.cache.refresh_before:
                self.refresher.due(raw)
            kind = Kind.VALID if hit.valid else Kind.INVALID
            return Verdict(kind, "cache", route.label, "cached")
        self.stats.count("cache", "miss")
        if self.shared is not None:
            shared = self.shared.get(address.text.lower())
            if shared is not None:
                valid, ttl = shared
                if not (valid and self.accepts_all(route, address.domain)):
                    self.cache.put(address.text, valid, ttl)
                return Verdict(Kind.VALID if valid else Kind.INVALID, "shared-cache", route.label,
                               "cached")
        deadline = start + self.config.verify_timeout
        was_valid = hit is not None and hit.valid
        verdict = self._ask_backend(route, address, deadline, was_valid)
        if verdict.kind is Kind.TROUBLE and hit is not None:
            # The backend cannot answer: a verdict past its TTL (within BackStaleGrace) still
            # beats accepting blindly or tempfailing a known user.
            kind = Kind.VALID if hit.valid else Kind.INVALID
            return Verdict(kind, "stale-cache", verdict.backend,
                           f"backend trouble ({verdict.reply[:120]}); stale by {int(-hit.expires_in)} s",
                           why=verdict.why)
        return verdict

    def _ask_backend(self, route: Route, address: addr.Address, deadline: float,
                     was_valid: bool) -> Verdict:
        """Probe through the gate (one probe per address, BackMaxProbes at once), and cache a
        real verdict before anyone waiting on this probe is told."""
        domain, text = address.domain, address.text
        return self.gate.run(text.lower(), deadline,
                             lambda: self._probe(route, domain, text, deadline, was_valid),
                             lambda verdict: self._cache(route, domain, text, deadline, verdict))

    def _probe(self, route: Route, domain: str, address: str, deadline: float,
               was_valid: bool = False) -> Verdict:
        """The backend's verdict, holding a probe slot.

        Starts, when due, a background check whether the backend accepts every address of the
        domain (then no positive is cached). A 5xx for an address that was valid is believed
        only when a second probe says it again: one glitch must not reject a user for an hour.
        """
        hosts = backend_hosts(route, domain)
        checked = checked_domain(route, domain)
        check = self.catchall.due(checked, route.label, domain)
        if check is not None and not self.refresher.submit(
                f"accept-all {checked} {route.label}",
                lambda: self._check_accept_all(hosts, checked, route.label, check)):
            self.catchall.cancel(checked, route.label)      # busy: the next probe tries again
        verdict = self.prober.probe(hosts, address, deadline)
        if verdict.kind is Kind.INVALID and was_valid:
            second = self.prober.probe(hosts, address, deadline)
            self.stats.count("recheck", "confirmed" if second.kind is Kind.INVALID else
                             second.kind.value)
            log.info("rcpt=<%s> was valid; the backend said \"%s\", asked again: %s", address,
                     verdict.reply[:120], second.kind.value)
            verdict = second if second.kind is not Kind.TROUBLE else \
                second._replace(why="5xx not confirmed")
        return verdict

    def _cache(self, route: Route, domain: str, address: str, deadline: float,
               verdict: Verdict) -> Verdict:
        """Cache a probe's real verdict (its slot given back, so an accept-all check can run)."""
        checked = checked_domain(route, domain)
        if verdict.kind is Kind.VALID:
            # A check under way (it runs beside the probe) decides whether a positive from
            # this backend means anything: wait for it rather than cache one that may not.
            self.catchall.settle(checked, route.label, deadline - time.monotonic())
        if verdict.kind is Kind.INVALID or (verdict.kind is Kind.VALID and not
                                            self.accepts_all(route, domain)):
            self.remember_verdict(address, verdict.kind is Kind.VALID)
        return verdict

    def _check_accept_all(self, hosts: tuple[HostSpec, ...], domain: str, label: str,
                          probe: str) -> None:
        """Probe an address that cannot exist (in the background); flag the backend if it is
        accepted, and drop the positives cached for the domain meanwhile."""
        deadline = time.monotonic() + self.config.verify_timeout
        # Under BackMaxProbes like any probe; its failures are not the backend's health record
        # (the probe it runs beside has counted them already).
        verdict = self.gate.run(probe, deadline, lambda: self.prober.probe(
            hosts, probe, deadline, record_health=False))
        self.stats.count("accept-all-checks", verdict.kind.value)
        if self.catchall.found(domain, label, probe, verdict):
            dropped = self.cache.drop_where(invalid=False, domain=domain)
            if dropped:
                log.info("dropped %d cached positives of %s (its backend accepts all)", dropped,
                         domain)
            if self.shared is not None:
                try:        # other daemons' copies too (the domain's invalid ones are re-learnt)
                    self.shared.flush("domain", domain)
                except Exception as exc:  # Redis away: its copies expire with their TTL
                    log.warning("could not flush %s from the shared cache: %s", domain, exc)

    def refresh(self, raw: str) -> bool:
        """Re-probe a valid entry near the end of its TTL (in the background): a valid answer
        renews it; a 5xx is confirmed before it turns invalid; trouble keeps the old entry."""
        try:
            address = addr.parse(raw)
        except addr.AddressError:
            return True
        route = self.route_of(address)
        if route is None:
            return True
        verdict = self._ask_backend(route, address, time.monotonic() + self.config.verify_timeout,
                                    was_valid=True)
        self.stats.count("refresh", verdict.kind.value)
        if verdict.kind is Kind.TROUBLE:
            log.info("refresh of rcpt=<%s> got no verdict (%s); the cached entry is kept, "
                     "asked again in a minute at the earliest", address.text, verdict.reply[:160])
            return False
        return True

    def remember_verdict(self, address: str, valid: bool) -> None:
        """Cache a backend's verdict here and, with BackCache, for every other daemon."""
        self.cache.put(address, valid)
        if self.shared is not None:
            self.shared.put(address.lower(), valid,
                            self.cache.valid_ttl if valid else self.cache.invalid_ttl)

    def route_of(self, address: addr.Address) -> Optional[Route]:
        """The route that verifies an address; None if none does (address literals never)."""
        return None if address.is_literal else self.router.route(address.domain)

    def accepts_all(self, route: Route, domain: str) -> bool:
        """True if the route's backend was found to accept every address of the domain."""
        return self.catchall.accepts_all(checked_domain(route, domain), route.label)

    def probe_live(self, address: addr.Address, route: Optional[Route]) -> Verdict:
        """Ask the route's backend about an address now, past the cache and the probe gate
        (`check --live`); the verdict is not cached here."""
        if route is None:
            return Verdict(Kind.SKIPPED, "rule", reply="domain not routed")
        start = time.monotonic()
        verdict = self.prober.probe(backend_hosts(route, address.domain), address.text,
                                    start + self.config.verify_timeout)
        return verdict._replace(ms=int((time.monotonic() - start) * 1000))
