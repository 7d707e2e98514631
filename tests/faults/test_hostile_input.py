"""Hostile recipients through the real daemon (issue 4, README "What the MTA is told").

Unsafe addresses for a routed domain get `550 5.1.3` and never reach the backend: its transcript
proves that no command was smuggled in. Quoted local parts, `+` tags, UTF-8, source routes and
`<>` get the outcome README documents, and none of them crashes the daemon.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

import pytest

from ..conftest import make_verifier
from ..smtpbackend import Backend
from .conftest import HELO, PROBE_SENDER, Mta, ask, conf, is_invalid, is_syntax, show

from scam_back.verdict import Kind

MARK = "INJECT"
SMUGGLED = f"RCPT TO:<{MARK}@example.net>"
FOLLOW_UP = "follow-up@example.net"
ALLOWED = re.compile(rf"(EHLO|HELO) {re.escape(HELO)}|MAIL FROM:<{re.escape(PROBE_SENDER)}>|"
                     r"RCPT TO:<[^<>\s]+>|RCPT TO:<\"john doe\"@example\.net>|RSET|QUIT|NOOP")

# (id, {rcpt_addr} value, RCPT argument or None for "<value>")
UNSAFE = [
    ("cr", f"a@example.net\r{SMUGGLED}", None),
    ("lf", f"a@example.net\n{SMUGGLED}", None),
    ("crlf", f"a@example.net\r\n{SMUGGLED}\r\nRSET", None),
    ("crlf-in-argument-only", "", f"<a@example.net>\r\n{SMUGGLED}"),
    ("lt", f"{MARK}<x@example.net", None),
    ("gt", f"{MARK}>x@example.net", None),
    ("brackets-around-a-second-address", f"a@example.net> <{MARK}@example.net", None),
    ("space-outside-quotes", f"{MARK} x@example.net", None),
    ("tab-outside-quotes", f"{MARK}\tx@example.net", None),
    ("255-octets", f"{MARK}" + "a" * 237 + "@example.net", None),
    ("1000-octets", f"{MARK}" + "a" * 982 + "@example.net", None),
]


class Env:
    def __init__(self, module_daemons) -> None:  # type: ignore[no-untyped-def]
        self.backend = Backend(users={"good@example.net", '"john doe"@example.net'}).start()
        self.daemon = module_daemons(conf({"example.net": self.backend.port}))


@pytest.fixture(scope="module")
def env(module_daemons) -> Iterator[Env]:  # type: ignore[no-untyped-def]
    servers = Env(module_daemons)
    try:
        yield servers
    finally:
        module_daemons.discard()
        servers.backend.stop()


def new_lines(env: Env, start: int) -> list[str]:
    return list(env.backend.transcript)[start:]


@pytest.mark.parametrize("rcpt_addr,argument", [c[1:] for c in UNSAFE], ids=[c[0] for c in UNSAFE])
def test_unsafe_recipient_gets_550_5_1_3_and_nothing_reaches_the_backend(
        env: Env, rcpt_addr: str, argument: Optional[str]) -> None:
    start = len(env.backend.transcript)
    with Mta(env.daemon) as mta:
        reply = mta.rcpt(rcpt_addr, argument if argument is not None else f"<{rcpt_addr}>")
        assert is_syntax(reply), show(reply)
        follow = mta.rcpt(FOLLOW_UP)        # the connection still works after it
        assert is_invalid(follow), show(follow)
    lines = new_lines(env, start)
    assert not any(MARK in line for line in lines), lines
    assert all(ALLOWED.fullmatch(line) for line in lines), lines
    rcpts = [line for line in lines if line.startswith("RCPT")]
    assert rcpts in ([], [f"RCPT TO:<{FOLLOW_UP}>"]), rcpts
    assert env.daemon.alive()


def test_nul_in_a_recipient_smuggles_nothing(env: Env) -> None:
    """The milter protocol ends each string at a NUL, so the daemon sees only the part before
    it (here a clean address, verified as such). The NUL itself is checked at the verifier."""
    start = len(env.backend.transcript)
    with Mta(env.daemon) as mta:
        reply = mta.rcpt(f"nul@example.net\x00{SMUGGLED}", f"<nul@example.net\x00{SMUGGLED}>")
    assert is_invalid(reply) or is_syntax(reply), show(reply)
    lines = new_lines(env, start)
    assert not any(MARK in line for line in lines), lines
    assert all(ALLOWED.fullmatch(line) for line in lines), lines
    assert env.daemon.alive()


def test_nul_in_a_recipient_is_bad_syntax_at_the_verifier(env: Env) -> None:
    """Not through the daemon (the protocol cannot carry a NUL): the verifier itself."""
    verifier = make_verifier(conf({"example.net": env.backend.port}))
    start = len(env.backend.transcript)
    verdict = verifier.verify("a\x00b@example.net")
    assert verdict.kind is Kind.BAD_SYNTAX
    assert new_lines(env, start) == []


def test_quoted_local_part_is_verified_as_given(env: Env) -> None:
    start = len(env.backend.transcript)
    known, unknown = ask(env.daemon, '"john doe"@example.net', '"jane doe"@example.net')
    assert known.action == "continue", show(known)
    assert is_invalid(unknown), show(unknown)
    lines = new_lines(env, start)
    assert 'RCPT TO:<"john doe"@example.net>' in lines
    assert 'RCPT TO:<"jane doe"@example.net>' in lines


def test_plus_tag_is_verified_as_given(env: Env) -> None:
    start = len(env.backend.transcript)
    reply = ask(env.daemon, "good+tag@example.net")[0]
    assert is_invalid(reply), show(reply)          # the backend does not know the tagged form
    assert "RCPT TO:<good+tag@example.net>" in new_lines(env, start)


def test_utf8_recipient_is_not_verified(env: Env) -> None:
    start = len(env.backend.transcript)
    reply = ask(env.daemon, "üser@example.net")[0]
    assert reply.action == "continue", show(reply)
    assert not any("ser@example.net" in line for line in new_lines(env, start))


def test_source_route_is_dropped_and_the_mailbox_verified(env: Env) -> None:
    start = len(env.backend.transcript)
    with Mta(env.daemon) as mta:
        reply = mta.rcpt("@a.test,@b.test:routed@example.net",
                         "<@a.test,@b.test:routed@example.net>")
    assert is_invalid(reply), show(reply)
    lines = new_lines(env, start)
    assert "RCPT TO:<routed@example.net>" in lines, lines
    assert not any("a.test" in line for line in lines), lines


def test_empty_recipient_gets_550_5_1_3(env: Env) -> None:
    """README: an empty address is unsafe to pass on, like the others: 550 5.1.3."""
    start = len(env.backend.transcript)
    with Mta(env.daemon) as mta:
        reply = mta.rcpt("", "<>")
    assert is_syntax(reply), show(reply)
    assert not any(line.startswith("RCPT") for line in new_lines(env, start))


def test_daemon_survives_all_of_it(env: Env) -> None:
    assert env.daemon.alive()
    good, bad = ask(env.daemon, "good@example.net", "still-bad@example.net")
    assert good.action == "continue" and is_invalid(bad), (show(good), show(bad))
