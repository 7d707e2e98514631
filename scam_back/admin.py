"""Admin: what `scam-back-ctl` asks a running daemon (check, flush, dump, stats, reload), answered
as text lines from the live verifier, cache and statistics."""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Iterator, Optional

import redis

from . import address as addr
from .config import HostSpec
from .routing import Route
from .sharedcache import FLUSH_KINDS, SharedCache
from .stats import report, summary_line
from .verdict import Kind
from .verifier import Verifier, backend_hosts, checked_domain

log = logging.getLogger("scam-back")


class AdminError(Exception):
    """A command that cannot be done, with the reason for the admin."""


class Admin:
    """The commands, each returning (or yielding) the lines of its answer."""

    def __init__(self, verifier: Verifier, shared: Optional[SharedCache] = None,
                 reload: Optional[Callable[[], list[str]]] = None) -> None:
        self.verifier, self.shared = verifier, shared
        self._reload = reload

    def handle(self, request: dict) -> Iterator[str]:
        """Dispatch one request ({"command": ..., and its arguments}); AdminError if it is bad."""
        command = request.get("command")
        if command == "check":
            return iter(self.check(str(request.get("address", "")), bool(request.get("live")),
                                   bool(request.get("update"))))
        if command == "flush":
            return iter(self.flush(str(request.get("what", "")), str(request.get("value", ""))))
        if command == "dump":
            return self.dump()
        if command == "stats":
            return iter(self.stats(bool(request.get("json"))))
        if command == "reload":
            if self._reload is None:
                raise AdminError("this daemon cannot reload")
            return iter(self._reload())
        raise AdminError(f"unknown command {command!r} (check, flush, dump, stats, reload)")

    # ---- check ----

    def check(self, text: str, live: bool = False, update: bool = False) -> list[str]:
        """Route, backends, cached verdicts (local and shared) and, with live, a fresh probe."""
        verifier = self.verifier
        try:
            address = addr.parse(text)
        except addr.AddressError as exc:
            raise AdminError(f"{text!r}: {exc}") from None
        key = address.text.lower()
        lines = [f"address: {address.text}"]
        route = verifier.route_of(address)
        if verifier.skipped_recipient(address.local, key):
            lines.append("rule: BackSkipRecipient names it: never verified, always accepted")
        if route is None:
            lines.append(f"route: none: {address.domain or 'no domain'} is not verified "
                         "(recipients there are accepted)")
        else:
            lines.append(f"route: {route.key} -> {route.label}")
            lines.extend(self._backend_lines(backend_hosts(route, address.domain)))
            lines.append("accept-all: " + verifier.catchall.describe(
                checked_domain(route, address.domain), route.label))
        lines.append("cache: " + self._local_line(key))
        if self.shared is not None:
            lines.append("shared cache: " + self._shared_line(key))
        if verifier.config.dry_run:
            lines.append("mode: BackDryRun: verdicts are logged, never enforced")
        if live:
            lines.extend(self._live(address, route, update))
        return lines

    def _backend_lines(self, hosts: tuple[HostSpec, ...]) -> list[str]:
        verifier = self.verifier
        lines = []
        for spec in hosts:
            try:
                resolved = verifier.resolver.addresses(spec, time.monotonic() + 3)
            except Exception as exc:  # a resolver fault is part of the answer, not a crash
                lines.append(f"backend: {spec}: cannot resolve ({exc})")
                continue
            if not resolved:
                lines.append(f"backend: {spec}: no address found")
            for host, port in resolved:
                lines.append(f"backend: {spec} at {host}:{port}: "
                             f"{verifier.backoff.status((host, port))}, "
                             f"{verifier.pool.idle_at(host, port)} idle sessions")
        return lines

    def _local_line(self, key: str) -> str:
        cache = self.verifier.cache
        hit = cache.peek(key)
        if hit is None:
            return "none"
        ttl = cache.valid_ttl if hit.valid else cache.invalid_ttl
        verdict = "valid" if hit.valid else "invalid"
        if hit.stale:
            return (f"{verdict}, expired {int(-hit.expires_in)} s ago (kept for BackStaleGrace, "
                    "used only while the backend cannot answer)")
        return f"{verdict}, age {max(0, int(ttl - hit.expires_in))} s, expires in {int(hit.expires_in)} s"

    def _shared_line(self, key: str) -> str:
        shared = self.shared
        assert shared is not None
        found = shared.peek(key)
        if not shared.up:
            return f"{shared.url_shown} unavailable"
        if found is None:
            return "none"
        return f"{'valid' if found[0] else 'invalid'}, expires in {int(found[1])} s"

    def _live(self, address: addr.Address, route: Optional[Route], update: bool) -> list[str]:
        verifier = self.verifier
        verdict = verifier.probe_live(address, route)
        lines = [f"live: {verdict.kind.value} from {verdict.backend} in {verdict.ms} ms: "
                 f"{verdict.reply}"]
        if verdict.kind is Kind.VALID and update and route is not None and \
                verifier.accepts_all(route, address.domain):
            lines.append("cache: unchanged: this backend accepts every address of the domain, "
                         "so its positive answers are not cached")
        elif verdict.kind in (Kind.VALID, Kind.INVALID):
            if update:
                verifier.remember_verdict(address.text, verdict.kind is Kind.VALID)
                lines.append("cache: updated with the live verdict")
            else:
                lines.append("cache: unchanged (add --update to store the live verdict)")
        return lines

    # ---- flush ----

    def flush_local(self, what: str, value: str = "") -> int:
        """Drop entries from this daemon's own cache; returns how many."""
        cache = self.verifier.cache
        if what == "address":
            return cache.drop(value)
        if what == "domain":
            return cache.drop_where(domain=value)
        if what == "invalid":
            return cache.drop_where(valid=False)
        if what == "all":
            return cache.drop_where()
        raise AdminError(f"cannot flush {what!r}")

    def flush(self, what: str, value: str = "") -> list[str]:
        """Flush here and, with BackCache, in Redis and in every other daemon's cache."""
        if what not in FLUSH_KINDS:
            raise AdminError(f"flush what? ({', '.join(FLUSH_KINDS)})")
        if what == "address":
            try:
                value = addr.parse(value).text.lower()
            except addr.AddressError as exc:
                raise AdminError(f"{value!r}: {exc}") from None
        elif what == "domain":
            value = value.lstrip("@").rstrip(".").lower()
            if not value or "@" in value:
                raise AdminError("flush @DOMAIN needs a domain")
        count = self.flush_local(what, value)
        shown = f"{what} {value}".strip()
        lines = [f"flushed {shown}: {count} local entries"]
        log.info("admin: flushed %s: %d local entries", shown, count)
        if self.shared is not None:
            try:
                shared, listening = self.shared.flush(what, value)
            except (redis.RedisError, OSError) as exc:
                log.warning("admin: flush %s did not reach the shared cache: %s", shown, exc)
                raise AdminError(f"flushed {count} local entries, but the shared cache "
                                 f"{self.shared.url_shown} is unreachable ({exc}): other daemons "
                                 "keep theirs; flush again when Redis is back") from None
            lines.append(f"flushed {shown}: {shared} shared entries; {listening} daemons listening "
                         "were told (this one included)")
        return lines

    # ---- dump and stats ----

    def dump(self) -> Iterator[str]:
        """The local cache, one entry per line in the cache file's format."""
        return self.verifier.cache.dump_lines()

    def stats(self, as_json: bool = False) -> list[str]:
        snap = self.snapshot()
        if as_json:
            return [json.dumps(snap, sort_keys=True)]
        return report(snap, self.state_lines())

    def snapshot(self) -> dict:
        """The counters plus the live state: cache sizes, backends, shared cache, mode."""
        verifier = self.verifier
        snap = verifier.stats.snapshot()
        valid, invalid = verifier.cache.counts()
        snap["cache_entries"] = {"valid": valid, "invalid": invalid}
        snap["backends"] = verifier.backoff.states()
        snap["shared_cache"] = (None if self.shared is None else
                                {"url": self.shared.url_shown, "up": self.shared.up,
                                 "listening": self.shared.listening})
        snap["dry_run"] = verifier.config.dry_run
        snap["accept_all"] = verifier.catchall.states()
        return snap

    def state_lines(self) -> list[str]:
        snap = self.snapshot()
        lines = [f"cache entries: {snap['cache_entries']['valid']} valid, "
                 f"{snap['cache_entries']['invalid']} invalid"]
        lines.extend(f"backend {name}: {state}" for name, state in snap["backends"].items())
        if snap["shared_cache"] is not None:
            lines.append(f"shared cache {snap['shared_cache']['url']}: "
                         f"{'up' if snap['shared_cache']['up'] else 'DOWN'}, "
                         f"{'listening' if snap['shared_cache']['listening'] else 'NOT listening'}"
                         " for other daemons' flushes")
        lines.extend(f"accept-all {name}: {state}" for name, state in snap["accept_all"].items())
        lines.append(f"dry run: {'yes' if snap['dry_run'] else 'no'}")
        return lines

    def log_summary(self) -> None:
        """The periodic stats line (StatsInterval)."""
        log.info("%s", summary_line(self.verifier.stats.snapshot()))
