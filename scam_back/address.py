"""Parse, normalise and sanitise a recipient address: the one place that decides what is safe."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

MAX_ADDRESS_OCTETS = 254            # RFC 5321 path limit (256) less the angle brackets
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SOURCE_ROUTE = re.compile(r"^@[^:,]+(?:,@[^:,]+)*:")
# The everyday address: unquoted dot-atom local part, plain domain. Parsed without the slow path.
# (cachefile's quick line pattern is built from the same pieces.)
ATOM_CHARS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]"
LABEL_CHARS = r"[A-Za-z0-9-]"
SIMPLE = re.compile(rf"<?({ATOM_CHARS}+)@({LABEL_CHARS}+(?:\.{LABEL_CHARS}+)*)\.?>?")


class AddressError(ValueError):
    """The address cannot be sent to a backend as it is: it is answered 550 5.1.3."""


@dataclass(frozen=True)
class Address:
    """A recipient safe to put in `RCPT TO:<...>`: no control characters, brackets or bare spaces."""

    local: str
    domain: str          # lower-cased, trailing dots removed; "" when there was no @domain
    text: str = ""       # the address as sent to the backend and stored in the cache

    def __post_init__(self) -> None:
        if not self.text:
            object.__setattr__(self, "text", f"{self.local}@{self.domain}" if self.domain
                               else self.local)

    @property
    def is_utf8(self) -> bool:
        """True for SMTPUTF8 addresses, which need that extension at the backend."""
        return not self.text.isascii()

    @property
    def is_literal(self) -> bool:
        """True for address literals such as user@[192.0.2.1], which name no mail domain."""
        return self.domain.startswith("[")


def _split_unquoted(text: str) -> tuple[str, str]:
    """Split at the last @ that is not inside a quoted local part; check quoting on the way."""
    in_quote = escaped = False
    at = -1
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif in_quote and ch == "\\":
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif not in_quote:
            if ch in " \t<>(),;[]" and not (ch in "[]" and at >= 0):
                raise AddressError(f"unquoted {ch!r} in the address")
            if ch == "@":
                at = i
    if in_quote:
        raise AddressError("unbalanced quote in the address")
    if at < 0:
        return text, ""
    return text[:at], text[at + 1:]


def split_simple(raw: str) -> Optional[tuple[str, str]]:
    """(local part, domain as written) of an everyday address, or None: the fast path of parse."""
    simple = SIMPLE.fullmatch(raw)
    if simple is None or len(raw) > MAX_ADDRESS_OCTETS or (raw[0] == "<") != (raw[-1] == ">"):
        return None
    return simple.groups()  # type: ignore[return-value]


def parse(raw: str) -> Address:
    """Turn an RCPT argument or {rcpt_addr} value into an Address, or raise AddressError.

    Angle brackets around the whole are removed, a source route (<@a,@b:u@d>) is dropped as
    RFC 5321 allows, and the domain is lower-cased without trailing dots.
    """
    simple = split_simple(raw)
    if simple is not None:
        local, domain = simple[0], simple[1].lower()
        return Address(local, domain, f"{local}@{domain}")
    if CONTROL.search(raw):
        raise AddressError("control character (CR, LF, NUL, ...) in the address")
    text = raw.strip(" ")
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    routed = SOURCE_ROUTE.sub("", text)
    if routed != text and routed.startswith("@"):
        # "@a:@b:user@d" (routes are joined by commas): what is left is no address, and
        # taking "@b:user" for a local part would give a text that parses differently again.
        raise AddressError("malformed source route")
    text = routed
    if "<" in text or ">" in text:
        raise AddressError("angle bracket inside the address")
    if not text:
        raise AddressError("empty address")
    if len(text.encode("utf-8", "surrogateescape")) > MAX_ADDRESS_OCTETS:
        raise AddressError(f"address longer than {MAX_ADDRESS_OCTETS} octets")
    local, domain = _split_unquoted(text)
    if not local:
        raise AddressError("empty local part")
    if "@" in text and not domain:
        raise AddressError("empty domain after @")
    if domain.startswith("["):
        if not re.fullmatch(r"\[[A-Za-z0-9.:]+\]", domain):
            raise AddressError("malformed address literal")
    elif domain:
        domain = domain.rstrip(".").lower()
        if not domain or ".." in domain or domain.startswith(".") or \
                re.search(r"[\s\"\\@]", domain):
            raise AddressError("malformed domain")
    return Address(local, domain)


def rough_domain(raw: str) -> str:
    """The domain-looking text after the last @ of an unparsable address, for routing it."""
    _, at, rest = raw.rpartition("@")
    match = re.match(r"[A-Za-z0-9.-]+", rest) if at else None
    return match.group(0).rstrip(".").lower() if match else ""
