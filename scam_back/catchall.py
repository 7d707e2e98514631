"""AcceptAllCheck: notice backends that accept every address of a domain, whose "valid" means
nothing, by probing an address nobody could have: a random local part with an HMAC tag."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from typing import Callable, Optional

from .verdict import Kind, Verdict

log = logging.getLogger("scam-back")

SECRET_NAME = "scam-back.secret"
MAX_STATES = 10_000         # (domain, backend) pairs remembered; the oldest check goes first
NO_ANSWER_RETRY = 60.0      # seconds before a check that got no verdict is made again


def load_secret(cache_path: Optional[str]) -> bytes:
    """The HMAC key kept beside the cache file (mode 0600), made on first start; without a
    cache file, or if the file cannot be used, a key for this run only."""
    if not cache_path:
        return secrets.token_bytes(32)
    path = os.path.join(os.path.dirname(os.path.abspath(cache_path)), SECRET_NAME)
    try:
        with open(path, encoding="ascii") as handle:
            key = bytes.fromhex(handle.read().strip())
        if len(key) >= 16:
            return key
        log.warning("%s is not a key (64 hex digits); making a new one", path)
        os.unlink(path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s); accept-all probes use a key for this run only", path, exc)
        return secrets.token_bytes(32)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key.hex() + "\n")
    except OSError as exc:
        log.warning("cannot create %s (%s); accept-all probes use a key for this run only",
                    path, exc.strerror)
    return key


class _State:
    __slots__ = ("checked", "accepts", "reply", "done")

    def __init__(self, checked: float) -> None:
        self.checked, self.accepts, self.reply = checked, None, ""
        self.done = threading.Event()


class AcceptAllCheck:
    """Per (domain, backend): at first use and then every interval seconds, one probe of an
    address that cannot exist. Never more than one probe per interval, whatever the traffic."""

    def __init__(self, secret: bytes, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.secret, self.interval, self.clock = secret, interval, clock
        self._states: dict[tuple[str, str], _State] = {}
        self._lock = threading.Lock()

    def probe_address(self, domain: str) -> str:
        """A random local part and an HMAC tag of it: unguessable, and recognisably ours."""
        nonce = secrets.token_hex(8)
        tag = hmac.new(self.secret, f"{nonce}@{domain}".encode(), hashlib.sha256).hexdigest()[:12]
        return f"scam-back-check-{nonce}-{tag}@{domain}"

    def is_ours(self, address: str) -> bool:
        """True if an address is one of our check probes (its tag matches)."""
        local, _, domain = address.rpartition("@")
        parts = local.split("-")
        if len(parts) != 5 or local[:16] != "scam-back-check-":
            return False
        expected = hmac.new(self.secret, f"{parts[3]}@{domain.lower()}".encode(),
                            hashlib.sha256).hexdigest()[:12]
        return hmac.compare_digest(expected, parts[4])

    def due(self, domain: str, backend: str, probe_domain: str = "") -> Optional[str]:
        """A probe address (in probe_domain, else domain) if this caller is to check now; the
        check is then marked as begun."""
        if self.interval <= 0:
            return None
        key, now = (domain, backend), self.clock()
        with self._lock:
            state = self._states.pop(key, None)
            # A check that got no verdict (backend down, probes busy) is made again soon.
            wait = self.interval if state is None or state.accepts is not None or \
                not state.done.is_set() else min(self.interval, NO_ANSWER_RETRY)
            if state is not None and now - state.checked < wait:
                self._states[key] = state
                return None
            if len(self._states) >= MAX_STATES:
                del self._states[next(iter(self._states))]
            self._states[key] = _State(now)
        return self.probe_address(probe_domain or domain)

    def cancel(self, domain: str, backend: str) -> None:
        """Forget a check that could not be started, so the next probe tries again."""
        with self._lock:
            state = self._states.get((domain, backend))
            if state is not None and not state.done.is_set():
                del self._states[(domain, backend)]

    def found(self, domain: str, backend: str, address: str, verdict: Verdict) -> bool:
        """Record a check's outcome; True if the backend accepts all (logged once per check)."""
        state = self._states.get((domain, backend))
        accepts = verdict.kind is Kind.VALID
        if state is not None:
            state.accepts = accepts if verdict.kind in (Kind.VALID, Kind.INVALID) else None
            state.reply = verdict.reply
            state.done.set()
        if accepts:
            log.warning("backend %s accepts every address in %s (it said \"%s\" to <%s>, which "
                        "cannot exist): its positive answers mean nothing, so they are not cached "
                        "there; checked again in %d s (BackCatchAllCheck)", backend, domain,
                        verdict.reply[:120], address, self.interval)
        return accepts

    def settle(self, domain: str, backend: str, timeout: float) -> None:
        """Wait (at most timeout seconds) for a check of this pair that is under way."""
        state = self._states.get((domain, backend))
        if state is not None and not state.done.is_set() and timeout > 0:
            state.done.wait(timeout)

    def accepts_all(self, domain: str, backend: str) -> bool:
        if self.interval <= 0:
            return False
        state = self._states.get((domain, backend))
        return state is not None and state.accepts is True

    def describe(self, domain: str, backend: str) -> str:
        """One (domain, backend)'s state in words, for `check`."""
        state = self._states.get((domain, backend))
        if self.interval <= 0:
            return "not checked (BackCatchAllCheck: 0)"
        if state is None:
            return "not checked yet (at the first probe)"
        age = int(self.clock() - state.checked)
        if not state.done.is_set():
            return "being checked"
        verdict = {True: "ACCEPTS ALL addresses: positives not cached",
                   False: "no: rejects unknown addresses",
                   None: f"unknown: the check got no answer ({state.reply[:80]})"}[state.accepts]
        return f"{verdict} (checked {age} s ago)"

    def states(self) -> dict[str, str]:
        """Every (domain, backend) checked, as "domain at backend" -> description."""
        with self._lock:
            keys = sorted(self._states)
        return {f"{domain} at {backend}": self.describe(domain, backend) for domain, backend in keys}
