"""A do-nothing pymilter milter: the ceiling for scam-back's design (same pymilter, same libmilter).

It negotiates away what scam-back does not use: connect and MAIL FROM are answered with no reply
(@Milter.noreply); HELO, headers, end of headers, body, DATA and unknown commands keep
Milter.Base's @nocallback defaults; RCPT TO gets CONTINUE; end of message CONTINUE.

    null_milter.py SOCKET [TIMEOUT [BUSY_US]]      e.g. null_milter.py unix:/tmp/x/null.sock

BUSY_US > 0 makes each RCPT hold the GIL that long (a busy wait): a diagnostic for what a
microsecond of Python per decision costs with libmilter's threads (README, Performance).

The unix socket is made world-connectable (umask 0) so that Postfix's smtpd can use it.
Stop it with SIGTERM (libmilter takes up to ~5 s to notice).
"""

from __future__ import annotations

import os
import sys
import time

import Milter


class NullMilter(Milter.Base):
    """Every callback CONTINUE; only RCPT TO and end of message need a reply."""

    def __init__(self) -> None:
        pass

    @Milter.noreply
    def connect(self, hostname, family, hostaddr):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, mailfrom, *params):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def envrcpt(self, to, *params):  # type: ignore[no-untyped-def]
        if BUSY_S:
            until = time.perf_counter() + BUSY_S
            while time.perf_counter() < until:
                pass
        return Milter.CONTINUE


BUSY_S = 0.0


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 64
    socket_spec = argv[1]
    timeout = int(argv[2]) if len(argv) > 2 else 240
    global BUSY_S
    BUSY_S = float(argv[3]) / 1e6 if len(argv) > 3 else 0.0
    os.umask(0)
    Milter.factory = NullMilter
    Milter.set_flags(0)
    Milter.runmilter("null-milter", socket_spec, timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
