"""Config values: each parser takes a value's text and returns the value or raises ValueError(why).

config.py names the keys; this module knows what each kind of value looks like.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

LOG_LEVELS = ("debug", "info", "notice", "warning", "error")

HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                         r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


def parse_bool(text: str) -> bool:
    """yes/no, true/false, on/off, 1/0, any case."""
    low = text.lower()
    if low in ("yes", "true", "on", "1"):
        return True
    if low in ("no", "false", "off", "0"):
        return False
    raise ValueError(f'not yes or no: "{text}"')


def parse_int(text: str, minimum: int = 0, maximum: int = 2**31) -> int:
    """A whole number within bounds."""
    if not re.fullmatch(r"\d+", text):
        raise ValueError(f'not a whole number: "{text}"')
    value = int(text)
    if not minimum <= value <= maximum:
        raise ValueError(f"{value} is out of range ({minimum} to {maximum})")
    return value


def parse_port(text: str) -> int:
    """A TCP port, 1-65535."""
    if not re.fullmatch(r"\d{1,5}", text) or not 1 <= int(text) <= 65535:
        raise ValueError(f'not a port number: "{text}"')
    return int(text)


def parse_seconds(text: str) -> float:
    """A positive duration in seconds; decimals allowed (1.5)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f'not a number of seconds: "{text}"') from None
    if not 0 < value <= 86400:
        raise ValueError(f"{text} seconds is out of range (more than 0, at most 86400)")
    return value


def parse_host(text: str) -> str:
    """A host name, an IPv4 literal, or an IPv6 literal (bare or in brackets)."""
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if host.lower().startswith("ipv6:"):
        host = host[5:]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if HOSTNAME_RE.match(host) and not re.fullmatch(r"[\d.]+", host):
        return host.rstrip(".").lower()
    raise ValueError(f'not a host name, IPv4 or IPv6 address: "{text}"')


def parse_helo_name(text: str) -> str:
    """The EHLO name: a host name as written (case kept), or an IP as an address literal."""
    host = parse_host(text)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return text.strip("[]").rstrip(".")
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


def parse_domain(text: str) -> str:
    """A mail domain, lower-cased, without trailing dots."""
    domain = text.rstrip(".").lower()
    if not domain or not HOSTNAME_RE.match(domain):
        raise ValueError(f'not a domain name: "{text}"')
    return domain


def parse_network(text: str):
    """An IPv4 or IPv6 address or CIDR; host bits after the mask are ignored. An IPv4-mapped
    one (::ffff:192.0.2.0/120) is its IPv4 network: mapped clients are matched as IPv4."""
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f'not an IPv4 or IPv6 address or CIDR: "{text}"') from None
    mapped = network.network_address.ipv4_mapped if network.version == 6 else None
    if mapped is not None and network.prefixlen >= 96:
        return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return network


def parse_daemon(text: str) -> str:
    """A daemon name as the MTA's {daemon_name} macro carries it."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", text):
        raise ValueError(f'not a daemon name (letters, digits, ".", "_", "-"): "{text}"')
    return text


def parse_mail_from(text: str) -> str:
    """The probe sender: an address, or <> for the null sender."""
    value = text[1:-1] if text.startswith("<") and text.endswith(">") else text
    if value == "":
        return ""
    if re.search(r"[\s<>\x00-\x1f\x7f]", value) or value.count("@") != 1 or \
            value.startswith("@") or value.endswith("@"):
        raise ValueError(f'not an address (local@domain) or <>: "{text}"')
    return value


def parse_skip_recipient(text: str) -> str:
    """A local part (postmaster) or a whole address (abuse@example.net), lower-cased."""
    value = text.strip("<>").lower()
    if not value or re.search(r"[\s<>\x00-\x1f\x7f]", value) or value.startswith("@") \
            or value.endswith("@"):
        raise ValueError(f'not a local part or an address: "{text}"')
    return value


def parse_reply_text(text: str) -> str:
    """A reply text for the MTA: printable ASCII, no '%' (libmilter drops such replies)."""
    if not text or not all(" " <= ch <= "~" for ch in text):
        raise ValueError("must be printable ASCII text")
    if "%" in text:
        raise ValueError("must not contain '%' (libmilter would drop the reply)")
    return text


def parse_log_level(text: str) -> str:
    """One of debug, info, notice, warning, error."""
    if text.lower() not in LOG_LEVELS:
        raise ValueError(f'not a log level ({", ".join(LOG_LEVELS)}): "{text}"')
    return text.lower()


def parse_ip_version(text: str) -> int:
    """4, 6, or 0 for no preference."""
    if text not in ("0", "4", "6"):
        raise ValueError(f'must be 4, 6 or 0: "{text}"')
    return int(text)


def parse_dns_server(text: str) -> tuple[str, int]:
    """host[:port], [ipv6]:port, or a bare IPv6 address; port defaults to 53."""
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if match:
        host, port = match.group(1), match.group(2) or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, "53"
    return _address_and_port(host, port, f'not an IP address (with an optional :port): "{text}"')


def _address_and_port(host: str, port: str, why: str) -> tuple[str, int]:
    """An IP address in its usual form and a port; ValueError(why) if host is no address."""
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(why) from None
    return address, parse_port(port)


def parse_cache_url(text: str) -> str:
    """A Redis URL: redis://[:password@]host[:port][/db] or rediss:// for TLS."""
    shown = re.sub(r"//[^@/]*@", "//***@", text)        # never a password in a log line
    why = f'not a Redis URL (redis://host:port/db or rediss://host:port/db): "{shown}"'
    try:
        parts = urllib.parse.urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError(why + " (a password with [ ] # ? or / belongs in "
                         "BackCachePasswordFile)") from None
    if parts.scheme not in ("redis", "rediss") or not host or not HOSTNAME_RE.match(host) and \
            not _is_ip(host):
        raise ValueError(why)
    if parts.query or parts.fragment or not re.fullmatch(r"/?(\d{1,5})?", parts.path):
        raise ValueError(why + " (a password with [ ] # ? or / belongs in BackCachePasswordFile)")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(why)
    return text


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_listen(text: str) -> tuple[str, int]:
    """An IP address and port to listen on: 127.0.0.1:9108 or [::1]:9108."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise ValueError(f'not ADDRESS:PORT (127.0.0.1:9108, [::1]:9108): "{text}"')
    host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3),
                                                                             match.group(4))
    return _address_and_port(host, port, f'not an IP address: "{host}" (use 127.0.0.1 or ::1)')


def parse_tls(text: str) -> str:
    """STARTTLS to backends: no, may (when offered) or verify (required, certificate checked)."""
    if text.lower() not in ("no", "may", "verify"):
        raise ValueError(f'must be no, may or verify: "{text}"')
    return text.lower()


def parse_protocol(text: str) -> str:
    """The backends' protocol: smtp (EHLO) or lmtp (LHLO)."""
    if text.lower() not in ("smtp", "lmtp"):
        raise ValueError(f'must be smtp or lmtp: "{text}"')
    return text.lower()


def parse_cpu_affinity(text: str) -> str:
    """auto (one CPU, the last one allowed), all (leave it to the kernel), or a CPU number."""
    low = text.lower()
    if low in ("auto", "all"):
        return low
    if re.fullmatch(r"\d{1,4}", text):
        return str(int(text))           # 007 is CPU 7
    raise ValueError(f'must be auto, all or a CPU number: "{text}"')


def parse_path(text: str) -> str:
    """A file path."""
    if "\x00" in text:
        raise ValueError("a path cannot contain NUL")
    return text


