"""BackendSession: one SMTP dialogue with an inner server (smtplib), every step time-bounded."""

from __future__ import annotations

import io
import logging
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Optional

from .config import Config, ConfigError

log = logging.getLogger("scam-back")

MAX_REPLY_BYTES = 64 * 1024         # a reply larger than this is garbage, not a verdict


class BackendError(Exception):
    """The backend could not give a verdict; `kind` says which step failed."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind, self.detail = kind, detail
        super().__init__(f"{kind}: {detail}")


@dataclass(frozen=True)
class SessionSettings:
    """What every backend dialogue needs from the config."""

    helo_name: str
    mail_from: str
    ehlo: bool = True
    timeout_connect: float = 1.5
    timeout_reply: float = 3.0
    tls: str = "no"                                 # BackTLS: no, may, verify
    tls_contexts: "TLSContexts" = (None, None)      # for named hosts, for hosts found by MX


TLSContexts = tuple[Optional[ssl.SSLContext], Optional[ssl.SSLContext]]


def tls_contexts_for(config: Config) -> TLSContexts:
    """BackTLS's contexts (for named hosts; for hosts found by MX), or a ConfigError naming the
    BackTLSCAFile line it cannot use."""
    try:
        return (tls_context(config.tls, config.tls_ca_file),
                tls_context(config.tls, config.tls_ca_file, check_name=False))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(config.path, config.key_lines.get("tls_ca_file", 0),
                          f"BackTLSCAFile {config.tls_ca_file}: cannot use it: {reason} (give a "
                          "PEM file of CA certificates)") from None


def tls_context(mode: str, ca_file: Optional[str],
                check_name: bool = True) -> Optional[ssl.SSLContext]:
    """The client context for BackTLS: none for no; no checks for may (it only keeps the
    dialogue off the wire); for verify, the chain (BackTLSCAFile or the system's CAs) and,
    unless check_name is off (an MX host, whose name is not known here), the host name.
    OSError or ssl.SSLError if the CA file cannot be used."""
    if mode == "no":
        return None
    if mode == "may":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = check_name
    return context


class _DeadlineReader(io.RawIOBase):
    """Socket reads that end at the reply's deadline and size cap, however slowly bytes trickle.

    smtplib's own timeout applies to each recv, so a backend that drips one byte a second, or
    sends endless "250-" lines, would hold the thread forever without this.
    """

    def __init__(self, smtp: "_SMTP") -> None:
        super().__init__()
        self.smtp = smtp

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> Optional[int]:  # type: ignore[no-untyped-def, override]
        smtp = self.smtp
        assert smtp.sock is not None
        if smtp.polling:            # only what has already arrived; None: nothing has
            if smtp.polling == "buffer":
                return None
            smtp.sock.setblocking(False)
            try:
                count = smtp.sock.recv_into(buffer)
            except (BlockingIOError, ssl.SSLWantReadError):
                return None
            smtp.peer_closed = count == 0
            return count
        left = smtp.reply_deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out: the reply did not end in time")
        if smtp.reply_bytes >= MAX_REPLY_BYTES:
            raise OSError(f"reply longer than {MAX_REPLY_BYTES} bytes")
        smtp.sock.settimeout(left)
        count = smtp.sock.recv_into(buffer)
        smtp.reply_bytes += count
        return count


class _SMTP(smtplib.SMTP):
    """smtplib.SMTP with a connect timeout, and a deadline and size cap on each whole reply."""

    connect_timeout: float = 1.5
    read_timeout: float = 3.0
    reply_deadline: float = 0.0
    reply_bytes: int = 0
    polling: str = ""               # "buffer" or "read" while unasked() looks
    peer_closed: bool = False

    def arm(self, seconds: float) -> None:
        """The next reply must be complete within this many seconds."""
        self.reply_deadline = time.monotonic() + seconds
        self.reply_bytes = 0
        if self.sock is not None:
            self.sock.settimeout(seconds)

    def _get_socket(self, host, port, timeout):  # type: ignore[no-untyped-def]
        sock = socket.create_connection((host, port), self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.arm(self.read_timeout)         # the banner's time starts once connected
        return sock

    def _reader(self) -> io.BufferedReader:
        """The buffered reader over the socket that both replies and unasked() read."""
        if self.file is None:
            self.file = io.BufferedReader(_DeadlineReader(self))
        return self.file

    def getreply(self):  # type: ignore[no-untyped-def]
        if self.sock is not None:
            self._reader()
        return super().getreply()

    def unasked(self, read: bool = False) -> bytes:
        """What the server has sent beyond the replies read so far (b"" if nothing): what is
        buffered, and with read what has arrived too, by one read that does not wait (a system
        call, which gives the GIL away); peer_closed then tells whether it has hung up."""
        if self.sock is None:
            return b""
        reader = self._reader()
        self.polling = "read" if read else "buffer"
        try:
            return reader.peek(1)           # the buffer, or else one read that does not wait
        except OSError:
            self.peer_closed = True
            return b""
        finally:
            self.polling = ""


PoolKey = tuple[str, int, bool, Optional[str]]
TLS_RETRY = 3600.0          # seconds a backend whose handshake failed is spoken to in the clear
_TLS_BROKEN: dict[tuple[str, int], float] = {}   # (host, port) -> until (BackTLS: may only)


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BackendSession:
    """A connection to one backend address: banner, EHLO/HELO, MAIL FROM, RCPTs, RSET, QUIT.

    A session is used by one thread at a time (the pool hands it out). Every command is bounded
    by TimeoutSMTPReply and by the caller's deadline, whichever comes first.
    """

    def __init__(self, host: str, port: int, settings: SessionSettings,
                 lmtp: bool = False, tls_name: Optional[str] = None) -> None:
        self.host, self.port, self.settings = host, port, settings
        self.lmtp = lmtp
        self.tls_name = tls_name            # the name (or literal) a verified certificate carries;
        # None for a host found by MX: its certificate's chain is checked, not its name
        self.encrypted = False
        self.label = ("lmtp:" if self.lmtp else "") + _format(host, port)
        # Sessions are pooled only with their like: a session verified for one TLS name, or
        # speaking LMTP, is no session for another route to the same address.
        self.pool_key: PoolKey = (host, port, self.lmtp, tls_name)
        self._smtp: Optional[_SMTP] = None
        self._in_transaction = False
        self._needs_reset = False

    @property
    def is_open(self) -> bool:
        return self._smtp is not None and self._smtp.sock is not None

    def _remaining(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BackendError("timeout", "BackVerifyTimeout reached")
        return left

    def _command(self, line: str, deadline: float) -> tuple[int, str]:
        """Send one command and read its whole (possibly multi-line) reply."""
        verb = line.split()[0]
        sock = self._smtp.sock if self._smtp is not None else None
        if self._smtp is None or sock is None:
            raise BackendError("closed", f"connection closed before {verb}")
        seconds = min(self.settings.timeout_reply, self._remaining(deadline))
        log.debug("backend %s >>> %s", self.label, line)
        try:
            self._smtp.arm(seconds)
            self._smtp.putcmd(line)
            code, raw = self._smtp.getreply()
        except smtplib.SMTPResponseException as exc:
            self._drop()
            raise BackendError("garbage", f"{exc.smtp_code} {exc.smtp_error!r}") from None
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            self._drop()
            kind = "timeout" if "timed out" in str(exc) else "closed"
            raise BackendError(kind, f"no reply to {verb}: {exc}") from None
        text = raw.decode("utf-8", "replace")
        log.debug("backend %s <<< %s %s", self.label, code, text.replace("\n", " | "))
        if not 200 <= code <= 599:         # smtplib's -1: a line with no reply code
            self._drop()
            raise BackendError("garbage", f"no reply code in {text[:80]!r}, the reply to {verb}")
        # What else came with the reply would be read as the next command's (after STARTTLS's
        # 220, the TLS handshake judges it). The buffer only: a read here would cost a GIL
        # hand-off per command, which under load costs more than the command.
        extra = self._smtp.unasked() if verb != "STARTTLS" else b""
        if extra:
            log.warning("backend %s: more than one reply to %s (then %r); session closed",
                        self.label, verb, extra[:80])
        if extra or code == 421:
            self._drop()
        return code, text

    def open(self, deadline: float) -> None:
        """Connect, read the 220 banner, greet, and STARTTLS as BackTLS says; a refused
        greeting is a BackendError. With BackTLS: may, a backend whose TLS handshake fails is
        spoken to in the clear (at once, and for TLS_RETRY seconds), as Postfix's "may" does."""
        key = (self.host, self.port)
        tls = self.settings.tls != "no" and not (
            self.settings.tls == "may" and _TLS_BROKEN.get(key, 0.0) > time.monotonic())
        try:
            self._open(deadline, tls)
        except BackendError as exc:
            if exc.kind != "tls" or self.settings.tls != "may":
                raise
            _TLS_BROKEN[key] = time.monotonic() + TLS_RETRY
            log.warning("backend %s: %s; BackTLS: may goes on in the clear for %d s", self.label,
                        exc.detail, TLS_RETRY)
            self._open(deadline, False)

    def _open(self, deadline: float, tls: bool) -> None:
        smtp = _SMTP(local_hostname=self.settings.helo_name, timeout=None)
        smtp.command_encoding = "utf-8"
        smtp.connect_timeout = min(self.settings.timeout_connect, self._remaining(deadline))
        smtp.read_timeout = min(self.settings.timeout_reply, self._remaining(deadline))
        try:
            code, raw = smtp.connect(self.host, self.port)
        except smtplib.SMTPResponseException as exc:
            smtp.close()
            raise BackendError("banner", f"bad banner: {exc.smtp_code} {exc.smtp_error!r}") from None
        except smtplib.SMTPServerDisconnected as exc:
            smtp.close()
            raise BackendError("banner", f"no banner: {exc}") from None
        except OSError as exc:
            smtp.close()
            reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
            raise BackendError("connect", f"cannot connect: {reason}") from None
        log.debug("backend %s <<< %s %s", self.label, code, raw.decode("utf-8", "replace"))
        if code != 220:
            smtp.close()
            raise BackendError("banner", f"banner {code} {raw.decode('utf-8', 'replace')[:80]}")
        self._smtp = smtp
        self._in_transaction = self._needs_reset = False
        self.encrypted = False
        code, text = self._greet(deadline)
        if tls:
            self._starttls(text, deadline)

    def _greet(self, deadline: float) -> tuple[int, str]:
        """EHLO (HELO when refused or when Ehlo: no), or LHLO for LMTP; returns the reply."""
        code, text = (0, "")
        if self.lmtp:
            code, text = self._command(f"LHLO {self.settings.helo_name}", deadline)
        else:
            if self.settings.ehlo or self.settings.tls != "no":
                code, text = self._command(f"EHLO {self.settings.helo_name}", deadline)
            if code != 250:
                code, text = self._command(f"HELO {self.settings.helo_name}", deadline)
        if code != 250:
            self.close(deadline)
            raise BackendError("helo", f"greeting refused: {code} {text[:120]}")
        return code, text

    def _starttls(self, greeting: str, deadline: float) -> None:
        """Upgrade with STARTTLS (RFC 3207) when offered; BackTLS: verify insists on it."""
        verify = self.settings.tls == "verify"
        offered = any(line.strip().upper() == "STARTTLS" for line in greeting.splitlines())
        if not offered:
            if verify:
                self.close(deadline)
                raise BackendError("tls", "STARTTLS not offered; BackTLS: verify does not verify "
                                   "in the clear")
            return
        code, text = self._command("STARTTLS", deadline)
        if code != 220:
            if verify:
                self.close(deadline)
                raise BackendError("tls", f"STARTTLS refused: {code} {text[:120]}")
            return          # may: carry on in the clear, the session is still good
        smtp = self._smtp
        named, by_mx = self.settings.tls_contexts
        context = named if self.tls_name else by_mx
        assert smtp is not None and smtp.sock is not None and context is not None
        try:
            smtp.sock.settimeout(min(self.settings.timeout_reply, self._remaining(deadline)))
            smtp.sock = context.wrap_socket(smtp.sock, server_hostname=self.tls_name)
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            self._drop()
            raise BackendError("tls", f"TLS handshake failed: {exc}") from None
        smtp.file = None        # the next reply is read through the encrypted socket
        self.encrypted = True
        self._greet(deadline)       # RFC 3207: forget what was said in the clear

    def _check_idle(self) -> None:
        """Before a pooled session is used again: anything it said while idle (a late second
        reply, a 421 at its idle timeout, its end) means it is out of step or gone."""
        assert self._smtp is not None
        unasked = self._smtp.unasked(read=True)
        if unasked.startswith(b"421") or self._smtp.peer_closed:
            self._drop()
            raise BackendError("closed", f"closed by the backend while idle: {unasked[:80]!r}")
        if unasked:
            self._drop()
            raise BackendError("garbage", f"said {unasked[:80]!r} unasked, while idle")

    def _begin(self, deadline: float) -> None:
        if self._needs_reset:
            self._check_idle()
            code, text = self._command("RSET", deadline)
            if code != 250:
                self.close(deadline)
                raise BackendError("rset", f"RSET refused: {code} {text[:120]}")
            self._needs_reset = self._in_transaction = False
        if not self._in_transaction:
            code, text = self._command(f"MAIL FROM:<{self.settings.mail_from}>", deadline)
            if code != 250:
                self.close(deadline)
                raise BackendError("mail", f"MAIL FROM refused: {code} {text[:120]}")
            self._in_transaction = True

    def rcpt(self, address: str, deadline: float) -> tuple[int, str]:
        """Ask about one recipient; returns the reply code and text."""
        if not self.is_open:
            raise BackendError("closed", "session is not open")
        self._begin(deadline)
        return self._command(f"RCPT TO:<{address}>", deadline)

    def reset(self) -> None:
        """End the current transaction; RSET is sent lazily, before the next MAIL FROM."""
        if self._in_transaction:
            self._needs_reset = True

    def close(self, deadline: Optional[float] = None) -> None:
        """End an open transaction with RSET, send QUIT (briefly bounded), close; never raises."""
        if self.is_open:
            end = deadline if deadline is not None else time.monotonic() + self.settings.timeout_reply
            try:
                if self._in_transaction:
                    self._command("RSET", end)
                self._command("QUIT", end)
            except BackendError:
                pass
        self._drop()

    def _drop(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.close()
            except OSError:
                pass
        self._smtp = None
        self._in_transaction = self._needs_reset = False
