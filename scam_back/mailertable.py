"""sendmail mailertable text -> routes (domain, hosts); a bad line is skipped with a warning."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ConfigError, HostSpec, parse_domain, parse_host

SMTP_MAILERS = {"smtp", "esmtp", "smtp8", "dsmtp", "relay"}


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
            routes.append(TableRoute(key, parse_hosts(hosts, default_port), lineno))
        except ValueError as exc:
            warnings.append(f"{path}:{lineno}: {key}: {exc}, line skipped")
    return routes, warnings


def load(path: str, default_port: int = 25) -> tuple[list[TableRoute], list[str]]:
    """Read a mailertable file; a missing or unreadable file is a ConfigError."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(path, 0, f"cannot read the mailertable: {exc.strerror} "
                          "(set Mailertable: to its path, or UseMailertable: no)") from None
    return parse_text(text, path, default_port)
