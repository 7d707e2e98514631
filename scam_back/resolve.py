"""Backend host -> addresses to try, in order: literals as is, names via A/AAAA, bare hosts via MX."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Optional

import dns.exception
import dns.resolver

from .config import HostSpec

log = logging.getLogger("scam-back")


class Resolver:
    """Turns HostSpecs into (ip, port) lists; DNSServer, when set, answers every name lookup."""

    def __init__(self, dns_server: Optional[tuple[str, int]] = None, prefer_ip_version: int = 0,
                 lifetime: float = 3.0) -> None:
        self.prefer = prefer_ip_version
        self.dns_server = dns_server
        self._dns: Optional[dns.resolver.Resolver] = None
        self.lifetime = lifetime

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

    def _query(self, name: str, rdtype: str) -> list[str]:
        try:
            answer = self._resolver().resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.DNSException, OSError) as exc:
            log.warning("DNS %s lookup of %s failed: %s", rdtype, name, exc)
            return []
        return [r.to_text() for r in answer]

    def host_addresses(self, name: str) -> list[str]:
        """All A and AAAA addresses of a name (an IP literal is its own address)."""
        try:
            return [str(ipaddress.ip_address(name))]
        except ValueError:
            pass
        if self.dns_server:
            return self._order(self._query(name, "A") + self._query(name, "AAAA"))
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            log.warning("cannot resolve backend host %s: %s", name, exc)
            return []
        return self._order([info[4][0] for info in infos])

    def mx_hosts(self, domain: str) -> list[str]:
        """MX exchanges in preference order; the domain itself when it has none (RFC 5321)."""
        try:
            answer = self._resolver().resolve(domain, "MX", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [domain]
        except (dns.exception.DNSException, OSError) as exc:
            log.warning("DNS MX lookup of %s failed: %s", domain, exc)
            return []
        records = sorted(answer, key=lambda r: r.preference)
        return [r.exchange.to_text().rstrip(".") for r in records if r.exchange.to_text() != "."]

    def addresses(self, spec: HostSpec) -> list[tuple[str, int]]:
        """Every (ip, port) for one configured host, in the order to try them."""
        names = self.mx_hosts(spec.host) if spec.mx else [spec.host]
        found: list[tuple[str, int]] = []
        for name in names:
            found.extend((ip, spec.port) for ip in self.host_addresses(name))
        return found
