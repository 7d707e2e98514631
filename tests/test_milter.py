"""The milter callbacks through pymilter's TestCtx, against a real SMTP backend on 127.0.0.1."""

from __future__ import annotations

import logging
import socket

import Milter
import pytest

from .conftest import backend_conf, make_verifier
from .smtpbackend import Backend


def rcpt(ctx, address: str, macro: bool = True) -> int:
    """Send one RCPT the way sendmail does: argument with brackets, {rcpt_addr} without."""
    if macro:
        ctx._setsymval("{rcpt_addr}", address)
    return ctx._envrcpt(f"<{address}>")


def start(ctx, ip: str = "192.0.2.10", daemon: str = "MTA") -> int:
    ctx._setsymval("{daemon_name}", daemon)
    rc = ctx._connect(host="client.test", ip=ip)
    if rc == Milter.CONTINUE:
        ctx._envfrom("<sender@elsewhere.test>")
    return rc


def test_valid_recipient_continues(backend, milter_ctx):
    ctx = milter_ctx(make_verifier(backend_conf(backend)))
    start(ctx)
    assert rcpt(ctx, "good@example.net") == Milter.CONTINUE


def test_invalid_recipient_gets_550_5_1_1_user_unknown(backend, milter_ctx):
    ctx = milter_ctx(make_verifier(backend_conf(backend)))
    start(ctx)
    assert rcpt(ctx, "bad@example.net") == Milter.REJECT
    assert ctx._reply == ("550", "5.1.1", "User unknown")


def test_reject_text_is_configurable_and_never_names_the_backend(backend, milter_ctx):
    ctx = milter_ctx(make_verifier(backend_conf(backend, "BackRejectText: No such user here\n")))
    start(ctx)
    assert rcpt(ctx, "bad@example.net") == Milter.REJECT
    assert ctx._reply == ("550", "5.1.1", "No such user here")
    assert "127.0.0.1" not in " ".join(ctx._reply) and str(backend.port) not in " ".join(ctx._reply)


def test_cached_invalid_is_rejected_without_backend_io(backend, milter_ctx):
    verifier = make_verifier(backend_conf(backend))
    ctx = milter_ctx(verifier)
    start(ctx)
    assert rcpt(ctx, "bad@example.net") == Milter.REJECT
    ctx._close()
    backend.clear()
    ctx = milter_ctx(verifier)
    start(ctx)
    assert rcpt(ctx, "BAD@Example.NET") == Milter.REJECT
    assert backend.connections == 0 and backend.transcript == []


def test_missing_rcpt_addr_macro_falls_back_to_the_argument(backend, milter_ctx):
    ctx = milter_ctx(make_verifier(backend_conf(backend)))
    start(ctx)
    assert rcpt(ctx, "bad@example.net", macro=False) == Milter.REJECT
    assert "RCPT TO:<bad@example.net>" in backend.transcript


def test_backend_down_accepts_unverified(milter_ctx):
    from .smtpbackend import refused_port
    ctx = milter_ctx(make_verifier(
        f"BackSMTPPort: {refused_port()}\nBackSMTPServer: 127.0.0.1\nBackAddrDomain: example.net\n"
        "BackSkipLoopback: no\n"))
    start(ctx)
    assert rcpt(ctx, "anyone@example.net") == Milter.CONTINUE


def test_backend_down_with_error_tempfail_gets_451_4_4_3(milter_ctx):
    from .smtpbackend import refused_port
    ctx = milter_ctx(make_verifier(
        f"BackSMTPPort: {refused_port()}\nBackSMTPServer: 127.0.0.1\nBackAddrDomain: example.net\n"
        "BackErrorTempfail: yes\n"))
    start(ctx)
    assert rcpt(ctx, "anyone@example.net") == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("451", "4.4.3")
    assert "Internal error" not in ctx._reply[2]


def test_internal_error_is_logged_and_answered_like_trouble(backend, milter_ctx, monkeypatch, caplog):
    verifier = make_verifier(backend_conf(backend, "BackErrorTempfail: yes\n"))
    monkeypatch.setattr(verifier, "verify", lambda *a, **k: 1 / 0)
    ctx = milter_ctx(verifier)
    start(ctx)
    with caplog.at_level(logging.ERROR, logger="scam-back"):
        assert rcpt(ctx, "good@example.net") == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("451", "4.4.3")
    assert any("ZeroDivisionError" in (r.exc_text or "") for r in caplog.records)


def test_bad_syntax_recipient_gets_550_5_1_3_and_never_reaches_backend(backend, milter_ctx):
    ctx = milter_ctx(make_verifier(backend_conf(backend)))
    start(ctx)
    assert rcpt(ctx, "x@example.net>\r\nRSET\r\nMAIL FROM:<evil@x>") == Milter.REJECT
    assert ctx._reply[:2] == ("550", "5.1.3")
    assert backend.transcript == []


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"])
def test_loopback_clients_are_skipped_by_default(backend, milter_ctx, ip):
    text = backend_conf(backend).replace("BackSkipLoopback: no\n", "")
    ctx = milter_ctx(make_verifier(text))
    assert start(ctx, ip=ip) == Milter.ACCEPT


def test_backskiploopback_no_verifies_loopback_clients(backend, milter_ctx):
    ctx = milter_ctx(make_verifier(backend_conf(backend)))
    assert start(ctx, ip="127.0.0.2") == Milter.CONTINUE
    assert rcpt(ctx, "bad@example.net") == Milter.REJECT


@pytest.mark.parametrize("rule,ip,skipped", [
    ("192.0.2.32/28", "192.0.2.40", True),
    ("192.0.2.32/28", "192.0.2.60", False),
    ("192.0.2.2", "192.0.2.2", True),
    ("2001:db8::/32", "2001:db8::1", True),
    ("2001:db8::/32", "2001:db9::1", False),
    ("0.0.0.0/0", "198.51.100.7", True),
    ("192.0.2.0/24", "::ffff:192.0.2.9", True),
    ("::ffff:192.0.2.0/120", "::ffff:192.0.2.9", True),
    ("::ffff:192.0.2.0/120", "192.0.2.9", True),
    ("::ffff:192.0.2.0/120", "192.0.3.9", False),
])
def test_backskipverify_cidrs_ipv4_and_ipv6(backend, milter_ctx, rule, ip, skipped):
    ctx = milter_ctx(make_verifier(backend_conf(backend, f"BackSkipVerify: {rule}\n")))
    assert (start(ctx, ip=ip) == Milter.ACCEPT) is skipped


@pytest.mark.parametrize("daemon,skipped", [("MSA", True), ("msa", True), ("MSA-v6", False),
                                            ("MTA", False)])
def test_msa_daemon_skipped_by_default(backend, milter_ctx, daemon, skipped):
    ctx = milter_ctx(make_verifier(backend_conf(backend)))
    assert (start(ctx, daemon=daemon) == Milter.ACCEPT) is skipped


def test_configured_skip_daemons_replace_the_default(backend, milter_ctx):
    verifier = make_verifier(backend_conf(backend, "BackSkipDaemon: submission\n"))
    assert start(milter_ctx(verifier), daemon="submission") == Milter.ACCEPT
    assert start(milter_ctx(verifier), daemon="MSA") == Milter.CONTINUE


@pytest.mark.parametrize("family,hostaddr", [(socket.AF_UNIX, "/var/run/x.sock"), (None, None),
                                             (12345, None)])
def test_unix_socket_and_unknown_family_are_skipped_not_crashed(backend, milter_ctx, family, hostaddr):
    ctx = milter_ctx(make_verifier(backend_conf(backend)))
    ctx._negotiate()
    ctx._stage = Milter.M_CONNECT
    assert ctx._priv.connect("localhost", family, hostaddr) == Milter.ACCEPT


def test_libmilter_tuple_hostaddr_is_understood(backend, milter_ctx):
    text = backend_conf(backend).replace("BackSkipLoopback: no\n", "")
    ctx = milter_ctx(make_verifier(text))
    ctx._negotiate()
    ctx._stage = Milter.M_CONNECT
    assert ctx._priv.connect("x", socket.AF_INET6, ("::1", 25, 0, 0)) == Milter.ACCEPT
    assert ctx._priv.connect("x", socket.AF_INET, ("192.0.2.1", 25)) == Milter.CONTINUE


def test_authenticated_clients_are_not_verified(backend, milter_ctx):
    ctx = milter_ctx(make_verifier(backend_conf(backend)))
    ctx._setsymval("{auth_authen}", "alice")
    start(ctx)
    assert rcpt(ctx, "bad@example.net") == Milter.CONTINUE
    assert backend.transcript == []


def test_postmaster_is_never_verified(backend, milter_ctx):
    ctx = milter_ctx(make_verifier(backend_conf(backend)))
    start(ctx)
    assert rcpt(ctx, "Postmaster@example.net") == Milter.CONTINUE
    assert backend.transcript == []


def test_unrouted_domain_is_not_verified(backend, milter_ctx):
    ctx = milter_ctx(make_verifier(backend_conf(backend)))
    start(ctx)
    assert rcpt(ctx, "bad@elsewhere.test") == Milter.CONTINUE
    assert backend.connections == 0


def test_each_domain_is_verified_at_its_own_backend(milter_ctx):
    """Weakness 7: a session opened for a.test must not answer for b.test."""
    with Backend(users={"good@a.test"}) as a, Backend(users={"b2@b.test"}) as b:
        text = (f"BackSMTPServer: 127.0.0.1\nBackSMTPPort: {a.port}\nBackAddrDomain: a.test\n"
                f"BackSMTPPort: {b.port}\nBackAddrDomain: b.test\nBackSkipLoopback: no\n")
        ctx = milter_ctx(make_verifier(text))
        start(ctx)
        assert rcpt(ctx, "good@a.test") == Milter.CONTINUE
        assert rcpt(ctx, "b2@b.test") == Milter.CONTINUE
        assert "RCPT TO:<b2@b.test>" not in a.transcript
        assert "RCPT TO:<b2@b.test>" in b.transcript


def test_backend_sessions_are_pooled_across_mta_connections_with_rset_between_uses(backend,
                                                                                  milter_ctx):
    verifier = make_verifier(backend_conf(backend))
    for address in ("good@example.net", "alice@example.net"):
        ctx = milter_ctx(verifier)
        start(ctx)
        rcpt(ctx, address)
        ctx._close()
    verifier.pool.close()
    assert backend.wait_line("QUIT")
    assert backend.connections == 1
    assert backend.transcript == [
        "EHLO mx.test.example", "MAIL FROM:<postmaster+backscatter@mx.test.example>",
        "RCPT TO:<good@example.net>", "RSET",
        "MAIL FROM:<postmaster+backscatter@mx.test.example>", "RCPT TO:<alice@example.net>", "RSET",
        "QUIT"]


def bitbucket_ctx(backend, milter_ctx):
    ctx = milter_ctx(make_verifier(backend_conf(backend, "BitBucket: yes\n")))
    start(ctx)
    return ctx


def test_bitbucket_accepts_then_removes_each_invalid_recipient_once(backend, milter_ctx):
    ctx = bitbucket_ctx(backend, milter_ctx)
    assert rcpt(ctx, "good@example.net") == Milter.CONTINUE
    assert rcpt(ctx, "bad@example.net") == Milter.CONTINUE
    assert rcpt(ctx, "bad@example.net") == Milter.CONTINUE
    assert ctx._eom() == Milter.CONTINUE
    assert ctx._delrcpt == ["bad@example.net"]


def test_bitbucket_rejects_a_message_whose_every_recipient_is_invalid(backend, milter_ctx):
    ctx = bitbucket_ctx(backend, milter_ctx)
    assert rcpt(ctx, "bad@example.net") == Milter.CONTINUE
    assert rcpt(ctx, "worse@example.net") == Milter.CONTINUE
    assert ctx._eom() == Milter.REJECT
    assert ctx._reply[0] == "550"
    assert ctx._delrcpt == []


def test_negotiation_skips_every_step_scam_back_does_not_use():
    mask = __import__("scam_back.milter", fromlist=["x"]).ScamBackMilter.protocol_mask()
    for bit in (Milter.P_NOHDRS, Milter.P_NOBODY, Milter.P_NOEOH, Milter.P_NODATA,
                Milter.P_NOUNKNOWN, Milter.P_NOHELO, Milter.P_NR_MAIL):
        assert not mask & bit, hex(bit)
    for bit in (Milter.P_NOCONNECT, Milter.P_NORCPT, Milter.P_NR_RCPT, Milter.P_NOMAIL):
        assert mask & bit, hex(bit)


def test_backend_closing_mid_rcpt_accepts_without_error_tempfail(milter_ctx):
    """Weakness 9: the original always answered 451 to RCPT I/O errors."""
    from .smtpbackend import ScriptedBackend
    with ScriptedBackend(replies={"RCPT": "close"}) as server:
        text = (f"BackSMTPPort: {server.port}\nBackSMTPServer: 127.0.0.1\nBackAddrDomain: example.net\n"
                "BackSkipLoopback: no\n")
        ctx = milter_ctx(make_verifier(text))
        start(ctx)
        assert rcpt(ctx, "x@example.net") == Milter.CONTINUE


def test_queue_id_is_read_until_the_mta_has_one(backend, milter_ctx, caplog):
    """Postfix may name the queue file only after the first accepted recipient."""
    ctx = milter_ctx(make_verifier(backend_conf(backend)))
    start(ctx)
    with caplog.at_level(logging.INFO, logger="scam-back"):
        rcpt(ctx, "good@example.net")
        ctx._setsymval("i", "QID42")
        rcpt(ctx, "alice@example.net")
    lines = [r.getMessage() for r in caplog.records if "rcpt=<" in r.getMessage()]
    assert lines[0].startswith("qid=- ") and lines[1].startswith("qid=QID42 "), lines
