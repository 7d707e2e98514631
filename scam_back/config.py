"""scam.conf -> frozen Config: every key declared once, every error reported as file:line."""

from __future__ import annotations

import difflib
import os
import re
import socket
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from .confcheck import cross_key_warnings
from .values import (parse_bool, parse_cache_url, parse_cpu_affinity, parse_daemon,
                     parse_dns_server, parse_domain, parse_helo_name, parse_host, parse_int,
                     parse_ip_version, parse_listen, parse_log_level, parse_mail_from,
                     parse_network, parse_path, parse_port, parse_protocol, parse_reply_text,
                     parse_seconds, parse_skip_recipient, parse_tls)

DEFAULT_CONFIG_PATH = "/etc/mail/scam.conf"
DEFAULT_MAILERTABLE = "/etc/mail/mailertable"

IPNetwork = "ipaddress.IPv4Network | ipaddress.IPv6Network"


class ConfigError(Exception):
    """A fatal problem in a config file, located by path and line."""

    def __init__(self, path: str, lineno: int, message: str) -> None:
        self.path, self.lineno, self.message = path, lineno, message
        where = f"{path}:{lineno}" if lineno else path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class HostSpec:
    """One backend host as written in the config: name or literal, port, MX lookup or not."""

    host: str
    port: int = 25
    mx: bool = False
    protocol: str = ""          # "lmtp" (an lmtp: route, or BackProtocol: lmtp), else SMTP

    def __str__(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{shown}:{self.port}" if not self.mx else f"MX({self.host}):{self.port}"
        return f"lmtp:{text}" if self.protocol == "lmtp" else text


@dataclass(frozen=True)
class DomainRoute:
    """A configured domain (BackAddrDomain) and the backend hosts that answer for it."""

    domain: str
    hosts: tuple[HostSpec, ...]
    lineno: int = 0


@dataclass(frozen=True)
class Config:
    """Everything scam.conf says, with the original's defaults."""

    path: str = DEFAULT_CONFIG_PATH
    domains: tuple[DomainRoute, ...] = ()
    all_domains_hosts: tuple[HostSpec, ...] = ()
    smtp_port: int = 25
    valid_ttl: int = 86400
    invalid_ttl: int = 3000
    subdomains: bool = False
    backlist: Optional[str] = None
    timeout_connect: float = 1.5
    timeout_reply: float = 3.0
    verify_timeout: float = 10.0
    skip_verify: tuple = ()
    skip_loopback: bool = True
    skip_daemons: tuple[str, ...] = ("MSA",)
    skip_recipients: tuple[str, ...] = ("postmaster",)
    error_tempfail: bool = False
    use_mailertable: bool = False
    mailertable: str = DEFAULT_MAILERTABLE
    transport_map: Optional[str] = None
    prefer_ip_version: int = 0
    backoff: int = 60
    ehlo: bool = True
    bitbucket: bool = False
    all_domains: bool = False
    mail_from: Optional[str] = None
    helo_name: str = "localhost"
    cache_max: int = 1_000_000
    save_interval: int = 300
    reject_text: str = "User unknown"
    log_level: str = "info"
    dns_server: Optional[tuple[str, int]] = None
    backoff_failures: int = 1
    stale_grace: int = 86400
    max_invalid_per_connection: int = 10
    max_probes: int = 20
    invalid_cache_max: int = 100_000
    idle_timeout: float = 30.0
    shared_cache: Optional[str] = None
    cache_password_file: Optional[str] = None
    cache_timeout: float = 0.05
    control_socket: Optional[str] = None
    stats_interval: int = 3600
    stats_listen: Optional[tuple[str, int]] = None
    dry_run: bool = False
    catchall_check: int = 21600
    tls: str = "no"
    tls_ca_file: Optional[str] = None
    protocol: str = "smtp"
    cpu_affinity: str = "auto"
    warnings: tuple[str, ...] = field(default=(), compare=False)
    key_lines: dict = field(default_factory=dict, compare=False, repr=False)

    def where(self, fieldname: str) -> str:
        """"path:line" of the line that set a field (just the path for a default)."""
        line = self.key_lines.get(fieldname)
        return f"{self.path}:{line}" if line else self.path

    @property
    def probe_sender(self) -> str:
        """The MAIL FROM address of probes: BackMailFrom, or postmaster+backscatter@HeloName."""
        if self.mail_from is not None:
            return self.mail_from
        return f"postmaster+backscatter@{self.helo_name}"

    def features(self) -> list[str]:
        """The original's compile-time switches and a few key settings, for -h."""
        yes = {True: "yes", False: "no"}
        return [
            f"UseMailertable: {yes[self.use_mailertable]}",
            f"TransportMap: {self.transport_map or 'none'}",
            f"Ehlo: {yes[self.ehlo]}",
            f"BitBucket: {yes[self.bitbucket]}",
            f"AllDomains: {yes[self.all_domains]}",
            f"BackSMTPBackoff: {self.backoff} s (per backend address)",
            f"BackErrorTempfail: {yes[self.error_tempfail]}",
            "IPv6 skip rules and backends: yes",
            f"BackDryRun: {yes[self.dry_run]}",
            f"BackCache: {self.shared_cache_shown}",
            f"CPUAffinity: {self.cpu_affinity}",
        ]

    @property
    def shared_cache_shown(self) -> str:
        """The BackCache URL without its password, for logs and -h."""
        if not self.shared_cache:
            return "in-process only"
        return re.sub(r"//[^@/]*@", "//***@", self.shared_cache)


# One table: lower-cased key -> (canonical name, parser, Config field or None, repeatable).
# Keys whose field is None are handled by the loader because their order matters.
KEYS: dict[str, tuple[str, Callable, Optional[str], bool]] = {k.lower(): (k, p, f, r) for k, p, f, r in [
    ("BackSMTPServer", parse_host, None, True),
    ("BackAddrDomain", parse_domain, None, True),
    ("BackSMTPPort", parse_port, None, True),
    ("BackValidAddrExp", parse_int, "valid_ttl", False),
    ("BackInvalidAddrExp", parse_int, "invalid_ttl", False),
    ("BackAddrSubdomains", parse_bool, "subdomains", False),
    ("BackList", parse_path, "backlist", False),
    ("TimeoutSMTPConnect", parse_seconds, "timeout_connect", False),
    ("TimeoutSMTPReply", parse_seconds, "timeout_reply", False),
    ("BackVerifyTimeout", parse_seconds, "verify_timeout", False),
    ("BackSkipVerify", parse_network, "skip_verify", True),
    ("BackSkipLoopback", parse_bool, "skip_loopback", False),
    ("BackSkipDaemon", parse_daemon, "skip_daemons", True),
    ("BackSkipRecipient", parse_skip_recipient, "skip_recipients", True),
    ("BackErrorTempfail", parse_bool, "error_tempfail", False),
    ("UseMailertable", parse_bool, "use_mailertable", False),
    ("Mailertable", parse_path, "mailertable", False),
    ("TransportMap", parse_path, "transport_map", False),
    ("PreferIPVersion", parse_ip_version, "prefer_ip_version", False),
    ("BackSMTPBackoff", parse_int, "backoff", False),
    ("Ehlo", parse_bool, "ehlo", False),
    ("BitBucket", parse_bool, "bitbucket", False),
    ("AllDomains", parse_bool, "all_domains", False),
    ("BackMailFrom", parse_mail_from, "mail_from", False),
    ("HeloName", parse_helo_name, "helo_name", False),
    ("BackCacheMax", lambda t: parse_int(t, 1), "cache_max", False),
    ("BackListSaveInterval", parse_int, "save_interval", False),
    ("BackRejectText", parse_reply_text, "reject_text", False),
    ("LogLevel", parse_log_level, "log_level", False),
    ("DNSServer", parse_dns_server, "dns_server", False),
    ("BackSMTPBackoffFailures", lambda t: parse_int(t, 1), "backoff_failures", False),
    ("BackStaleGrace", parse_int, "stale_grace", False),
    ("BackMaxInvalidPerConnection", parse_int, "max_invalid_per_connection", False),
    ("BackMaxProbes", lambda t: parse_int(t, 1, 10_000), "max_probes", False),
    ("BackInvalidCacheMax", parse_int, "invalid_cache_max", False),
    ("BackIdleTimeout", parse_seconds, "idle_timeout", False),
    ("BackCache", parse_cache_url, "shared_cache", False),
    ("BackCachePasswordFile", parse_path, "cache_password_file", False),
    ("BackCacheTimeout", parse_seconds, "cache_timeout", False),
    ("ControlSocket", parse_path, "control_socket", False),
    ("StatsInterval", parse_int, "stats_interval", False),
    ("StatsListen", parse_listen, "stats_listen", False),
    ("BackDryRun", parse_bool, "dry_run", False),
    ("BackCatchAllCheck", parse_int, "catchall_check", False),
    ("BackTLS", parse_tls, "tls", False),
    ("BackTLSCAFile", parse_path, "tls_ca_file", False),
    ("BackProtocol", parse_protocol, "protocol", False),
    ("CPUAffinity", parse_cpu_affinity, "cpu_affinity", False),
]}


def default_helo_name() -> str:
    """The host's fully qualified name, or its plain name when no FQDN is known."""
    fqdn = socket.getfqdn()
    return fqdn if "." in fqdn else socket.gethostname() or "localhost"


FIRST_WINS = {"mailertable"}      # the original kept its first Mailertable line


def _did_you_mean(key: str) -> str:
    """"; did you mean X?" for a near miss of a known key (a letter or two off), else ""."""
    close = difflib.get_close_matches(key.lower(), KEYS, n=1, cutoff=0.85)
    return f"; did you mean {KEYS[close[0]][0]}?" if close else ""


def _hint(name: str, value: str) -> str:
    """How to mend two common slips the value's error cannot tell apart from others."""
    if re.search(r"\s#", value):
        return " (a # comment must start its own line)"
    if name == "BackSMTPServer" and re.fullmatch(r"[^:\s\[\]]+:\d+", value):
        return " (give the port on a BackSMTPPort line above the BackAddrDomain lines)"
    return ""


def _split_line(path: str, lineno: int, raw: str) -> Optional[tuple[str, str]]:
    """One config line -> (key, value), or None for blank and comment lines."""
    line = raw.strip()
    if not line or line.startswith("#"):
        return None
    if ":" not in line:
        raise ConfigError(path, lineno, f'{line.split()[0][:40]}: expected "Key: value", '
                          f'got "{line[:60]}"')
    key, value = line.split(":", 1)
    key, value = key.strip(), value.strip()
    if not value:
        raise ConfigError(path, lineno, f"{key}: no value given")
    return key, value


class _ServerLines:
    """The original's order rules for BackSMTPServer, BackSMTPPort and BackAddrDomain lines.

    A BackAddrDomain takes the servers and the port above it. Consecutive BackSMTPServer lines
    form one ordered failover list; a BackSMTPServer after a BackAddrDomain starts a new list.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.hosts: list[tuple[str, int]] = []      # (host, line) of the current list
        self.accumulating = False
        self.hosts_used = True
        self.port, self.port_line, self.port_used = 25, 0, True
        self.domains: list[DomainRoute] = []
        self.warnings: list[str] = []

    def _unused_hosts(self, why: str) -> None:
        if self.hosts and not self.hosts_used:
            for host, line in self.hosts:
                self.warnings.append(f"{self.path}:{line}: BackSMTPServer {host} is used by no "
                                     f"BackAddrDomain {why}")

    def server(self, host: str, lineno: int) -> None:
        if not self.accumulating:
            self._unused_hosts(f"(line {lineno} starts a new server list)")
            self.hosts = []
        self.hosts.append((host, lineno))
        self.accumulating, self.hosts_used = True, False

    def set_port(self, port: int, lineno: int) -> None:
        if not self.port_used:
            self.warnings.append(f"{self.path}:{self.port_line}: BackSMTPPort {self.port} is used by "
                                 f"no BackAddrDomain (line {lineno} replaces it)")
        self.port, self.port_line, self.port_used = port, lineno, False

    def domain(self, domain: str, lineno: int) -> None:
        if not self.hosts:
            raise ConfigError(self.path, lineno, "BackAddrDomain: no BackSMTPServer line before it; "
                              "put the server's BackSMTPServer line above this one")
        hosts = tuple(HostSpec(host, self.port) for host, _ in self.hosts)
        self.domains.append(DomainRoute(domain, hosts, lineno))
        self.hosts_used = self.port_used = True
        self.accumulating = False

    def finish(self, all_domains: int, tables: bool) -> tuple[HostSpec, ...]:
        """Warn about lines nothing used; return the AllDomains servers (all_domains: the
        line of an AllDomains: yes, or 0)."""
        if all_domains:
            if not self.hosts:
                raise ConfigError(self.path, all_domains, "AllDomains: yes needs a BackSMTPServer "
                                  "line naming the backend; add one above or below this line")
            return tuple(HostSpec(host, self.port) for host, _ in self.hosts)
        if not tables:
            self._unused_hosts("after it (put BackAddrDomain lines after their server)")
            if not self.port_used:
                self.warnings.append(f"{self.path}:{self.port_line}: BackSMTPPort {self.port} is used "
                                     "by no BackAddrDomain after it (it applies only to "
                                     "BackAddrDomain lines below it)")
        return ()


def parse_text(text: str, path: str = DEFAULT_CONFIG_PATH) -> Config:
    """Parse scam.conf text into a Config; raise ConfigError at the first bad line."""
    values: dict[str, object] = {}
    seen: dict[str, int] = {}
    lists: dict[str, list] = {"skip_verify": [], "skip_daemons": [], "skip_recipients": []}
    servers = _ServerLines(path)
    ordered = {"BackSMTPServer": servers.server, "BackSMTPPort": servers.set_port,
               "BackAddrDomain": servers.domain}

    lineno = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        parsed = _split_line(path, lineno, raw)
        if parsed is None:
            continue
        key, value = parsed
        entry = KEYS.get(key.lower())
        if entry is None:
            raise ConfigError(path, lineno, f"{key}: unknown key{_did_you_mean(key)} "
                                  "(see scam.conf(5) for the keys)")
        name, parser, fieldname, repeatable = entry
        try:
            parsed_value = parser(value)
        except ValueError as exc:
            raise ConfigError(path, lineno, f"{name}: {exc}{_hint(name, value)}") from None
        if name in ordered:
            ordered[name](parsed_value, lineno)
        elif repeatable:
            lists[fieldname].append(parsed_value)
        else:
            if fieldname in seen:
                first_wins = fieldname in FIRST_WINS
                servers.warnings.append(f"{path}:{lineno}: {name} repeats line {seen[fieldname]}; "
                                        + ("the first value is used, as in the original"
                                           if first_wins else "this later value is used"))
                if first_wins:
                    continue
            seen[fieldname] = lineno
            values[fieldname] = parsed_value

    all_domains = seen["all_domains"] if values.get("all_domains") else 0
    tables = bool(values.get("use_mailertable", False)) or "transport_map" in values
    all_domains_hosts = servers.finish(all_domains, tables)
    if not servers.domains and not all_domains and not tables:
        raise ConfigError(path, max(1, lineno), "no domain is routed by the end of the file: add "
                          "BackSMTPServer and BackAddrDomain lines, or AllDomains: yes, or "
                          "UseMailertable: yes, or TransportMap: /path")
    for fieldname, items in lists.items():
        if items:
            values[fieldname] = tuple(items)
    warnings = servers.warnings + cross_key_warnings(path, values, seen, Config.verify_timeout)
    if "helo_name" not in values:
        values["helo_name"] = default_helo_name()
        if "." not in str(values["helo_name"]):
            warnings.append(f"{path}: HeloName: this host's name {values['helo_name']!r} is not fully "
                            "qualified; backends that check the probe sender may refuse it "
                            "(set HeloName: to this host's public name)")
    domains = tuple(servers.domains)
    if values.get("protocol") == "lmtp":       # BackProtocol is for BackSMTPServer hosts only
        domains = tuple(replace(d, hosts=_lmtp(d.hosts)) for d in domains)
        all_domains_hosts = _lmtp(all_domains_hosts)
    return Config(path=path, domains=domains, all_domains_hosts=all_domains_hosts,
                  smtp_port=servers.port, warnings=tuple(warnings), key_lines=dict(seen),
                  **values)  # type: ignore[arg-type]


def absolute_paths(config: Config, base_dir: str) -> Config:
    """The config with its file paths taken from base_dir when relative (a daemon that has
    moved to / since it started reads and compares them the same way)."""
    def absolute(path: Optional[str]) -> Optional[str]:
        return os.path.join(base_dir, path) if path else path
    return replace(config, path=absolute(config.path), backlist=absolute(config.backlist),
                   control_socket=absolute(config.control_socket),
                   mailertable=absolute(config.mailertable),
                   transport_map=absolute(config.transport_map),
                   cache_password_file=absolute(config.cache_password_file),
                   tls_ca_file=absolute(config.tls_ca_file))


def _lmtp(hosts: tuple[HostSpec, ...]) -> tuple[HostSpec, ...]:
    return tuple(replace(h, protocol="lmtp") for h in hosts)


def load(path: str = DEFAULT_CONFIG_PATH) -> Config:
    """Read and parse a config file; a missing or unreadable file is a ConfigError too."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ConfigError(path, 0, "no such file; create it or give another with -f") from None
    except OSError as exc:
        raise ConfigError(path, 0, f"cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")      # old files with Latin-1 comments still load
    return parse_text(text, path)
