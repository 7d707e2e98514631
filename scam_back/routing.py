"""Recipient domain -> Route: exact domains, whole-label subdomains, AllDomains, mailertable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import config as configmod
from . import mailertable
from .config import Config, ConfigError, HostSpec


@dataclass(frozen=True)
class Route:
    """Where a domain's recipients are verified: the matched key and the hosts, in order."""

    key: str
    hosts: tuple[HostSpec, ...]
    label: str = ""      # the hosts as log lines show them

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", ",".join(str(h) for h in self.hosts))

    def __str__(self) -> str:
        return self.label


def normalise_domain(domain: str) -> str:
    """Lower-case, without trailing dots, so "Example.NET." and "example.net" are one domain."""
    return domain.rstrip(".").lower()


class Router:
    """Answers "which backend verifies this domain?" in O(number of labels)."""

    def __init__(self, config: Config, table: Optional[list[mailertable.TableRoute]] = None) -> None:
        self.subdomains = config.subdomains
        self.exact: dict[str, Route] = {}
        self.dotted: dict[str, Route] = {}
        self.catchall: Optional[Route] = None
        for entry in table or ():
            if entry.key == ".":
                self.catchall = Route(".", entry.hosts)
            elif entry.subdomains_only:
                self.dotted.setdefault(entry.key[1:], Route(entry.key, entry.hosts))
            else:
                self.exact.setdefault(entry.key, Route(entry.key, entry.hosts))
        # The original checks later BackAddrDomain lines first, so a later line wins.
        for dom in config.domains:
            self.exact[dom.domain] = Route(dom.domain, dom.hosts)
        if config.all_domains:
            self.catchall = Route("*", config.all_domains_hosts)

    def __bool__(self) -> bool:
        return bool(self.exact or self.dotted or self.catchall)

    def summary(self) -> str:
        """What is routed, for the -t and reload log lines."""
        return (f"{len(self.exact) + len(self.dotted)} domains routed"
                + (" and all other domains" if self.catchall else ""))

    def route(self, domain: str) -> Optional[Route]:
        """The route for a domain, the most specific match first; None if it is not verified."""
        domain = normalise_domain(domain)
        if not domain:
            return None
        found = self.exact.get(domain)
        if found:
            return found
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            found = self.dotted.get(parent)
            if found:
                return found
            if self.subdomains:
                found = self.exact.get(parent)
                if found:
                    return found
        return self.catchall


def build(config: Config) -> tuple[Router, list[str]]:
    """The Router for a config, reading the mailertable when asked; warnings returned."""
    table: list[mailertable.TableRoute] = []
    warnings: list[str] = []
    if config.use_mailertable:
        table, warnings = mailertable.load(config.mailertable, config.smtp_port)
    if config.transport_map:
        routes, more = mailertable.load_transport(config.transport_map, config.smtp_port)
        table, warnings = table + routes, warnings + more
    router = Router(config, table)
    if not router:
        tables = " and ".join(p for p in (config.mailertable if config.use_mailertable else "",
                                          config.transport_map or "") if p)
        raise ConfigError(tables, 0, "routes no domain over SMTP, and the config has no "
                          "BackAddrDomain: nothing would be verified")
    return router, warnings


def load(path: str, base_dir: Optional[str] = None) -> tuple[Config, Router, list[str]]:
    """Read a config file and the tables it names: (config, router, warnings); ConfigError if
    either is bad. Used at start-up and for every reload; relative table paths are taken from
    base_dir when given (the start directory of a daemon that has since moved to /)."""
    config = configmod.load(path)
    if base_dir:
        config = configmod.absolute_paths(config, base_dir)
    router, table_warnings = build(config)
    return config, router, list(config.warnings) + table_warnings


def watched_files(config: Config) -> list[str]:
    """The files a reload re-reads: the config, and the mailertable or transport map it uses."""
    files = [config.path]
    if config.use_mailertable:
        files.append(config.mailertable)
    if config.transport_map:
        files.append(config.transport_map)
    return files
