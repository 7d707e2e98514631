"""STARTTLS to backends (BackTLS: no | may | verify, BackTLSCAFile) against real aiosmtpd servers
on 127.0.0.1 that present certificates of a throwaway test CA (made here with openssl).

may: STARTTLS when offered, no certificate checks, on in the clear when it is not offered or is
refused. verify: no verdict over an unauthenticated channel: STARTTLS missing or refused, or a
certificate that does not verify (chain against BackTLSCAFile or the system CAs; name against
the BackSMTPServer name or address literal) is backend trouble (reason "tls"), never a 550, and
no RCPT goes out in the clear. The server side records, for every command line, the TLS version
it arrived under, so "encrypted" is what the backend saw, not what the client claims.
"""

from __future__ import annotations

import os
import shutil
import ssl
from pathlib import Path
from typing import Callable, Iterator

import pytest

from scam_back import backend as backendmod

from scam_back import routing
from scam_back.cache import VerdictCache
from scam_back.config import ConfigError
from scam_back.verdict import Kind
from scam_back.verifier import Verifier

from .conftest import GOOD, make_config, make_verifier, run_cli, user_dir
from .dnsserver import DNSServer
from .faults.conftest import FaultDaemon, ask, is_invalid, is_tempfail, show, users_replies, \
    verdict_lines
from .smtpbackend import ScriptedBackend
from .tlsbackend import Pki, TLSBackend, make_pki

HELO = "mx.test.example"
PROBE = f"MAIL FROM:<postmaster+backscatter@{HELO}>"
EHLO = f"EHLO {HELO}"
EHLO_WITH_STARTTLS = b"250-scripted.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
STARTTLS_REFUSED = b"454 4.7.0 TLS not available due to temporary reason\r\n"


# ---- fixtures and helpers ----

@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    """A test CA and server certificates, in a directory every user can read."""
    directory = user_dir("scam-back-pki-")
    try:
        yield make_pki(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def tls_backend(pki: Pki, cert: str = "server", **kwargs) -> TLSBackend:  # type: ignore[no-untyped-def]
    """An aiosmtpd backend knowing GOOD that offers STARTTLS with one of the test certificates."""
    return TLSBackend(users=GOOD, tls_context=pki.server_context(cert), **kwargs)


def conf(port: int, tls: str, extra: str = "", host: str = "127.0.0.1",
         domain: str = "example.net") -> str:
    """One domain routed to a backend, with BackTLS; replies get 3 s (a TLS handshake is one)."""
    return (f"BackSMTPPort: {port}\nBackSMTPServer: {host}\nBackAddrDomain: {domain}\n"
            "TimeoutSMTPConnect: 2\nTimeoutSMTPReply: 3\nBackSkipLoopback: no\n"
            f"HeloName: {HELO}\nBackCatchAllCheck: 0\nPreferIPVersion: 4\nBackTLS: {tls}\n"
            + extra)


def starttls_script(starttls_step) -> Callable:  # type: ignore[no-untyped-def]
    """ScriptedBackend replies: EHLO offers STARTTLS, STARTTLS gets `starttls_step`, RCPT is
    250 for GOOD and 550 5.1.1 for everyone else."""
    rcpt = users_replies({u.lower() for u in GOOD})

    def replies(verb: str, line: str, number: int):  # type: ignore[no-untyped-def]
        if verb == "EHLO":
            return EHLO_WITH_STARTTLS
        if verb == "STARTTLS":
            return starttls_step
        return rcpt(verb, line, number)
    return replies


def sent(server, verb: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The lines of one verb the backend received."""
    return [line for line in list(server.transcript) if line.upper().startswith(verb)]


def assert_tls_trouble(verifier: Verifier, address: str) -> None:
    """A verification that must end as backend trouble for TLS, uncached, counted as "tls"."""
    verdict = verifier.verify(address)
    assert verdict.kind is Kind.TROUBLE, verdict
    assert verdict.why == "tls", verdict
    assert "tls" in verdict.reply.lower(), verdict
    assert verifier.cache.get(address) is None
    assert verifier.stats.group("unverified") == {"tls": 1}
    errors = verifier.stats.group("backend-errors")
    assert errors and all(label.endswith(" tls") for label in errors), errors


def session_of(verifier: Verifier, port: int):  # type: ignore[no-untyped-def]
    """The idle pooled session to 127.0.0.1:port (put back after a look)."""
    session = verifier.pool.take(("127.0.0.1", port, False, "127.0.0.1"))
    assert session is not None
    return session


def line_of(text: str, key: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(key + ":"))


# ---- BackTLS: may ----

def test_may_upgrades_when_offered_and_asks_everything_inside_tls(pki, verifiers):
    with tls_backend(pki) as server:
        verifier = verifiers(conf(server.port, "may"))
        assert verifier.verify("good@example.net").kind is Kind.VALID
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert server.transcript == [EHLO, "STARTTLS", EHLO, PROBE, "RCPT TO:<good@example.net>",
                                     "RSET", PROBE, "RCPT TO:<bad@example.net>"]
        assert server.connections == 1
        # What the server's TLS layer saw: the first EHLO and STARTTLS in the clear, the rest
        # (the second EHLO, every MAIL and RCPT) inside a real TLS session.
        versions = [version for _, version in server.tls_lines]
        assert versions[:2] == [None, None]
        assert all(v is not None and v.startswith("TLSv1") for v in versions[2:]), server.tls_lines
        assert server.version_of("RCPT") == [versions[-1]] * 2
        session = session_of(verifier, server.port)
        try:
            assert session.encrypted
            assert isinstance(session._smtp.sock, ssl.SSLSocket)
            assert session._smtp.sock.version() == versions[-1]
        finally:
            verifier.pool.give(session)


@pytest.mark.parametrize("cert", ["self-signed", "other"])
def test_may_checks_no_certificate(pki, verifiers, cert):
    """may keeps the dialogue off the wire; it does not judge who is at the other end."""
    with tls_backend(pki, cert) as server:
        verifier = verifiers(conf(server.port, "may"))
        assert verifier.verify("good@example.net").kind is Kind.VALID
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert all(v is not None for v in server.version_of("RCPT"))


def test_may_without_starttls_carries_on_in_the_clear(verifiers):
    with TLSBackend(users=GOOD) as server:            # no tls_context: STARTTLS not offered
        verifier = verifiers(conf(server.port, "may"))
        assert verifier.verify("good@example.net").kind is Kind.VALID
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert server.transcript == [EHLO, PROBE, "RCPT TO:<good@example.net>", "RSET", PROBE,
                                     "RCPT TO:<bad@example.net>"]
        assert [version for _, version in server.tls_lines] == [None] * 6
        session = session_of(verifier, server.port)
        try:
            assert not session.encrypted
        finally:
            verifier.pool.give(session)


def test_may_after_a_refused_starttls_carries_on_in_the_clear(verifiers):
    with ScriptedBackend(replies=starttls_script(STARTTLS_REFUSED)) as server:
        verifier = verifiers(conf(server.port, "may"))
        assert verifier.verify("good@example.net").kind is Kind.VALID
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert server.transcript[:5] == [EHLO, "STARTTLS", PROBE, "RCPT TO:<good@example.net>",
                                         "RSET"]
        assert server.connections == 1


def test_may_with_a_failed_handshake_goes_on_in_the_clear(verifiers, monkeypatch, caplog):
    """220 to STARTTLS, then the connection drops: BackTLS: may asks again in the clear (as
    Postfix's "may" does), and skips STARTTLS at that backend for a while, saying so once."""
    monkeypatch.setattr(backendmod, "_TLS_BROKEN", {})
    step = [(0.0, b"220 2.0.0 Ready to start TLS\r\n"), "close"]
    with ScriptedBackend(replies=starttls_script(step)) as server:
        verifier = verifiers(conf(server.port, "may"))
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        verifier.pool.close()
        assert verifier.verify("good@example.net").kind is Kind.VALID
        assert len(sent(server, "STARTTLS")) == 1
        assert len(sent(server, "RCPT")) == 2
    assert sum("goes on in the clear" in r.getMessage() for r in caplog.records) == 1


def test_verify_with_a_failed_handshake_is_trouble_never_a_verdict(verifiers, monkeypatch):
    """220 to STARTTLS, then the connection drops: no verdict, nothing asked after it."""
    monkeypatch.setattr(backendmod, "_TLS_BROKEN", {})
    step = [(0.0, b"220 2.0.0 Ready to start TLS\r\n"), "close"]
    with ScriptedBackend(replies=starttls_script(step)) as server:
        verifier = verifiers(conf(server.port, "verify"))
        assert_tls_trouble(verifier, "bad@example.net")
        assert sent(server, "RCPT") == [] and sent(server, "MAIL") == []


def test_ehlo_no_still_greets_with_ehlo_when_starttls_may_be_used(pki, verifiers):
    """HELO cannot offer STARTTLS: with BackTLS, the greeting is EHLO whatever Ehlo says."""
    with tls_backend(pki) as server:
        verifier = verifiers(conf(server.port, "may", "Ehlo: no\n"))
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert server.transcript[:3] == [EHLO, "STARTTLS", EHLO]


def test_no_never_sends_starttls_even_when_offered(pki, verifiers):
    with tls_backend(pki) as server:
        verifier = verifiers(conf(server.port, "no"))
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert sent(server, "STARTTLS") == []
        assert server.version_of("RCPT") == [None]


# ---- BackTLS: verify ----

def test_verify_with_the_test_ca_gives_verdicts_over_tls(pki, verifiers):
    with tls_backend(pki) as server:
        verifier = verifiers(conf(server.port, "verify", f"BackTLSCAFile: {pki.ca}\n"))
        good, bad = verifier.verify("good@example.net"), verifier.verify("bad@example.net")
        assert good.kind is Kind.VALID and bad.kind is Kind.INVALID
        assert bad.reply.startswith("550 5.1.1")
        assert server.transcript[:3] == [EHLO, "STARTTLS", EHLO]
        assert server.connections == 1
        assert all(v is not None and v.startswith("TLSv1") for v in server.version_of("RCPT"))
        assert all(v is not None for v in server.version_of("MAIL"))
        assert verifier.cache.get("bad@example.net") is not None
        assert verifier.cache.get("good@example.net") is not None
        assert verifier.stats.group("unverified") == {}


def test_verify_checks_the_backend_name_as_configured(pki, verifiers):
    """BackSMTPServer: localhost and a certificate for the name localhost only: verified."""
    with tls_backend(pki, "name-only") as server:
        verifier = verifiers(conf(server.port, "verify", f"BackTLSCAFile: {pki.ca}\n",
                                  host="localhost"))
        assert verifier.verify("good@example.net").kind is Kind.VALID
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert all(v is not None for v in server.version_of("RCPT"))


def test_verify_without_a_ca_file_uses_the_system_cas_which_do_not_know_the_test_ca(
        pki, verifiers):
    with tls_backend(pki) as server:
        verifier = verifiers(conf(server.port, "verify"))
        assert_tls_trouble(verifier, "bad@example.net")       # never a 550, though it is unknown
        assert sent(server, "RCPT") == [] and sent(server, "MAIL") == []
        assert server.transcript[:2] == [EHLO, "STARTTLS"]


def test_verify_against_a_backend_without_starttls_sends_no_rcpt_in_the_clear(pki, verifiers):
    with TLSBackend(users=GOOD) as server:
        verifier = verifiers(conf(server.port, "verify", f"BackTLSCAFile: {pki.ca}\n"))
        assert_tls_trouble(verifier, "bad@example.net")
        assert "STARTTLS" in verifier.verify("good@example.net").reply
        assert sent(server, "RCPT") == [] and sent(server, "MAIL") == []
        assert sent(server, "STARTTLS") == []
        assert server.transcript[0] == EHLO


def test_verify_with_starttls_refused_sends_no_rcpt(pki, verifiers):
    with ScriptedBackend(replies=starttls_script(STARTTLS_REFUSED)) as server:
        verifier = verifiers(conf(server.port, "verify", f"BackTLSCAFile: {pki.ca}\n"))
        assert_tls_trouble(verifier, "bad@example.net")
        assert sent(server, "RCPT") == [] and sent(server, "MAIL") == []


@pytest.mark.parametrize("cert, host", [
    ("other", "127.0.0.1"),             # signed by the CA, for other.example only
    ("other", "localhost"),
    ("name-only", "127.0.0.1"),         # names localhost, not the address literal configured
    ("self-signed", "127.0.0.1"),       # the right names, but no CA signed it
])
def test_verify_refuses_a_certificate_that_does_not_verify(pki, verifiers, cert, host):
    with tls_backend(pki, cert) as server:
        verifier = verifiers(conf(server.port, "verify", f"BackTLSCAFile: {pki.ca}\n", host=host))
        assert_tls_trouble(verifier, "bad@example.net")
        assert sent(server, "RCPT") == [] and sent(server, "MAIL") == []


def test_verify_trouble_is_not_cached_and_a_fixed_backend_gives_verdicts_again(pki, verifiers):
    """Trouble for TLS is not cached and puts the backend in no backoff: once the backend
    offers STARTTLS (read per connection), the next recipient is verified."""
    with TLSBackend(users=GOOD) as server:
        verifier = verifiers(conf(server.port, "verify", f"BackTLSCAFile: {pki.ca}\n"))
        assert verifier.verify("bad@example.net").kind is Kind.TROUBLE
        server.tls_context = pki.server_context()
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert verifier.verify("good@example.net").kind is Kind.VALID
        assert server.connections == 2
        assert len(sent(server, "RCPT")) == 2
        assert all(v is not None for v in server.version_of("RCPT"))


def test_verify_mailertable_routes_check_their_bracketed_name_or_address(pki, tmp_path):
    with tls_backend(pki, "name-only") as server:
        table = tmp_path / "mailertable"
        table.write_text(f"a.test esmtp:[localhost]:{server.port}\n"
                         f"b.test esmtp:[127.0.0.1]:{server.port}\n")
        verdicts = {}
        for address in ("bad@a.test", "bad@b.test"):       # one verifier each: no shared pool
            config = make_config(f"UseMailertable: yes\nMailertable: {table}\nBackTLS: verify\n"
                                 f"BackTLSCAFile: {pki.ca}\nTimeoutSMTPReply: 3\n"
                                 "PreferIPVersion: 4\n")
            router, _ = routing.build(config)
            verifier = Verifier(config, router, VerdictCache(86400, 3000))
            try:
                verdicts[address] = verifier.verify(address)
            finally:
                verifier.pool.close()
        assert verdicts["bad@a.test"].kind is Kind.INVALID
        assert verdicts["bad@b.test"].kind is Kind.TROUBLE and verdicts["bad@b.test"].why == "tls"


def test_pooled_session_is_not_reused_past_the_name_check(pki, verifiers):
    """a.test names the backend localhost (which its certificate names), b.test names it
    127.0.0.1 (which it does not): b.test must be trouble whichever is asked first."""
    with tls_backend(pki, "name-only") as server:
        text = (f"BackSMTPPort: {server.port}\nBackSMTPServer: localhost\nBackAddrDomain: a.test\n"
                f"BackSMTPServer: 127.0.0.1\nBackAddrDomain: b.test\nBackTLS: verify\n"
                f"BackTLSCAFile: {pki.ca}\nTimeoutSMTPReply: 3\nPreferIPVersion: 4\n")
        verifier = verifiers(text)
        assert verifier.verify("bad@b.test").kind is Kind.TROUBLE
        assert verifier.verify("bad@a.test").kind is Kind.INVALID
        assert verifier.verify("other@b.test").kind is Kind.TROUBLE


def test_verify_mx_route_checks_the_chain_only(pki, tmp_path):
    with tls_backend(pki, "other") as server, \
            DNSServer(mx={"mail.test": [(10, "mx1.mail.test")]},
                      a={"mx1.mail.test": ["127.0.0.1"]}) as dns:
        table = tmp_path / "mailertable"
        table.write_text("example.net esmtp:mail.test\n")
        config = make_config(f"UseMailertable: yes\nMailertable: {table}\n"
                             f"BackSMTPPort: {server.port}\nDNSServer: 127.0.0.1:{dns.port}\n"
                             f"BackTLS: verify\nBackTLSCAFile: {pki.ca}\nTimeoutSMTPReply: 3\n")
        router, _ = routing.build(config)
        verifier = Verifier(config, router, VerdictCache(86400, 3000))
        try:
            assert verifier.verify("bad@example.net").kind is Kind.INVALID
        finally:
            verifier.pool.close()


# ---- BackTLSCAFile that cannot be used ----

def _unusable_ca(kind: str, directory: Path) -> str:
    if kind == "missing":
        return str(directory / "no-such-ca.pem")
    if kind == "directory":
        return str(directory)
    path = directory / f"{kind}.pem"
    path.write_text("" if kind == "empty" else "this is not a certificate\n")
    return str(path)


UNUSABLE = ["missing", "directory", "empty", "garbage"]


@pytest.mark.parametrize("kind", UNUSABLE)
def test_unusable_ca_file_is_a_config_error_naming_its_line(tmp_path, kind):
    ca = _unusable_ca(kind, tmp_path)
    text = conf(2525, "verify", f"BackTLSCAFile: {ca}\n")
    with pytest.raises(ConfigError) as caught:
        make_verifier(text)
    lineno = line_of(text, "BackTLSCAFile")
    assert (caught.value.path, caught.value.lineno) == ("/test/scam.conf", lineno)
    assert str(caught.value).startswith(f"/test/scam.conf:{lineno}: ")
    assert "BackTLSCAFile" in str(caught.value) and ca in str(caught.value)


@pytest.mark.parametrize("kind", ["missing", "garbage"])
def test_check_flag_exits_78_for_an_unusable_ca_file(tmp_path, kind):
    ca = _unusable_ca(kind, tmp_path)
    path = tmp_path / "scam.conf"
    text = conf(2525, "verify", f"BackTLSCAFile: {ca}\n")
    path.write_text(text)
    done = run_cli("-t", "-f", str(path))
    assert done.returncode == 78, done.stderr
    assert f"{path}:{line_of(text, 'BackTLSCAFile')}:" in done.stderr
    assert "BackTLSCAFile" in done.stderr


def test_check_flag_accepts_a_usable_ca_file(pki, tmp_path):
    path = tmp_path / "scam.conf"
    path.write_text(conf(2525, "verify", f"BackTLSCAFile: {pki.ca}\n"))
    done = run_cli("-t", "-f", str(path))
    assert done.returncode == 0, done.stderr


def test_daemon_refuses_to_start_with_an_unusable_ca_file(tmp_path):
    directory = user_dir()
    try:
        path = os.path.join(directory, "scam.conf")
        text = conf(2525, "verify", f"BackTLSCAFile: {tmp_path / 'no-such-ca.pem'}\n")
        Path(path).write_text(text)
        pidfile = os.path.join(directory, "scam-back.pid")
        args = ["-p", f"unix:{directory}/scam-back.sock", "-f", path, "-P", pidfile]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        done = run_cli(*args, timeout=30)
        assert done.returncode == 78, done.stderr
        assert f"{path}:{line_of(text, 'BackTLSCAFile')}:" in done.stderr
        assert not os.path.exists(pidfile)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---- through the real daemon ----

@pytest.fixture
def daemons() -> Iterator[Callable[[str], FaultDaemon]]:
    """Real scam-back daemons, each killed by pid (and its directory removed) at the end."""
    started: list[FaultDaemon] = []

    def start(text: str) -> FaultDaemon:
        daemon = FaultDaemon(text)
        started.append(daemon)
        return daemon.start()
    yield start
    for daemon in started:
        daemon.discard()


def test_daemon_verify_tempfails_without_verified_tls_and_rejects_with_it(pki, daemons):
    users = {"bob@tls.test", "bob@clear.test", "bob@wrong.test"}
    with TLSBackend(users=users, tls_context=pki.server_context()) as good, \
            TLSBackend(users=users) as clear, \
            TLSBackend(users=users, tls_context=pki.server_context("other")) as wrong:
        text = ("TimeoutSMTPConnect: 2\nTimeoutSMTPReply: 3\nBackSkipLoopback: no\n"
                f"HeloName: {HELO}\nBackCatchAllCheck: 0\nBackErrorTempfail: yes\n"
                f"BackTLS: verify\nBackTLSCAFile: {pki.ca}\n")
        for domain, server in (("tls.test", good), ("clear.test", clear), ("wrong.test", wrong)):
            text += (f"BackSMTPPort: {server.port}\nBackSMTPServer: 127.0.0.1\n"
                     f"BackAddrDomain: {domain}\n")
        daemon = daemons(text)
        replies = ask(daemon, "bob@tls.test", "nobody@tls.test", "bob@clear.test",
                      "nobody@clear.test", "bob@wrong.test", "nobody@wrong.test")
        shown = [show(r) for r in replies]
        assert replies[0].action == "continue", shown
        assert is_invalid(replies[1]), shown
        assert all(is_tempfail(r) for r in replies[2:]), shown
        # Verified: asked inside TLS. Not verifiable: nothing asked at all.
        assert good.version_of("RCPT") and all(v is not None for v in good.version_of("RCPT"))
        assert sent(clear, "RCPT") == [] and sent(wrong, "RCPT") == []
        lines = verdict_lines(daemon, "nobody@clear.test") + verdict_lines(daemon, "nobody@wrong.test")
        assert len(lines) == 2, daemon.log()[-3000:]
        assert all("verdict=unverified" in line and "tls" in line.lower() for line in lines), lines
        assert any("verdict=invalid" in line for line in verdict_lines(daemon, "nobody@tls.test"))
