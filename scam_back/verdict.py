"""Verdicts and the mapping of a backend's RCPT reply to one: invalid only for "no such mailbox"."""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

ENHANCED_AT_START = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
ENHANCED_QMAIL = re.compile(r"\(#([245])\.(\d{1,3})\.(\d{1,3})\)\s*$")
MAILBOX_UNKNOWN = {"5.1.1", "5.1.3", "5.1.6", "5.1.10"}


class Kind(enum.Enum):
    """What the milter does with a recipient."""

    VALID = "valid"            # backend or cache says it exists: continue
    INVALID = "invalid"        # no such mailbox: 550 5.1.1
    TROUBLE = "unverified"     # backend could not say: accept, or 451 with BackErrorTempfail
    SKIPPED = "skipped"        # never verified (not routed, skip rule): continue
    BAD_SYNTAX = "bad-syntax"  # not safe to send to a backend: 550 5.1.3


class Verdict(NamedTuple):
    """The answer for one recipient, with what the log line needs to explain it."""

    kind: Kind
    source: str = "none"       # cache, backend, rule
    backend: str = "-"
    reply: str = ""            # the backend's reply (first line) or the reason
    ms: int = 0
    why: str = ""              # for TROUBLE: a short reason the statistics count by


def enhanced_code(text: str) -> str:
    """The RFC 3463 code at the start of a reply text, or qmail's "(#5.1.1)" at its end; or ""."""
    first = text.splitlines()[0] if text else ""
    match = ENHANCED_AT_START.match(first) or ENHANCED_QMAIL.search(first)
    return ".".join(match.groups()) if match else ""


def classify(code: int, text: str, probe_sender: str) -> Kind:
    """Map a backend's RCPT reply to VALID, INVALID or TROUBLE.

    INVALID only when the reply really says "no such mailbox": 550/551/553 with 5.1.1, 5.1.3,
    5.1.6 or 5.1.10; or, with no enhanced code at all, 550/553 whose text does not blame the
    probe sender or relaying. Policy refusals, sender refusals, 4xx and garbage are TROUBLE.
    """
    if code in (250, 251, 252):
        return Kind.VALID
    if code not in (550, 551, 553):
        return Kind.TROUBLE
    enhanced = enhanced_code(text)
    if enhanced:
        return Kind.INVALID if enhanced in MAILBOX_UNKNOWN else Kind.TROUBLE
    lowered = text.lower()
    if code == 551 or "sender" in lowered or "relay" in lowered or \
            (probe_sender and probe_sender.lower() in lowered):
        return Kind.TROUBLE
    return Kind.INVALID
