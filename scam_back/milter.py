"""ScamBackMilter: the thin pymilter callback class; it reads macros, asks the verifier, replies."""

from __future__ import annotations

import functools
import logging
import socket
import time
from typing import Any, Callable, Optional

import Milter

from .verdict import Kind
from .verifier import Verifier

log = logging.getLogger("scam-back")

TEMPFAIL_TEXT = "Recipient verification temporarily unavailable, try again later"
TOO_MANY_TEXT = "Too many unknown recipients, closing connection"
PROBE_PREFIX = "postmaster+backscatter@"      # another scam-back's probes: never verified
SLOWDOWN_STEP = 0.25        # seconds added per unknown recipient past half the limit
SLOWDOWN_MAX = 2.0
SYNTAX_TEXT = "Bad recipient address syntax"
ALL_INVALID_TEXT = "No valid recipients"
# Module names for the kinds read on every RCPT: an Enum class attribute costs 40 ns to look up.
VALID, SKIPPED, INVALID, BAD_SYNTAX = Kind.VALID, Kind.SKIPPED, Kind.INVALID, Kind.BAD_SYNTAX


def _guarded(callback: Callable[..., int]) -> Callable[..., int]:
    """Log an internal error with its traceback and answer it like backend trouble."""
    @functools.wraps(callback)
    def wrapper(self: "ScamBackMilter", *args: Any) -> int:
        try:
            return callback(self, *args)
        except Exception:
            log.exception("internal error in %s; answered like backend trouble", callback.__name__)
            return self.trouble()
    return wrapper


def client_ip(family: Any, hostaddr: Any) -> Optional[str]:
    """The client's IP as text for AF_INET/AF_INET6, else None (unix socket, unknown family)."""
    if family not in (socket.AF_INET, socket.AF_INET6) or not hostaddr:
        return None
    return hostaddr[0] if isinstance(hostaddr, tuple) else str(hostaddr)


class ScamBackMilter(Milter.Base):
    """One MTA connection: skip rules at connect, a verdict per RCPT, BitBucket at end of message."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self.config = verifier.config
        self.probe_sender = self.config.probe_sender.lower() or None
        self.dry_run = self.config.dry_run
        self.authenticated = False
        self.probe_transaction = False
        self.invalid: list[str] = []
        self.others = 0
        self.unknown_count = 0          # per MTA connection: dictionary attacks
        self.qid = ""

    def trouble(self) -> int:
        """Backend trouble: accept unverified, or 451 4.4.3 with BackErrorTempfail."""
        if self.config.error_tempfail:
            self.setreply("451", "4.4.3", TEMPFAIL_TEXT)
            return Milter.TEMPFAIL
        return Milter.CONTINUE

    @_guarded
    def connect(self, hostname: str, family: Any, hostaddr: Any) -> int:
        reason = self.verifier.skip_client(client_ip(family, hostaddr),
                                           self.getsymval("{daemon_name}"))
        if reason:
            log.debug("connection from %s [%s] not verified: %s", hostname, hostaddr, reason)
            return Milter.ACCEPT
        return Milter.CONTINUE

    def envfrom_bytes(self, mailfrom: bytes, *params: bytes) -> int:
        """pymilter's entry point: decode only the sender (the ESMTP parameters go unused)."""
        return self.envfrom(mailfrom.decode("utf-8", "surrogateescape"))

    @Milter.noreply
    def envfrom(self, mailfrom: str, *params: str) -> int:
        try:
            self.invalid, self.others, self.qid = [], 0, ""
            self.authenticated = bool(self.getsymval("{auth_authen}"))
            # Another verifier's probe (or our own, looped back) is never verified in turn,
            # so two verifiers in front of each other cannot loop.
            sender = mailfrom.strip().strip("<>").lower()
            self.probe_transaction = sender.startswith(PROBE_PREFIX) or \
                sender == self.probe_sender
        except Exception:
            log.exception("internal error in envfrom")
        return Milter.CONTINUE

    def envrcpt_bytes(self, to: bytes, *params: bytes) -> int:
        """pymilter's entry point: the address is {rcpt_addr}; the RCPT argument is decoded only
        when the MTA sent no such macro (the ESMTP parameters go unused)."""
        try:
            return self.recipient(self._ctx.getsymval("{rcpt_addr}") or
                                  to.decode("utf-8", "surrogateescape"))
        except Exception:
            log.exception("internal error in envrcpt; answered like backend trouble")
            return self.trouble()

    @_guarded
    def envrcpt(self, to: str, *params: str) -> int:
        return self.recipient(self.getsymval("{rcpt_addr}") or to)

    def recipient(self, rcpt: str) -> int:
        """The answer to one RCPT TO (the hot path: a cached verdict costs a dict lookup or two)."""
        if self.authenticated or self.probe_transaction:
            self.others += 1
            self.verifier.stats.count("skipped", "authenticated sender" if self.authenticated
                                      else "probe sender")
            return Milter.CONTINUE
        if not self.qid:
            # Postfix may name the queue file only once a first recipient is accepted.
            self.qid = self.getsymval("i") or ""
        verdict = self.verifier.verify(rcpt, self.qid)
        kind = verdict.kind
        if kind is VALID or kind is SKIPPED or self.dry_run:
            # BackDryRun: the verdict was logged and counted; nothing is enforced.
            self.others += 1
            return Milter.CONTINUE
        if kind is INVALID:
            if self.too_many_unknown():
                return Milter.TEMPFAIL
            if self.config.bitbucket:
                if rcpt not in self.invalid:
                    self.invalid.append(rcpt)
                return Milter.CONTINUE
            self.setreply("550", "5.1.1", self.config.reject_text)
            return Milter.REJECT
        if kind is BAD_SYNTAX:
            self.setreply("550", "5.1.3", SYNTAX_TEXT)
            return Milter.REJECT
        result = self.trouble()
        if result == Milter.CONTINUE:
            self.others += 1
        return result

    def too_many_unknown(self) -> bool:
        """Count an unknown recipient; slow a client that sends many, then end its connection."""
        limit = self.config.max_invalid_per_connection
        self.unknown_count += 1
        if not limit:
            return False
        if self.unknown_count > limit:
            log.warning("qid=%s %d unknown recipients on one connection: 421, connection closed "
                        "(BackMaxInvalidPerConnection)", self.getsymval("i") or "-", self.unknown_count)
            self.setreply("421", "4.7.0", TOO_MANY_TEXT)
            return True
        past_half = self.unknown_count - limit // 2
        if past_half > 0:
            time.sleep(min(SLOWDOWN_MAX, SLOWDOWN_STEP * past_half))
        return False

    @_guarded
    def eom(self) -> int:
        invalid, others = self.invalid, self.others
        self.invalid, self.others = [], 0
        if not invalid:
            return Milter.CONTINUE
        if not others:
            log.info("qid=%s BitBucket: every recipient is invalid, message rejected",
                     self.getsymval("i") or "-")
            self.setreply("550", "5.1.1", ALL_INVALID_TEXT)
            return Milter.REJECT
        for rcpt in invalid:
            self.delrcpt(rcpt)
        log.info("qid=%s BitBucket: removed %d invalid recipients", self.getsymval("i") or "-",
                 len(invalid))
        return Milter.CONTINUE

    def abort(self) -> int:
        self.invalid, self.others = [], 0
        return Milter.CONTINUE
