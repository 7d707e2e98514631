"""Backend host -> addresses to try, in order: literals as is, names via A/AAAA, bare hosts via MX."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Optional

import dns.exception
import dns.resolver

from .config import HostSpec

log = logging.getLogger("scam-back")

SYSTEM_CACHE_SECONDS = 60       # getaddrinfo has no TTLs and no timeout: ask it once a minute


class Resolver:
    """Turns HostSpecs into (ip, port) lists; DNSServer, when set, answers every name lookup."""

    def __init__(self, dns_server: Optional[tuple[str, int]] = None, prefer_ip_version: int = 0,
                 lifetime: float = 3.0) -> None:
        self.prefer = prefer_ip_version
        self.dns_server = dns_server
        self._dns: Optional[dns.resolver.Resolver] = None
        self.lifetime = lifetime
        self._system_cache: dict[str, tuple[float, list[str]]] = {}
        self._lock = threading.Lock()

    def _resolver(self) -> dns.resolver.Resolver:
        if self._dns is None:
            if self.dns_server:
                res = dns.resolver.Resolver(configure=False)
                res.nameservers = [self.dns_server[0]]
                res.port = self.dns_server[1]
            else:
                res = dns.resolver.Resolver()
            res.lifetime = self.lifetime
            res.cache = dns.resolver.Cache()
            self._dns = res
        return self._dns

    def _order(self, addresses: list[str]) -> list[str]:
        """Drop duplicates; put the PreferIPVersion family first, keep the rest as fallback."""
        unique = list(dict.fromkeys(addresses))
        if self.prefer in (4, 6):
            unique.sort(key=lambda a: ipaddress.ip_address(a).version != self.prefer)
        return unique

    def _lifetime(self, deadline: Optional[float]) -> float:
        """A query may take the resolver's lifetime, but never past the verification's deadline."""
        if deadline is None:
            return self.lifetime
        return max(0.0, min(self.lifetime, deadline - time.monotonic()))

    def _query(self, name: str, rdtype: str, deadline: Optional[float] = None) -> list[str]:
        lifetime = self._lifetime(deadline)
        if lifetime <= 0:
            return []
        try:
            answer = self._resolver().resolve(name, rdtype, search=False, lifetime=lifetime)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.DNSException, OSError) as exc:
            log.warning("DNS %s lookup of %s failed: %s", rdtype, name, exc)
            return []
        return [r.to_text() for r in answer]

    def host_addresses(self, name: str, deadline: Optional[float] = None) -> list[str]:
        """All A and AAAA addresses of a name (an IP literal is its own address)."""
        try:
            return [str(ipaddress.ip_address(name))]
        except ValueError:
            pass
        if self.dns_server:
            found = self._query(name, "A", deadline)
            return self._order(found + self._query(name, "AAAA", deadline))
        return self._system_lookup(name)

    def _system_lookup(self, name: str) -> list[str]:
        """getaddrinfo (hosts file, then DNS), remembered for a minute, failures included."""
        now = time.monotonic()
        with self._lock:
            cached = self._system_cache.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            found = self._order([info[4][0] for info in infos])
        except (socket.gaierror, UnicodeError) as exc:
            log.warning("cannot resolve backend host %s: %s", name, exc)
            found = []
        with self._lock:
            self._system_cache[name] = (now + SYSTEM_CACHE_SECONDS, found)
        return found

    def mx_hosts(self, domain: str, deadline: Optional[float] = None) -> list[str]:
        """MX exchanges in preference order; the domain itself when it has none (RFC 5321)."""
        lifetime = self._lifetime(deadline)
        if lifetime <= 0:
            return []
        try:
            answer = self._resolver().resolve(domain, "MX", search=False, lifetime=lifetime)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [domain]
        except (dns.exception.DNSException, OSError) as exc:
            log.warning("DNS MX lookup of %s failed: %s", domain, exc)
            return []
        records = sorted(answer, key=lambda r: r.preference)
        return [r.exchange.to_text().rstrip(".") for r in records if r.exchange.to_text() != "."]

    def addresses(self, spec: HostSpec, deadline: Optional[float] = None) -> list[tuple[str, int]]:
        """Every (ip, port) for one configured host, in the order to try them."""
        names = self.mx_hosts(spec.host, deadline) if spec.mx else [spec.host]
        found: list[tuple[str, int]] = []
        for name in names:
            found.extend((ip, spec.port) for ip in self.host_addresses(name, deadline))
        return found
