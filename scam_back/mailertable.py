"""sendmail mailertable and Postfix transport(5) text -> routes; a bad line is skipped with a warning."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .config import ConfigError, HostSpec
from .values import parse_domain, parse_host

SMTP_MAILERS = {"smtp", "esmtp", "smtp8", "dsmtp", "relay", "lmtp"}
POSTFIX_SMTP_TRANSPORTS = {"smtp", "relay", "", "lmtp"}  # "" is ":nexthop", the default transport
LMTP_PORT = 24              # an lmtp: route without a port (LMTP has no standard TCP port)


def _as_lmtp(hosts: tuple[HostSpec, ...]) -> tuple[HostSpec, ...]:
    """An lmtp: route's hosts: spoken to with LHLO, used as named, never looked up by MX (as
    Postfix's lmtp(8) does)."""
    return tuple(replace(h, protocol="lmtp", mx=False) for h in hosts)


@dataclass(frozen=True)
class TableRoute:
    """One usable mailertable line: its key (".example.net" for subdomains) and hosts in order."""

    key: str
    hosts: tuple[HostSpec, ...]
    lineno: int

    @property
    def subdomains_only(self) -> bool:
        """A leading dot means: every subdomain, not the domain itself (sendmail's rule)."""
        return self.key.startswith(".")


def parse_hosts(text: str, default_port: int) -> tuple[HostSpec, ...]:
    """`[a]:[b]:2525`-style host lists as sendmail writes them -> HostSpecs, tried in order.

    A bracketed host is used as is; a bare one means an MX lookup. A port may follow only a
    bracketed host, as `[a]:2525`.
    """
    hosts: list[HostSpec] = []
    pos = 0
    while pos < len(text):
        if text[pos] == "[":
            end = text.find("]", pos)
            if end < 0:
                raise ValueError(f'unclosed "[" in "{text}"')
            host = parse_host(text[pos:end + 1])
            pos = end + 1
            port = default_port
            match = re.match(r":(\d+)(?=:|$)", text[pos:])
            if match:
                port = int(match.group(1))
                if not 1 <= port <= 65535:
                    raise ValueError(f'not a port number: "{match.group(1)}"')
                pos += match.end()
            hosts.append(HostSpec(host, port, mx=False))
        else:
            end = text.find(":", pos)
            end = len(text) if end < 0 else end
            token = text[pos:end]
            if re.fullmatch(r"\d+", token):
                raise ValueError(f'a port ("{token}") may only follow a bracketed host, as [host]:{token}')
            hosts.append(HostSpec(parse_host(token), default_port, mx=True))
            pos = end
        if pos < len(text):
            if text[pos] != ":":
                raise ValueError(f'expected ":" between hosts in "{text}"')
            pos += 1
            if pos == len(text):
                raise ValueError(f'a host list cannot end with ":": "{text}"')
    if not hosts:
        raise ValueError("no host given")
    return tuple(hosts)


def parse_text(text: str, path: str, default_port: int = 25) -> tuple[list[TableRoute], list[str]]:
    """Parse mailertable text; return the SMTP routes and a warning per skipped line."""
    routes: list[TableRoute] = []
    warnings: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 1)
        if len(fields) != 2:
            warnings.append(f"{path}:{lineno}: no mailer:host after the key, line skipped")
            continue
        key, value = fields[0].lower(), fields[1].split("#", 1)[0].strip()
        try:
            if key != ".":
                key = ("." if key.startswith(".") else "") + parse_domain(key.lstrip("."))
        except ValueError as exc:
            warnings.append(f"{path}:{lineno}: {exc}, line skipped")
            continue
        mailer, sep, hosts = value.partition(":")
        mailer = mailer.lower()
        if not sep or mailer not in SMTP_MAILERS:
            warnings.append(f'{path}:{lineno}: {key}: "{value}" is not an SMTP route '
                            f"({', '.join(sorted(SMTP_MAILERS))}), not verified")
            continue
        if "%" in hosts or "$" in hosts:
            warnings.append(f'{path}:{lineno}: {key}: "{hosts}" uses a macro, not verified')
            continue
        try:
            lmtp = mailer == "lmtp"
            parsed = parse_hosts(hosts, LMTP_PORT if lmtp else default_port)
            routes.append(TableRoute(key, _as_lmtp(parsed) if lmtp else parsed, lineno))
        except ValueError as exc:
            warnings.append(f"{path}:{lineno}: {key}: {exc}, line skipped")
    return routes, warnings


def parse_nexthops(text: str, default_port: int) -> tuple[HostSpec, ...]:
    """Postfix nexthops: `[host]:port`, `host:port`, `[host]`, `host`, comma or space separated.

    A bracketed host is used as is; a bare one means an MX lookup. An empty nexthop means the
    recipient's own domain, looked up by MX: HostSpec with host "".
    """
    items = [item for item in re.split(r"[\s,]+", text.strip()) if item]
    if not items:
        return (HostSpec("", default_port, mx=True),)
    hosts: list[HostSpec] = []
    for item in items:
        match = re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]+)(?::(\d+))?", item)
        if not match:
            raise ValueError(f'not a nexthop ([host]:port or host:port): "{item}"')
        port = int(match.group(2)) if match.group(2) else default_port
        if not 1 <= port <= 65535:
            raise ValueError(f'not a port number: "{match.group(2)}"')
        bracketed = match.group(1).startswith("[")
        hosts.append(HostSpec(parse_host(match.group(1)), port, mx=not bracketed))
    return tuple(hosts)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Postfix table lines: a line that starts with white space continues the one before."""
    lines: list[tuple[int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0] in " \t" and lines:
            lines[-1] = (lines[-1][0], lines[-1][1] + " " + raw.strip())
        else:
            lines.append((lineno, raw.strip()))
    return lines


def parse_transport(text: str, path: str, default_port: int = 25) -> tuple[list[TableRoute], list[str]]:
    """Parse Postfix transport(5) text; return the SMTP routes and a warning per skipped line."""
    routes: list[TableRoute] = []
    warnings: list[str] = []
    for lineno, line in _logical_lines(text):
        fields = line.split(None, 1)
        if len(fields) != 2:
            warnings.append(f"{path}:{lineno}: no transport:nexthop after the key, line skipped")
            continue
        key, value = fields[0].lower(), fields[1].strip()
        if key == "*":
            key = "."
        elif "@" in key:
            warnings.append(f"{path}:{lineno}: {key}: per-address routes are not supported, "
                            "not verified")
            continue
        else:
            try:
                key = ("." if key.startswith(".") else "") + parse_domain(key.lstrip("."))
            except ValueError as exc:
                warnings.append(f"{path}:{lineno}: {exc}, line skipped")
                continue
        transport, _, nexthop = value.partition(":")
        transport = transport.lower()
        if transport == "lmtp" and nexthop.startswith("inet:"):
            nexthop = nexthop[5:]
        if transport not in POSTFIX_SMTP_TRANSPORTS or (transport == "lmtp" and
                                                         (not nexthop or nexthop.startswith("unix:"))):
            warnings.append(f'{path}:{lineno}: {key}: "{value}" is not an SMTP route '
                            "(smtp:, relay:, or lmtp: over TCP), not verified")
            continue
        try:
            lmtp = transport == "lmtp"
            parsed = parse_nexthops(nexthop, LMTP_PORT if lmtp else default_port)
            routes.append(TableRoute(key, _as_lmtp(parsed) if lmtp else parsed, lineno))
        except ValueError as exc:
            warnings.append(f"{path}:{lineno}: {key}: {exc}, line skipped")
    return routes, warnings


def _read(path: str, what: str, fix: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(path, 0, f"cannot read the {what}: {exc.strerror} ({fix})") from None


def load(path: str, default_port: int = 25) -> tuple[list[TableRoute], list[str]]:
    """Read a mailertable file; a missing or unreadable file is a ConfigError."""
    text = _read(path, "mailertable", "set Mailertable: to its path, or UseMailertable: no")
    return parse_text(text, path, default_port)


def load_transport(path: str, default_port: int = 25) -> tuple[list[TableRoute], list[str]]:
    """Read a Postfix transport(5) text file; a missing or unreadable file is a ConfigError."""
    text = _read(path, "transport map", "set TransportMap: to the text file postmap reads")
    return parse_transport(text, path, default_port)
