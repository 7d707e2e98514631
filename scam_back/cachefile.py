"""The cache file: the original's line format ("0|1 address [expiry]"), read safely, and the
load and save at start-up, periodically and at exit, each logged and never raising."""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Iterator, Optional

from . import address as addr

if TYPE_CHECKING:
    from .cache import VerdictCache

log = logging.getLogger("scam-back")

MAX_LINE = 1024      # an address is at most 254 octets; longer lines are garbage
_UNSAFE = re.compile(rb"[\x00-\x1f<>]")
# The common line, its address already in the normal form the verifier looks up (as
# address.SIMPLE, with no brackets or trailing dot), the expiry optional as in the original's.
_ATOM, _LABEL = addr.ATOM_CHARS.encode(), addr.LABEL_CHARS.encode()
USUAL_LINE = re.compile(rb"([01]) (" + _ATOM + rb"{1,64}@" + _LABEL + rb"{1,63}(?:\." + _LABEL +
                        rb"{1,63}){0,126})(?: (\d{1,15}))?\s*")


def bounded_lines(handle) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
    """The lines of a binary file, read in 1 MiB blocks; a line longer than MAX_LINE (say a
    file of garbage with no newline) is dropped as it streams by and given as one b"x"."""
    tail, skipping = b"", False
    while True:
        block = handle.read(1 << 20)
        if not block:
            break
        lines = block.replace(b"\r", b"\n").split(b"\n")     # CRLF and bare CR too
        lines[0] = tail + lines[0]
        tail = lines.pop()
        for line in lines:
            if skipping:
                skipping = False
                continue
            yield line if len(line) <= MAX_LINE else b"x"
        if len(tail) > MAX_LINE:
            if not skipping:
                yield b"x"
            tail, skipping = b"", True
    if tail and not skipping:
        yield tail if len(tail) <= MAX_LINE else b"x"


def fsync_dir(directory: str) -> None:
    """Make the rename durable; not every file system allows it, and that is not an error."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def parse_line(raw: bytes) -> Optional[tuple[str, bool, Optional[float]]]:
    """`CODE ADDRESS [EXPIRY]` -> (address in its normal form, valid, expiry or None); None if
    malformed or not an address scam-back could have verified (no domain, an address literal).

    Every cached key must be an address in the form the verifier normalises to: its hot path
    answers an RCPT text that equals a key without parsing it again.
    """
    fields = raw.split()
    if len(fields) not in (2, 3) or fields[0] not in (b"0", b"1"):
        return None
    address = fields[1]
    if len(address) > 254 or b"@" not in address or _UNSAFE.search(address):
        return None
    expiry: Optional[float] = None
    if len(fields) == 3:
        if not fields[2].isdigit():
            return None
        expiry = float(fields[2])
    try:
        parsed = addr.parse(address.decode("utf-8", "surrogateescape"))
    except addr.AddressError:
        return None
    if not parsed.domain or parsed.is_literal or addr.parse(parsed.text).text != parsed.text:
        return None
    return parsed.text, fields[0] == b"0", expiry


def load_file(cache: "VerdictCache", path: Optional[str]) -> None:
    """Load the cache file at start-up, logging what was found; a missing file is normal."""
    if not path:
        return
    try:
        result = cache.load(path)
    except FileNotFoundError:
        log.info("cache file %s does not exist yet; starting empty", path)
        return
    except OSError as exc:
        log.error("cannot read cache file %s: %s; starting empty", path, exc.strerror)
        return
    log.info("cache file %s: %d entries loaded, %d expired skipped, %d malformed lines skipped",
             path, result.loaded, result.expired, result.malformed)
    if result.malformed:
        log.warning("cache file %s had %d malformed lines (expected: 0|1 address [expiry])",
                    path, result.malformed)


def save_file(cache: "VerdictCache", path: Optional[str], serving: bool = False) -> None:
    """Save the cache, logging the outcome; never raises, so shutdown always completes.

    serving: MTA threads are deciding meanwhile (VerdictCache.save gives way to them)."""
    if not path:
        return
    try:
        count = cache.save(path, serving)
    except OSError as exc:
        log.error("cannot save cache file %s: %s (is its directory writable by this user?)",
                  path, exc.strerror)
        return
    log.info("cache file %s saved: %d entries", path, count)
