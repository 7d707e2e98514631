"""LMTP backends: aiosmtpd's LMTP server on 127.0.0.1 (LHLO only; HELO and EHLO get 500).

scam-back greets an LMTP backend with LHLO (never EHLO or HELO, no fallback), then asks MAIL
FROM and RCPT TO as over SMTP, with the same verdict mapping: 250 valid, 550 5.1.1 invalid,
4xx trouble. LMTP routes come from BackProtocol: lmtp (BackSMTPServer routes), mailertable
lmtp:[host]:port lines and transport map lmtp:[host]:port / lmtp:inet:host:port lines; a route
without a port uses 24, and LMTP over a unix socket is skipped with a warning.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from scam_back import mailertable
from scam_back.config import HostSpec
from scam_back.mailertable import LMTP_PORT, TableRoute
from scam_back.routing import Route
from scam_back.verdict import Kind

from .conftest import GOOD, make_verifier, user_dir
from .dnsserver import DNSServer
from .faults.conftest import FaultDaemon, ask, is_invalid, is_tempfail, show, verdict_lines
from .smtpbackend import Backend
from .tlsbackend import TLSBackend, make_pki

HELO = "mx.test.example"
LHLO = f"LHLO {HELO}"
PROBE = f"MAIL FROM:<postmaster+backscatter@{HELO}>"
MT = "/etc/mail/mailertable"
TRANSPORT = "/etc/postfix/transport"


# ---- fixtures and helpers ----

@pytest.fixture
def lmtp() -> Iterator[TLSBackend]:
    """A real LMTP server (aiosmtpd LMTP) on 127.0.0.1 that knows the GOOD users."""
    with TLSBackend(users=GOOD, lmtp=True) as server:
        yield server


def server_conf(port: int, extra: str = "", domain: str = "example.net") -> str:
    return (f"BackSMTPPort: {port}\nBackSMTPServer: 127.0.0.1\nBackAddrDomain: {domain}\n"
            "TimeoutSMTPConnect: 2\nTimeoutSMTPReply: 2\nBackSkipLoopback: no\n"
            f"HeloName: {HELO}\nBackCatchAllCheck: 0\n" + extra)


def table_conf(extra: str) -> str:
    return ("TimeoutSMTPConnect: 2\nTimeoutSMTPReply: 2\nBackSkipLoopback: no\n"
            f"HeloName: {HELO}\nBackCatchAllCheck: 0\n" + extra)


def verbs(server) -> list[str]:  # type: ignore[no-untyped-def]
    return [line.split(" ", 1)[0].upper() for line in list(server.transcript)]


def assert_lmtp_dialogue(server, *addresses: str) -> None:  # type: ignore[no-untyped-def]
    """LHLO once, then MAIL FROM and RCPT per address (RSET between): no EHLO, no HELO."""
    expected = [LHLO]
    for number, address in enumerate(addresses):
        expected += (["RSET"] if number else []) + [PROBE, f"RCPT TO:<{address}>"]
    assert server.transcript == expected
    assert "EHLO" not in verbs(server) and "HELO" not in verbs(server)


# ---- parsing: scam_back.mailertable ----

def test_mailertable_lmtp_route_with_port():
    routes, warnings = mailertable.parse_text("example.net lmtp:[127.0.0.1]:2424\n", MT)
    assert routes == [TableRoute("example.net", (HostSpec("127.0.0.1", 2424, protocol="lmtp"),), 1)]
    assert warnings == []


def test_mailertable_lmtp_route_without_port_uses_24_not_the_smtp_port():
    routes, _ = mailertable.parse_text("example.net lmtp:[127.0.0.1]\n", MT, default_port=2525)
    assert routes[0].hosts == (HostSpec("127.0.0.1", LMTP_PORT, protocol="lmtp"),)
    assert LMTP_PORT == 24


def test_mailertable_lmtp_host_list_each_host_is_lmtp():
    routes, _ = mailertable.parse_text("example.net LMTP:[10.0.0.1]:[10.0.0.2]:2400\n", MT)
    assert routes[0].hosts == (HostSpec("10.0.0.1", 24, protocol="lmtp"),
                               HostSpec("10.0.0.2", 2400, protocol="lmtp"))


def test_mailertable_smtp_routes_are_not_lmtp():
    routes, _ = mailertable.parse_text("a.test esmtp:[10.0.0.1]\nb.test smtp:[10.0.0.1]:2525\n", MT)
    assert [h.protocol for r in routes for h in r.hosts] == ["", ""]
    assert [h.port for r in routes for h in r.hosts] == [25, 2525]


def test_mailertable_lmtp_over_a_unix_socket_is_skipped_with_a_warning():
    routes, warnings = mailertable.parse_text(
        "example.net lmtp:unix:/run/dovecot/lmtp\nother.test lmtp:[127.0.0.1]\n", MT)
    assert [r.key for r in routes] == ["other.test"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{MT}:1: example.net")


@pytest.mark.parametrize("line, host, port", [
    ("example.net lmtp:inet:127.0.0.1:2424", "127.0.0.1", 2424),
    ("example.net lmtp:[127.0.0.1]:2424", "127.0.0.1", 2424),
    ("example.net lmtp:inet:[127.0.0.1]", "127.0.0.1", 24),
    ("example.net lmtp:[127.0.0.1]", "127.0.0.1", 24),
    ("example.net lmtp:inet:[::1]:2424", "::1", 2424),
])
def test_transport_lmtp_routes(line, host, port):
    routes, warnings = mailertable.parse_transport(line + "\n", TRANSPORT, default_port=2525)
    assert warnings == []
    assert len(routes) == 1 and routes[0].key == "example.net"
    (spec,) = routes[0].hosts
    assert (spec.host, spec.port, spec.protocol) == (host, port, "lmtp")


@pytest.mark.parametrize("value", ["lmtp:unix:private/dovecot-lmtp",
                                   "lmtp:unix:/var/run/cyrus/socket/lmtp", "lmtp:"])
def test_transport_lmtp_over_a_unix_socket_or_nowhere_is_skipped_with_a_warning(value):
    routes, warnings = mailertable.parse_transport(
        f"example.net {value}\nother.test lmtp:inet:[127.0.0.1]:2424\n", TRANSPORT)
    assert [r.key for r in routes] == ["other.test"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{TRANSPORT}:1: example.net") and "not verified" in warnings[0]


def test_transport_lmtp_inet_host_is_not_an_mx_lookup():
    routes, _ = mailertable.parse_transport("example.net lmtp:inet:store.test:2424\n", TRANSPORT)
    assert routes[0].hosts == (HostSpec("store.test", 2424, mx=False, protocol="lmtp"),)


def test_lmtp_route_label_says_lmtp():
    routes, _ = mailertable.parse_text("example.net lmtp:[127.0.0.1]:2424\n", MT)
    assert Route("example.net", routes[0].hosts).label == "lmtp:127.0.0.1:2424"


# ---- verifying against a real LMTP server ----

def test_backprotocol_lmtp_greets_with_lhlo_then_mail_and_rcpt(lmtp):
    verifier = make_verifier(server_conf(lmtp.port, "BackProtocol: lmtp\n"))
    try:
        good, bad = verifier.verify("good@example.net"), verifier.verify("bad@example.net")
        assert good.kind is Kind.VALID and bad.kind is Kind.INVALID
        assert bad.reply.startswith("550 5.1.1")
        assert good.backend == bad.backend == f"lmtp:127.0.0.1:{lmtp.port}"
        assert_lmtp_dialogue(lmtp, "good@example.net", "bad@example.net")
        assert lmtp.connections == 1
        assert verifier.cache.get("bad@example.net") is not None
        assert verifier.stats.group("probes") == {f"lmtp:127.0.0.1:{lmtp.port}": 2}
    finally:
        verifier.pool.close()
    assert lmtp.wait_line("QUIT")


def test_lmtp_ignores_ehlo_no(lmtp):
    verifier = make_verifier(server_conf(lmtp.port, "BackProtocol: lmtp\nEhlo: no\n"))
    try:
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert lmtp.transcript[0] == LHLO
    finally:
        verifier.pool.close()


@pytest.mark.parametrize("reply", ["452 4.2.2 Mailbox full", "451 4.3.0 Temporary lookup failure",
                                   "450 4.2.1 Mailbox busy"])
def test_lmtp_4xx_is_trouble_and_not_cached(lmtp, reply):
    lmtp.set_rcpt_reply("busy@example.net", reply)
    verifier = make_verifier(server_conf(lmtp.port, "BackProtocol: lmtp\n"))
    try:
        verdict = verifier.verify("busy@example.net")
        assert verdict.kind is Kind.TROUBLE, verdict
        assert verdict.reply.startswith(reply[:3])
        assert verifier.cache.get("busy@example.net") is None
        assert verifier.verify("good@example.net").kind is Kind.VALID   # the session goes on
    finally:
        verifier.pool.close()


def test_lmtp_refused_lhlo_is_trouble_with_no_helo_fallback():
    """An SMTP server answers LHLO with 500: no EHLO or HELO is tried, nothing is asked."""
    with Backend(users=GOOD) as smtp:
        verifier = make_verifier(server_conf(smtp.port, "BackProtocol: lmtp\n"))
        try:
            verdict = verifier.verify("bad@example.net")
            assert verdict.kind is Kind.TROUBLE and verdict.why == "helo", verdict
            assert "EHLO" not in verbs(smtp) and "HELO" not in verbs(smtp)
            assert "RCPT" not in verbs(smtp) and "MAIL" not in verbs(smtp)
            assert smtp.transcript[0] == LHLO
        finally:
            verifier.pool.close()


def test_smtp_route_to_an_lmtp_server_is_refused_not_a_verdict(lmtp):
    """Without BackProtocol: lmtp, an LMTP server refuses EHLO and HELO: trouble, not 550."""
    verifier = make_verifier(server_conf(lmtp.port))
    try:
        verdict = verifier.verify("bad@example.net")
        assert verdict.kind is Kind.TROUBLE and verdict.why == "helo", verdict
        assert verbs(lmtp)[:2] == ["EHLO", "HELO"] and "RCPT" not in verbs(lmtp)
    finally:
        verifier.pool.close()


def test_mailertable_lmtp_route(lmtp, tmp_path, verifiers):
    table = tmp_path / "mailertable"
    table.write_text(f"example.net lmtp:[127.0.0.1]:{lmtp.port}\n")
    verifier = verifiers(table_conf(f"UseMailertable: yes\nMailertable: {table}\n"))
    assert verifier.router.route("example.net").label == f"lmtp:127.0.0.1:{lmtp.port}"
    assert verifier.verify("good@example.net").kind is Kind.VALID
    bad = verifier.verify("bad@example.net")
    assert bad.kind is Kind.INVALID and bad.backend == f"lmtp:127.0.0.1:{lmtp.port}"
    assert_lmtp_dialogue(lmtp, "good@example.net", "bad@example.net")


def test_transport_map_lmtp_inet_route(lmtp, tmp_path, verifiers):
    # A DNS server of our own: the route must not depend on the system resolver.
    with DNSServer() as dns:
        table = tmp_path / "transport"
        table.write_text(f"example.net lmtp:inet:127.0.0.1:{lmtp.port}\n")
        verifier = verifiers(table_conf(f"TransportMap: {table}\n"
                                                    f"DNSServer: 127.0.0.1:{dns.port}\n"))
        assert verifier.verify("good@example.net").kind is Kind.VALID
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert_lmtp_dialogue(lmtp, "good@example.net", "bad@example.net")


def test_transport_map_lmtp_bracketed_route(lmtp, tmp_path, verifiers):
    table = tmp_path / "transport"
    table.write_text(f"example.net lmtp:[127.0.0.1]:{lmtp.port}\n")
    verifier = verifiers(table_conf(f"TransportMap: {table}\n"))
    assert verifier.verify("bad@example.net").kind is Kind.INVALID
    assert verifier.verify("good@example.net").kind is Kind.VALID
    assert_lmtp_dialogue(lmtp, "bad@example.net", "good@example.net")


def test_transport_map_lmtp_inet_host_connects_to_the_host_not_its_mx(lmtp, tmp_path, verifiers):
    with DNSServer(mx={"store.test": [(10, "elsewhere.test")]},
                   a={"store.test": ["127.0.0.1"], "elsewhere.test": ["127.0.0.2"]}) as dns:
        table = tmp_path / "transport"
        table.write_text(f"example.net lmtp:inet:store.test:{lmtp.port}\n")
        verifier = verifiers(table_conf(f"TransportMap: {table}\n"
                                                    f"DNSServer: 127.0.0.1:{dns.port}\n"
                                                    "TimeoutSMTPConnect: 0.5\n"))
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert ("store.test", "MX") not in dns.queries


def test_table_lmtp_and_smtp_routes_side_by_side(lmtp, tmp_path, verifiers):
    with Backend(users=GOOD) as smtp:
        table = tmp_path / "mailertable"
        table.write_text(f"example.net lmtp:[127.0.0.1]:{lmtp.port}\n"
                         f"b.test esmtp:[127.0.0.1]:{smtp.port}\n")
        verifier = verifiers(table_conf(f"UseMailertable: yes\nMailertable: {table}\n"))
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        assert verifier.verify("b2@b.test").kind is Kind.VALID
        assert verifier.verify("nobody@b.test").kind is Kind.INVALID
        assert lmtp.transcript[0] == LHLO and smtp.transcript[0] == f"EHLO {HELO}"
        assert "LHLO" not in verbs(smtp) and "EHLO" not in verbs(lmtp)


def test_backprotocol_lmtp_leaves_esmtp_table_routes_smtp(lmtp, tmp_path, verifiers):
    with Backend(users=GOOD) as smtp:
        table = tmp_path / "mailertable"
        table.write_text(f"b.test esmtp:[127.0.0.1]:{smtp.port}\n")
        verifier = verifiers(server_conf(lmtp.port, "BackProtocol: lmtp\n"
                                                     f"UseMailertable: yes\nMailertable: {table}\n"))
        assert verifier.verify("bad@example.net").kind is Kind.INVALID     # LMTP, as asked
        assert verifier.verify("nobody@b.test").kind is Kind.INVALID       # SMTP, as the table says


def test_lmtp_with_starttls_verify_greets_again_with_lhlo_inside_tls(tmp_path):
    pki = make_pki(str(tmp_path))
    with TLSBackend(users=GOOD, lmtp=True, tls_context=pki.server_context()) as server:
        verifier = make_verifier(server_conf(server.port, "BackProtocol: lmtp\nBackTLS: verify\n"
                                             f"BackTLSCAFile: {pki.ca}\nTimeoutSMTPReply: 3\n"))
        try:
            assert verifier.verify("good@example.net").kind is Kind.VALID
            assert verifier.verify("bad@example.net").kind is Kind.INVALID
            assert server.transcript[:4] == [LHLO, "STARTTLS", LHLO, PROBE]
            assert server.version_of("LHLO")[0] is None
            assert all(v is not None for v in server.version_of("LHLO")[1:] +
                       server.version_of("RCPT"))
        finally:
            verifier.pool.close()


# ---- through the real daemon ----

@pytest.fixture
def table_dir() -> Iterator[Path]:
    """A directory the daemon's user can read, for its mailertable."""
    path = user_dir("scam-back-lmtp-")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_daemon_verifies_over_lmtp_from_a_mailertable_route(lmtp, table_dir):
    lmtp.set_rcpt_reply("full@example.net", "452 4.2.2 Mailbox full")
    table = table_dir / "mailertable"
    table.write_text(f"example.net lmtp:[127.0.0.1]:{lmtp.port}\n")
    table.chmod(0o644)
    daemon = FaultDaemon(table_conf(f"UseMailertable: yes\nMailertable: {table}\n"
                                    "BackErrorTempfail: yes\n"))
    try:
        daemon.start()
        good, bad, full = ask(daemon, "good@example.net", "bad@example.net", "full@example.net")
        assert good.action == "continue", show(good)
        assert is_invalid(bad), show(bad)
        assert is_tempfail(full), show(full)
        assert lmtp.transcript[0] == LHLO
        assert "EHLO" not in verbs(lmtp) and "HELO" not in verbs(lmtp)
        assert [line for line in lmtp.transcript if line.startswith("RCPT")] == [
            "RCPT TO:<good@example.net>", "RCPT TO:<bad@example.net>", "RCPT TO:<full@example.net>"]
        (line,) = verdict_lines(daemon, "bad@example.net")
        assert f"backend=lmtp:127.0.0.1:{lmtp.port}" in line and "verdict=invalid" in line
        (line,) = verdict_lines(daemon, "full@example.net")
        assert "verdict=unverified" in line and "452" in line
    finally:
        daemon.discard()
