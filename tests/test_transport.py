"""Postfix transport(5) text as routing (TransportMap), like UseMailertable for sendmail's file."""

from __future__ import annotations

import pytest

from scam_back import routing
from scam_back.config import ConfigError, HostSpec
from scam_back.mailertable import parse_transport
from scam_back.verdict import Kind
from scam_back.verifier import Verifier
from scam_back.cache import VerdictCache

from .conftest import make_config
from .dnsserver import DNSServer

TABLE = """\
# Postfix transport map
example.net      smtp:[10.0.0.2]:25
.example.net     smtp:[10.0.0.2]
example.org      relay:mail.example.org
example.com      relay:[10.0.0.3]:2525, [10.0.0.4]
v6.example       smtp:[2001:db8::25]:26
bounce.example   error:mail for bounce.example is not deliverable
local.example    local
lmtp.example     lmtp:unix:private/dovecot-lmtp
user@example.info smtp:[10.0.0.9]
default.example  :[10.0.0.5]
nexthop.example  smtp:
continued.example
    smtp:[10.0.0.6]
"""


def routes():
    found, warnings = parse_transport(TABLE, "/etc/postfix/transport", 25)
    return {r.key: r.hosts for r in found}, warnings


def test_bracketed_nexthop_with_port():
    assert routes()[0]["example.net"] == (HostSpec("10.0.0.2", 25, mx=False),)


def test_dot_key_is_for_subdomains():
    assert routes()[0][".example.net"] == (HostSpec("10.0.0.2", 25, mx=False),)


def test_bare_host_means_mx_lookup():
    assert routes()[0]["example.org"] == (HostSpec("mail.example.org", 25, mx=True),)


def test_several_nexthops_in_order():
    assert routes()[0]["example.com"] == (HostSpec("10.0.0.3", 2525), HostSpec("10.0.0.4", 25))


def test_ipv6_nexthop():
    assert routes()[0]["v6.example"] == (HostSpec("2001:db8::25", 26),)


def test_default_transport_and_empty_nexthop():
    table = routes()[0]
    assert table["default.example"] == (HostSpec("10.0.0.5", 25),)
    assert table["nexthop.example"] == (HostSpec("", 25, mx=True),)


def test_continuation_lines_join_the_entry_before():
    assert routes()[0]["continued.example"] == (HostSpec("10.0.0.6", 25),)


@pytest.mark.parametrize("key", ["bounce.example", "local.example", "lmtp.example",
                                 "user@example.info"])
def test_non_smtp_entries_are_skipped_with_a_warning_naming_the_line(key):
    table, warnings = routes()
    assert key not in table
    lineno = TABLE.splitlines().index(next(l for l in TABLE.splitlines() if l.startswith(key))) + 1
    assert any(w.startswith(f"/etc/postfix/transport:{lineno}: {key}") for w in warnings)


def test_lines_after_skipped_ones_are_still_read():
    assert "default.example" in routes()[0]


def test_transportmap_key_routes_domains(tmp_path):
    path = tmp_path / "transport"
    path.write_text("example.net smtp:[127.0.0.1]:2525\n.example.net smtp:[127.0.0.1]:2526\n")
    router, _ = routing.build(make_config(f"TransportMap: {path}\n"))
    assert router.route("example.net").hosts == (HostSpec("127.0.0.1", 2525),)
    assert router.route("a.b.example.net").hosts == (HostSpec("127.0.0.1", 2526),)
    assert router.route("other.test") is None


def test_missing_transport_map_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="transport map"):
        routing.build(make_config(f"TransportMap: {tmp_path}/nope\n"))


def test_transport_map_routing_nothing_is_a_config_error(tmp_path):
    path = tmp_path / "transport"
    path.write_text("example.net error:nope\n")
    with pytest.raises(ConfigError, match="routes no domain"):
        routing.build(make_config(f"TransportMap: {path}\n"))


def test_empty_nexthop_verifies_at_the_recipient_domains_mx(backend, tmp_path):
    """`smtp:` with no nexthop means the recipient's domain, looked up by MX for each domain."""
    with DNSServer(mx={"example.net": [(10, "mx.example.net")]},
                   a={"mx.example.net": ["127.0.0.1"], "sub.example.net": ["127.0.0.1"]}) as dns:
        path = tmp_path / "transport"
        path.write_text(".example.net smtp:\nexample.net smtp:\n")
        config = make_config(f"TransportMap: {path}\nBackSMTPPort: {backend.port}\n"
                             f"DNSServer: 127.0.0.1:{dns.port}\nTimeoutSMTPConnect: 0.5\n")
        router, _ = routing.build(config)
        verifier = Verifier(config, router, VerdictCache(86400, 3000))
        assert verifier.verify("bad@example.net").kind is Kind.INVALID
        verdict = verifier.verify("bad@sub.example.net")
        assert verdict.kind is Kind.INVALID
        assert ("example.net", "MX") in dns.queries and ("sub.example.net", "MX") in dns.queries
