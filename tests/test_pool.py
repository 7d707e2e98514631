"""SessionPool: backend sessions shared across MTA connections, reset between uses, reaped idle."""

from __future__ import annotations

import threading

from scam_back.verdict import Kind

from .conftest import backend_conf, make_config, make_verifier
from .smtpbackend import ScriptedBackend


def test_one_backend_connection_serves_many_verifications(backend):
    verifier = make_verifier(backend_conf(backend))
    for n in range(20):
        verifier.verify(f"user{n}@example.net")
    assert backend.connections == 1
    assert backend.transcript.count("RSET") == 19


def test_idle_sessions_are_closed_after_the_idle_timeout(backend):
    verifier = make_verifier(backend_conf(backend, "BackIdleTimeout: 30\n"))
    now = [100.0]
    verifier.pool.clock = lambda: now[0]
    verifier.verify("good@example.net")
    assert verifier.pool.reap() == 0 and verifier.pool.idle_count() == 1
    now[0] += 31
    assert verifier.pool.reap() == 1 and verifier.pool.idle_count() == 0
    assert backend.wait_line("QUIT")


def test_a_dead_pooled_session_is_retried_once_on_a_fresh_one():
    def replies(verb, line, conn):
        if conn == 1 and verb == "RSET":
            return "close"              # the first connection dies between uses
        return b"550 5.1.1 unknown\r\n" if verb == "RCPT" else None
    with ScriptedBackend(replies=replies) as server:
        verifier = make_verifier(f"BackSMTPServer: 127.0.0.1\nBackSMTPPort: {server.port}\n"
                                 "BackAddrDomain: example.net\n")
        assert verifier.verify("a@example.net").kind is Kind.INVALID
        assert verifier.verify("b@example.net").kind is Kind.INVALID
        assert server.connections == 2


def test_concurrent_verifications_never_share_a_session(backend):
    verifier = make_verifier(backend_conf(backend))
    errors = []

    def work(n: int) -> None:
        for k in range(10):
            if verifier.verify(f"u{n}-{k}@example.net").kind is not Kind.INVALID:
                errors.append((n, k))
    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert backend.connections <= 8


def test_idle_timeout_key_is_parsed():
    assert make_config("AllDomains: yes\nBackSMTPServer: 127.0.0.1\nBackIdleTimeout: 5\n"
                       ).idle_timeout == 5.0


def test_a_stalled_pooled_session_fails_over_to_the_next_server(backend):
    """A pooled session that stops answering must not end the verification while time is left."""
    def replies(verb, line, conn):
        return "hang" if verb == "RSET" else (b"250 ok\r\n" if verb == "RCPT" else None)
    with ScriptedBackend(replies=replies) as primary:
        table_text = (f"BackSMTPServer: 127.0.0.1\nBackSMTPPort: {primary.port}\n"
                      "BackAddrDomain: example.net\nTimeoutSMTPReply: 1\nBackVerifyTimeout: 5\n")
        verifier = make_verifier(table_text)
        assert verifier.verify("a@example.net").kind is Kind.VALID
        from scam_back.config import HostSpec
        from scam_back.routing import Route
        verifier.router.exact["example.net"] = Route("example.net", (
            HostSpec("127.0.0.1", primary.port), HostSpec("127.0.0.1", backend.port)))
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert backend.connections == 1


def test_a_backend_that_never_greets_is_backed_off():
    with ScriptedBackend(accept_but_never_banner=True) as server:
        verifier = make_verifier(f"BackSMTPServer: 127.0.0.1\nBackSMTPPort: {server.port}\n"
                                 "BackAddrDomain: example.net\nTimeoutSMTPReply: 0.5\n")
        assert verifier.verify("a@example.net").kind is Kind.TROUBLE
        assert verifier.verify("b@example.net").kind is Kind.TROUBLE
        assert server.connections == 1
