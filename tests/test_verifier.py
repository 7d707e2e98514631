"""The verifier against real and scripted SMTP backends on 127.0.0.1: dialogue, faults, routes."""

from __future__ import annotations

import os
import time

import pytest

from scam_back import routing
from scam_back.cache import VerdictCache
from scam_back.verdict import Kind
from scam_back.verifier import Verifier

from .conftest import backend_conf, make_config, make_verifier
from .dnsserver import DNSServer
from .smtpbackend import Backend, ScriptedBackend, refused_port

PROBE = "MAIL FROM:<postmaster+backscatter@mx.test.example>"


def scripted_conf(server: ScriptedBackend, extra: str = "") -> str:
    return (f"BackSMTPPort: {server.port}\nBackSMTPServer: 127.0.0.1\nBackAddrDomain: example.net\n"
            "TimeoutSMTPConnect: 1\nTimeoutSMTPReply: 1\n" + extra)


def verify(verifier: Verifier, address: str):
    return verifier.verify(address)


def test_dialogue_is_ehlo_mail_rcpt_rset_and_quit(backend):
    verifier = make_verifier(backend_conf(backend))
    assert verify(verifier, "good@example.net").kind is Kind.VALID
    verifier.pool.close()
    assert backend.wait_line("QUIT")
    assert backend.transcript == ["EHLO mx.test.example", PROBE, "RCPT TO:<good@example.net>", "RSET",
                                  "QUIT"]


def test_ehlo_no_sends_helo(backend):
    verifier = make_verifier(backend_conf(backend, "Ehlo: no\n"))
    assert verify(verifier, "good@example.net").kind is Kind.VALID
    assert backend.transcript[0] == "HELO mx.test.example"


def test_refused_ehlo_falls_back_to_helo(backend):
    backend.ehlo_reply = "502 5.5.2 EHLO not supported"
    verifier = make_verifier(backend_conf(backend))
    assert verify(verifier, "good@example.net").kind is Kind.VALID
    assert backend.transcript[:2] == ["EHLO mx.test.example", "HELO mx.test.example"]


def test_backmailfrom_changes_the_probe_sender_and_allows_null(backend):
    verifier = make_verifier(backend_conf(backend, "BackMailFrom: <>\n"))
    assert verify(verifier, "good@example.net").kind is Kind.VALID
    assert "MAIL FROM:<>" in backend.transcript


@pytest.mark.parametrize("attr", ["helo_reply", "mail_reply"])
def test_refused_helo_or_mail_from_is_trouble_never_a_verdict(backend, attr):
    """Weakness 4: the original ignored these refusals and sent RCPT anyway."""
    backend.ehlo_reply = "550 go away"
    setattr(backend, attr, "550 5.7.1 go away")
    cache = VerdictCache(86400, 3000)
    verifier = make_verifier(backend_conf(backend), cache)
    assert verify(verifier, "bad@example.net").kind is Kind.TROUBLE
    assert len(cache) == 0
    assert not any(line.startswith("RCPT") for line in backend.transcript)


def test_sender_refused_at_rcpt_stage_is_not_cached_as_invalid(backend):
    """Postfix delays a sender rejection to RCPT: that says nothing about the recipient."""
    backend.set_rcpt_reply("good@example.net", "550 5.1.0 <postmaster+backscatter@mx.test.example>: "
                           "Sender address rejected: Domain not found")
    cache = VerdictCache(86400, 3000)
    verifier = make_verifier(backend_conf(backend), cache)
    assert verify(verifier, "good@example.net").kind is Kind.TROUBLE
    assert cache.get("good@example.net") is None


@pytest.mark.parametrize("reply", ["450 4.2.0 greylisted", "452 4.5.3 too many recipients",
                                   "550 5.7.1 relay access denied", "554 5.7.1 blocked"])
def test_temporary_and_policy_replies_are_trouble_and_not_cached(backend, reply):
    """Weakness 8: only a real "no such mailbox" is invalid."""
    backend.set_rcpt_reply("x@example.net", reply)
    cache = VerdictCache(86400, 3000)
    verifier = make_verifier(backend_conf(backend), cache)
    assert verify(verifier, "x@example.net").kind is Kind.TROUBLE
    assert len(cache) == 0


def test_verdicts_are_cached_both_ways(backend):
    cache = VerdictCache(86400, 3000)
    verifier = make_verifier(backend_conf(backend), cache)
    verify(verifier, "good@example.net")
    verify(verifier, "bad@example.net")
    assert cache.get("GOOD@example.net").valid is True
    assert cache.get("bad@EXAMPLE.net").valid is False
    backend.clear()
    verdict = verify(verifier, "good@example.net")
    assert verdict.source == "cache" and backend.connections == 0


def test_multiline_banner_and_ehlo_sent_in_pieces_are_read_whole():
    """Weakness 3: a reply split over packets must not shift later replies."""
    banner = [(0.0, b"220-first\r\n"), (0.05, b"220-second\r\n"), (0.05, b"220 last\r\n")]
    ehlo = [(0.0, b"250-one\r\n"), (0.05, b"250-two\r\n"), (0.05, b"250 three\r\n")]
    with ScriptedBackend(banner, {"EHLO": ehlo, "RCPT": b"550 5.1.1 no such user\r\n"}) as server:
        verifier = make_verifier(scripted_conf(server))
        assert verify(verifier, "bad@example.net").kind is Kind.INVALID


def _first_rcpt_then_550(first: object):
    """RCPT replies: `first` for the first RCPT the backend is asked, 550 after."""
    asked = []

    def replies(verb: str, line: str, conn_no: int):
        if verb != "RCPT":
            return None
        asked.append(line)
        return first if len(asked) == 1 else b"550 5.1.1 no such user\r\n"
    return replies


def test_a_second_reply_to_one_rcpt_is_not_read_as_the_answer_to_the_next():
    """Weakness 3, a stray line: a pooled session that is out of step is closed, so the next
    address gets its own answer (it was cached valid on the duplicate 250)."""
    doubled = b"250 2.1.5 ok\r\n250 2.1.5 duplicate\r\n"
    with ScriptedBackend(replies=_first_rcpt_then_550(doubled)) as server:
        verifier = make_verifier(scripted_conf(server))
        assert verify(verifier, "a@example.net").kind is Kind.VALID
        assert verify(verifier, "b@example.net").kind is Kind.INVALID
        assert server.connections == 2


def test_a_late_stray_line_is_found_before_the_pooled_session_is_used_again():
    late = [(0.0, b"250 2.1.5 ok\r\n"), (0.1, b"250 2.1.5 late\r\n")]
    with ScriptedBackend(replies=_first_rcpt_then_550(late)) as server:
        verifier = make_verifier(scripted_conf(server))
        assert verify(verifier, "a@example.net").kind is Kind.VALID
        time.sleep(0.4)
        assert verify(verifier, "b@example.net").kind is Kind.INVALID
        assert verifier.cache.get("b@example.net").valid is False


def test_a_line_with_no_reply_code_is_trouble_and_spoils_no_later_answer():
    garbled = b"250-fine\r\nxyz\r\n250 2.1.5 ok\r\n"
    with ScriptedBackend(replies=_first_rcpt_then_550(garbled)) as server:
        verifier = make_verifier(scripted_conf(server))
        assert verify(verifier, "a@example.net").kind is Kind.TROUBLE
        assert verifier.cache.get("a@example.net") is None
        assert verify(verifier, "b@example.net").kind is Kind.INVALID


@pytest.mark.parametrize("stall", ["EHLO", "MAIL", "RCPT"])
def test_stall_after_any_step_answers_within_the_reply_timeout(stall):
    """Weakness 5: the original waited 2000 s for HELO/MAIL replies."""
    with ScriptedBackend(replies={stall: "hang"}) as server:
        verifier = make_verifier(scripted_conf(server))
        started = time.monotonic()
        verdict = verify(verifier, "x@example.net")
        elapsed = time.monotonic() - started
    assert verdict.kind is Kind.TROUBLE
    assert elapsed < 1 + 1.5


def test_banner_never_sent_is_trouble_within_timeouts():
    with ScriptedBackend(accept_but_never_banner=True) as server:
        verifier = make_verifier(scripted_conf(server))
        started = time.monotonic()
        assert verify(verifier, "x@example.net").kind is Kind.TROUBLE
        assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("banner", [b"421 busy\r\n", b"554 no service\r\n", "close"])
def test_bad_banner_is_trouble(banner):
    with ScriptedBackend(banner) as server:
        verifier = make_verifier(scripted_conf(server))
        assert verify(verifier, "x@example.net").kind is Kind.TROUBLE


@pytest.mark.parametrize("reply", [b"garbage\r\n", b"250" + b"x" * 9000 + b"\r\n", "close"])
def test_garbage_or_closed_rcpt_reply_is_trouble(reply):
    with ScriptedBackend(replies={"RCPT": reply}) as server:
        cache = VerdictCache(86400, 3000)
        verifier = make_verifier(scripted_conf(server), cache)
        assert verify(verifier, "x@example.net").kind is Kind.TROUBLE
        assert len(cache) == 0


def test_verify_timeout_caps_the_whole_verification_across_hosts():
    with ScriptedBackend(replies={"MAIL": "hang"}) as s1, \
            ScriptedBackend(replies={"MAIL": "hang"}) as s2:
        text = ("TimeoutSMTPConnect: 1\nTimeoutSMTPReply: 2\nBackVerifyTimeout: 1.5\n"
                "UseMailertable: no\nAllDomains: yes\nBackSMTPServer: 127.0.0.1\n")
        config = make_config(text)
        router = routing.Router(config)
        router.catchall = routing.Route("*", (
            routing.HostSpec("127.0.0.1", s1.port), routing.HostSpec("127.0.0.1", s2.port)))
        verifier = Verifier(config, router, VerdictCache(86400, 3000))
        started = time.monotonic()
        assert verify(verifier, "x@example.net").kind is Kind.TROUBLE
        assert time.monotonic() - started < 1.5 + 0.5


def test_failed_first_host_fails_over_to_the_next(backend, tmp_path):
    table = tmp_path / "mailertable"
    table.write_text(f"example.net esmtp:[127.0.0.1]:{refused_port()}:[127.0.0.1]:{backend.port}\n")
    config = make_config(f"UseMailertable: yes\nMailertable: {table}\n")
    router, _ = routing.build(config)
    verifier = Verifier(config, router, VerdictCache(86400, 3000))
    assert verify(verifier, "bad@example.net").kind is Kind.INVALID


def test_backoff_is_per_backend_address(backend):
    """Weakness 11: one dead backend must not stop verification at another."""
    dead = refused_port()
    text = (f"BackSMTPServer: 127.0.0.1\nBackSMTPPort: {dead}\nBackAddrDomain: dead.test\n"
            f"BackSMTPPort: {backend.port}\nBackAddrDomain: example.net\nBackSMTPBackoff: 60\n")
    verifier = make_verifier(text)
    assert verify(verifier, "x@dead.test").kind is Kind.TROUBLE
    assert verifier.backoff.blocked(("127.0.0.1", dead))
    assert verify(verifier, "bad@example.net").kind is Kind.INVALID


def test_backoff_skips_a_failed_address_then_tries_it_again(backend):
    text = backend_conf(backend, "BackSMTPBackoff: 60\n")
    now = [1000.0]
    config = make_config(text)
    verifier = Verifier(config, routing.Router(config), VerdictCache(86400, 3000), clock=lambda: now[0])
    key = ("127.0.0.1", backend.port)
    verifier.backoff.failed(key, "test", "simulated")
    assert verify(verifier, "bad@example.net").reply.endswith("in backoff")
    assert backend.connections == 0
    now[0] += 61
    assert verify(verifier, "bad@example.net").kind is Kind.INVALID


def test_crlf_in_address_never_reaches_the_backend(backend):
    """Weakness 6: CR/LF smuggled RSET and MAIL FROM into the original's backend session."""
    verifier = make_verifier(backend_conf(backend))
    verify(verifier, "good@example.net")
    for evil in ("a@example.net\r\nRSET\r\nMAIL FROM:<evil@x>", "a@example.net>x", "a\x00@example.net",
                 "a" * 250 + "@example.net", "a b@example.net"):
        assert verify(verifier, evil).kind is Kind.BAD_SYNTAX
    assert backend.transcript == ["EHLO mx.test.example", PROBE, "RCPT TO:<good@example.net>"]


def test_idle_session_closed_by_backend_is_reopened(backend):
    verifier = make_verifier(backend_conf(backend))
    verify(verifier, "good@example.net")
    session = verifier.pool.take(("127.0.0.1", backend.port, False, "127.0.0.1"))
    session._smtp.sock.close()          # simulate the backend dropping an idle pooled session
    verifier.pool.give(session)
    assert verify(verifier, "bad@example.net").kind is Kind.INVALID


def test_bare_mailertable_host_is_looked_up_by_mx_in_preference_order(backend, tmp_path):
    with DNSServer(mx={"mail.test": [(20, "mx2.mail.test"), (10, "mx1.mail.test")]},
                   a={"mx1.mail.test": ["127.0.0.1"], "mx2.mail.test": ["127.0.0.2"]}) as dns:
        table = tmp_path / "mailertable"
        table.write_text("example.net esmtp:mail.test\n")
        config = make_config(f"UseMailertable: yes\nMailertable: {table}\n"
                             f"BackSMTPPort: {backend.port}\nDNSServer: 127.0.0.1:{dns.port}\n")
        router, _ = routing.build(config)
        verifier = Verifier(config, router, VerdictCache(86400, 3000))
        assert verify(verifier, "bad@example.net").kind is Kind.INVALID
        assert verifier.resolver.addresses(router.route("example.net").hosts[0]) == [
            ("127.0.0.1", backend.port), ("127.0.0.2", backend.port)]
        assert ("mail.test", "MX") in dns.queries


def test_backend_server_name_tries_all_its_addresses(backend):
    with DNSServer(a={"inner.test": ["127.0.0.3", "127.0.0.1"]}) as dns:
        text = (f"BackSMTPServer: inner.test\nBackSMTPPort: {backend.port}\nBackAddrDomain: example.net\n"
                f"DNSServer: 127.0.0.1:{dns.port}\nTimeoutSMTPConnect: 0.5\n")
        verifier = make_verifier(text)
        # 127.0.0.3 has nothing listening on the port: refused, then the next address answers.
        assert verify(verifier, "bad@example.net").kind is Kind.INVALID


def test_ipv6_backend_literal(tmp_path):
    with Backend(users={"good@example.net"}, host="::1") as server:
        verifier = make_verifier(f"BackSMTPServer: ::1\nBackSMTPPort: {server.port}\n"
                                 "BackAddrDomain: example.net\n")
        assert verify(verifier, "good@example.net").kind is Kind.VALID
        assert verify(verifier, "bad@example.net").kind is Kind.INVALID


def test_verdict_log_line_names_recipient_backend_verdict_source_and_ms(backend, caplog):
    verifier = make_verifier(backend_conf(backend))
    with caplog.at_level("INFO", logger="scam-back"):
        verifier.verify("bad@example.net", qid="ABC123")
    line = [r.getMessage() for r in caplog.records if "rcpt=" in r.getMessage()][-1]
    for part in ("qid=ABC123", "rcpt=<bad@example.net>", f"backend=127.0.0.1:{backend.port}",
                 "verdict=invalid", "source=backend", "ms="):
        assert part in line


def test_debug_log_level_logs_every_backend_command_and_reply(backend, caplog):
    verifier = make_verifier(backend_conf(backend))
    with caplog.at_level("DEBUG", logger="scam-back"):
        verify(verifier, "good@example.net")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert ">>> RCPT TO:<good@example.net>" in text and "<<< 250" in text


def test_backend_socket_above_fd_1024_works(backend):
    """Weakness 15: select() overflowed fd_set at descriptors of 1024 and more."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.fail(f"cannot raise the fd limit to 1200 (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers = []
    try:
        import gc
        gc.collect()                    # close stray sockets first: a freed low fd is reused
        while not fillers or fillers[-1] < 1030:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        verifier = make_verifier(backend_conf(backend))
        assert verify(verifier, "bad@example.net").kind is Kind.INVALID
        session = verifier.pool.take(("127.0.0.1", backend.port, False, "127.0.0.1"))
        fileno = session._smtp.sock.fileno()
        session.close()
        # Another thread may have freed a low fd meanwhile; the verdict above is what matters,
        # but the socket must have come from above 1024 unless such a gap opened.
        assert fileno >= 1024 or any(fd < 1024 for fd in range(3, 1024)
                                     if not os.path.exists(f"/proc/self/fd/{fd}"))
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_421_to_ehlo_is_trouble_not_an_internal_error():
    with ScriptedBackend(replies={"EHLO": [(0.0, b"421 shutting down\r\n"), "close"]}) as server:
        verifier = make_verifier(scripted_conf(server))
        verdict = verify(verifier, "x@example.net")
        assert verdict.kind is Kind.TROUBLE and "closed" in verdict.reply


def test_kept_session_spoilt_by_421_on_rset_is_replaced():
    def replies(verb, line, conn):
        if verb == "RSET" and conn == 1:
            return [(0.0, b"421 4.4.2 idle too long\r\n"), "close"]
        if verb == "RCPT":
            return b"550 5.1.1 unknown\r\n"
        return None
    with ScriptedBackend(replies=replies) as server:
        verifier = make_verifier(scripted_conf(server))
        assert verify(verifier, "a@example.net").kind is Kind.INVALID
        assert verify(verifier, "b@example.net").kind is Kind.INVALID
        assert server.connections == 2


@pytest.mark.parametrize("banner", [
    [(0.0, b"220-hello\r\n")] + [(0.2, b"220-more\r\n")] * 40,          # endless continuation
    [(0.0, b"220 ")] + [(0.2, b"x")] * 40,                              # one byte at a time
])
def test_dripping_banner_is_cut_off_at_the_reply_timeout(banner):
    """Weakness 5 again: a per-read timeout alone never ends a reply that trickles in."""
    with ScriptedBackend(banner) as server:
        verifier = make_verifier(scripted_conf(server))
        started = time.monotonic()
        assert verify(verifier, "x@example.net").kind is Kind.TROUBLE
        assert time.monotonic() - started < 1 + 1.0


def test_endless_rcpt_reply_is_cut_off_and_not_cached():
    drip = [(0.0, b"250-ok\r\n")] + [(0.1, b"250-still going\r\n")] * 60
    with ScriptedBackend(replies={"RCPT": drip}) as server:
        cache = VerdictCache(86400, 3000)
        verifier = make_verifier(scripted_conf(server), cache)
        started = time.monotonic()
        assert verify(verifier, "x@example.net").kind is Kind.TROUBLE
        assert time.monotonic() - started < 1 + 1.0
        assert len(cache) == 0


def test_huge_reply_is_garbage_not_a_verdict():
    flood = [(0.0, b"250-" + b"y" * 1000 + b"\r\n")] * 100 + [(0.0, b"250 ok\r\n")]
    with ScriptedBackend(replies={"RCPT": flood}) as server:
        verifier = make_verifier(scripted_conf(server, "TimeoutSMTPReply: 3\n".replace("3", "2")))
        assert verify(verifier, "x@example.net").kind is Kind.TROUBLE


def test_dns_that_never_answers_counts_against_verify_timeout(backend):
    with DNSServer(a={"other.test": ["127.0.0.1"]}, drop={"inner.test"}) as dns:
        text = (f"BackSMTPServer: inner.test\nBackSMTPPort: {backend.port}\nBackAddrDomain: example.net\n"
                f"DNSServer: 127.0.0.1:{dns.port}\nBackVerifyTimeout: 1\n")
        verifier = make_verifier(text)
        started = time.monotonic()
        assert verify(verifier, "x@example.net").kind is Kind.TROUBLE
        assert time.monotonic() - started < 1 + 0.5


def test_lock_is_never_held_while_the_backend_is_asked():
    """Weakness 1: the original scanned its cache under one exclusive lock for every RCPT."""
    held = []

    def replies(verb, line, conn):
        if verb == "RCPT":
            held.append(cache.locked())
        return None
    cache = VerdictCache(86400, 3000)
    with ScriptedBackend(replies=replies) as server:
        verifier = make_verifier(scripted_conf(server), cache)
        verify(verifier, "x@example.net")
    assert held == [False]


@pytest.mark.parametrize("raw", ["a b@elsewhere.test", "x" * 300 + "@elsewhere.test", "user@",
                                 "a>b@elsewhere.test"])
def test_bad_syntax_for_a_domain_not_routed_is_passed_unjudged(backend, raw):
    verifier = make_verifier(backend_conf(backend))
    assert verify(verifier, raw).kind is Kind.SKIPPED
    assert backend.connections == 0


def test_bad_syntax_for_a_routed_domain_or_with_control_characters_is_550_5_1_3(backend):
    verifier = make_verifier(backend_conf(backend))
    assert verify(verifier, "a\r\nRSET@example.net").kind is Kind.BAD_SYNTAX
    assert verify(verifier, "bad@example.net\r\nRSET").kind is Kind.BAD_SYNTAX
    assert verify(verifier, "a b@example.net").kind is Kind.BAD_SYNTAX
    assert verify(verifier, "x@elsewhere.test\r\nRSET").kind is Kind.BAD_SYNTAX
    assert verify(verifier, "<>").kind is Kind.BAD_SYNTAX
    assert backend.connections == 0


def test_a_known_address_with_a_fresh_verdict_is_answered_from_the_cache(backend):
    """The hot path (an address parsed and routed before) gives the same verdicts as the slow one."""
    now = [1000.0]
    cache = VerdictCache(60, 30, clock=lambda: now[0])
    verifier = make_verifier(backend_conf(backend), cache)
    for raw, kind in (("<good@example.net>", Kind.VALID), ("<bad@example.net>", Kind.INVALID)):
        first = verifier.verify(raw, "Q1")
        assert (first.kind, first.source) == (kind, "backend")
        again = verifier.verify(raw, "Q2")
        assert (again.kind, again.source, again.backend) == (kind, "cache", first.backend)
    asked = backend.connections
    cache.put("good@example.net", False)          # a newer verdict is seen at once
    assert verifier.verify("<good@example.net>").kind is Kind.INVALID
    now[0] += 61                                  # past both TTLs: asked again
    assert verifier.verify("<good@example.net>").source == "backend"
    assert verifier.verify("<bad@example.net>").source == "backend"
    assert backend.connections >= asked


def test_cached_decisions_are_logged_with_their_queue_id(backend, caplog):
    verifier = make_verifier(backend_conf(backend))
    with caplog.at_level("INFO", logger="scam-back"):
        verifier.verify("<good@example.net>", "Q1")
        verifier.verify("<good@example.net>", "Q2")
        verifier.verify("<good@example.net>")
    lines = [r.getMessage() for r in caplog.records if "rcpt=<good@example.net>" in r.getMessage()]
    assert lines[1] == ('qid=Q2 rcpt=<good@example.net> backend=127.0.0.1:%d verdict=valid '
                        'source=cache reply="cached" ms=0' % backend.port), lines
    assert lines[2].startswith("qid=- rcpt=<good@example.net>")


def test_skip_rules_still_hold_for_an_address_seen_before(backend):
    verifier = make_verifier(backend_conf(backend, "BackSkipRecipient: abuse\n"))
    for _ in range(2):
        assert verifier.verify("<abuse@example.net>").kind is Kind.SKIPPED
        assert verifier.verify("<x@elsewhere.test>").kind is Kind.SKIPPED
    assert backend.connections == 0


def test_hot_path_matches_case_insensitively_and_keeps_the_text_in_its_log_line(backend, caplog):
    cache = VerdictCache(86400, 3000)
    cache.put("user@example.net", False)
    verifier = make_verifier(backend_conf(backend, "BackSkipRecipient: Abuse@Example.NET\n"), cache)
    with caplog.at_level("INFO", logger="scam-back"):
        verdict = verifier.verify("<User@Example.NET.>", "Q7")
        skipped = verifier.verify("<ABUSE@example.net>", "Q8")
    assert (verdict.kind, verdict.source) == (Kind.INVALID, "cache")
    assert skipped.kind is Kind.SKIPPED and backend.connections == 0
    assert any(r.getMessage().startswith("qid=Q7 rcpt=<User@Example.NET.> ") and
               "verdict=invalid source=cache" in r.getMessage() for r in caplog.records)


def test_the_hot_path_answers_every_text_as_the_slow_path_would(backend):
    """The hot path looks the RCPT text up as a key without parsing it: for every kind of text,
    everyday or odd, its answer is the one the full parse-route-cache path gives."""
    cache = VerdictCache(600, 600)
    for key, valid in (("user@example.net", True), ('"ab"@example.net', False),
                       ("a@b@example.net", True), ("x@elsewhere.test", True),
                       ("usker@example.net", True), ("abuse@example.net", True),
                       ("user@sub.example.net", False)):
        cache.put(key, valid)
    verifier = make_verifier(backend_conf(backend, "BackSkipRecipient: abuse\n"), cache)
    texts = ["<User@Example.NET>", "user@example.net", "USER@EXAMPLE.NET", "<user@example.net",
             "user@example.net>", "<<user@example.net>>", "user@example.net.",
             "<@relay.test:user@example.net>", '"ab"@example.net', '<"AB"@Example.net>',
             "a@b@example.net", "x@elsewhere.test", "user@[192.0.2.1]", "user", "<>",
             "us\u212aer@example.net",          # KELVIN SIGN: lower() makes it "usker@..."
             "<abuse@example.net>", "user@sub.example.net", " <user@example.net>",
             "<@a.test:@x.test:user@example.net>", "<@x.test:user@example.net>",
             "<@x.test:@example.net>"]
    for text in texts:
        slow = verifier._decide(text, time.monotonic())
        fast = verifier.verify(text)
        assert (fast.kind, fast.source, fast.reply, fast.backend) == \
            (slow.kind, slow.source, slow.reply, slow.backend), text
    assert verifier.verify("<User@Example.NET>").source == "cache"
    assert backend.connections == 0


def test_an_address_cached_while_its_domain_was_routed_is_not_answered_once_it_is_not(backend):
    cache = VerdictCache(600, 600)
    cache.put("user@example.net", False)
    verifier = make_verifier(backend_conf(backend), cache)
    assert verifier.verify("user@example.net").kind is Kind.INVALID
    config = make_config(backend_conf(backend, domain="example.org"))
    verifier.reconfigure(config, routing.Router(config))
    answer = verifier.verify("user@example.net")
    assert (answer.kind, answer.reply) == (Kind.SKIPPED, "domain not routed")
