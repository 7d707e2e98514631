"""Mailertable parsing and the Router: exact, whole-label subdomains, catch-all, build()."""

from __future__ import annotations

import pytest

from scam_back import config as cfg
from scam_back import mailertable, routing
from scam_back.config import ConfigError, HostSpec
from scam_back.mailertable import TableRoute
from scam_back.routing import Router

MT = "/etc/mail/mailertable"
CONF = "/etc/mail/scam.conf"


def table(text: str, default_port: int = 25) -> list[TableRoute]:
    routes, warnings = mailertable.parse_text(text, MT, default_port)
    return routes


def config(text: str) -> cfg.Config:
    return cfg.parse_text(text + "HeloName: mx.test.example\n", CONF)


def router(text: str, mt: str = "") -> Router:
    """A Router for config text and, optionally, mailertable text."""
    return Router(config(text), table(mt) if mt else None)


ONE = "BackSMTPServer: 10.0.0.1\nBackAddrDomain: example.net\n"
ONE_SUB = ONE + "BackAddrSubdomains: yes\n"
H1 = (HostSpec("10.0.0.1", 25),)
H2 = (HostSpec("10.0.0.2", 25),)


# ---- mailertable.parse_text ----

def test_mailertable_esmtp_bracketed_ipv4():
    assert table("example.net esmtp:[127.0.0.1]\n") == [
        TableRoute("example.net", (HostSpec("127.0.0.1", 25),), 1)]


def test_mailertable_dotted_key_with_port():
    (route,) = table(".example.org smtp:[10.0.0.1]:2525\n")
    assert (route.key, route.hosts) == (".example.org", (HostSpec("10.0.0.1", 2525),))


def test_mailertable_dotted_key_means_subdomains_only():
    (route,) = table(".example.org smtp:[10.0.0.1]:2525\n")
    assert route.subdomains_only is True


def test_mailertable_ipv6_tagged_literal():
    (route,) = table("example.net esmtp:[IPv6:::1]\n")
    assert route.hosts == (HostSpec("::1", 25),)


def test_mailertable_bare_ipv6_literal_with_port():
    (route,) = table("example.net esmtp:[::1]:2526\n")
    assert route.hosts == (HostSpec("::1", 2526),)


def test_mailertable_several_hosts_in_order():
    (route,) = table("example.net esmtp:[10.0.0.1]:[10.0.0.2]\n")
    assert route.hosts == (HostSpec("10.0.0.1", 25), HostSpec("10.0.0.2", 25))


def test_mailertable_several_hosts_each_with_a_port():
    (route,) = table("example.net esmtp:[10.0.0.1]:2525:[10.0.0.2]:2526\n")
    assert route.hosts == (HostSpec("10.0.0.1", 2525), HostSpec("10.0.0.2", 2526))


def test_mailertable_bare_host_means_mx_lookup():
    (route,) = table("example.net esmtp:mail.example.net\n")
    assert route.hosts == (HostSpec("mail.example.net", 25, mx=True),)


def test_mailertable_bracketed_host_is_not_mx():
    (route,) = table("example.net esmtp:[mail.example.net]\n")
    assert route.hosts == (HostSpec("mail.example.net", 25, mx=False),)


def test_mailertable_hosts_without_port_take_the_default_port():
    (route,) = table("example.net esmtp:[127.0.0.1]\n", default_port=2525)
    assert route.hosts == (HostSpec("127.0.0.1", 2525),)


def test_mailertable_key_is_lower_cased():
    (route,) = table("Example.NET esmtp:[127.0.0.1]\n")
    assert route.key == "example.net"


def test_mailertable_error_and_local_lines_are_skipped_and_later_lines_parsed():
    # Weakness 14: the original stopped at the first line that did not resolve.
    routes, warnings = mailertable.parse_text(
        "bad.test error:5.1.1:550 User unknown\n"
        "loc.test local:user\n"
        "good.test esmtp:[10.0.0.1]\n", MT)
    assert [r.key for r in routes] == ["good.test"]


def test_mailertable_skipped_lines_each_warn_naming_their_line():
    routes, warnings = mailertable.parse_text(
        "bad.test error:5.1.1:550 User unknown\nloc.test local:user\ngood.test esmtp:[10.0.0.1]\n", MT)
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{MT}:1:") and warnings[1].startswith(f"{MT}:2:")


def test_mailertable_unparsable_host_is_skipped_and_later_lines_parsed():
    routes, warnings = mailertable.parse_text(
        "bad.test esmtp:[not a host\ngood.test esmtp:[10.0.0.1]\n", MT)
    assert ([r.key for r in routes], len(warnings)) == (["good.test"], 1)


def test_mailertable_comments_and_blank_lines_are_ignored():
    routes, warnings = mailertable.parse_text(
        "# comment line\n\nexample.net esmtp:[10.0.0.1]  # trailing note\n", MT)
    assert (routes, warnings) == ([TableRoute("example.net", (HostSpec("10.0.0.1", 25),), 3)], [])


# ---- Router: exact, case, trailing dot ----

def test_router_exact_match():
    assert router(ONE).route("example.net").hosts == H1


def test_router_ignores_trailing_dot_in_recipient_domain():
    assert router(ONE).route("example.net.").hosts == H1


def test_router_ignores_case():
    assert router(ONE).route("EXAMPLE.Net").hosts == H1


def test_router_unconfigured_domain_is_not_routed():
    assert router(ONE).route("example.org") is None


def test_router_without_subdomains_does_not_route_subdomain():
    assert router(ONE).route("mail.example.net") is None


# ---- Router: subdomains by whole labels (weakness 13) ----

def test_router_subdomain_routed_with_backaddrsubdomains():
    assert router(ONE_SUB).route("a.b.example.net").hosts == H1


def test_router_repeated_domain_subdomain_is_verified_against_its_backend():
    # The original's first strstr hit made bad@example.net.example.net go unverified.
    route = router(ONE_SUB).route("example.net.example.net")
    assert route is not None and (route.key, route.hosts) == ("example.net", H1)


def test_router_label_suffix_is_not_a_subdomain():
    assert router(ONE_SUB).route("xexample.net") is None


def test_router_label_suffix_in_the_middle_is_not_a_subdomain():
    assert router(ONE_SUB).route("mail.xexample.net") is None


def test_router_most_specific_configured_domain_wins():
    r = router("BackSMTPServer: 10.0.0.2\nBackAddrDomain: a.example.net\n"
               "BackSMTPServer: 10.0.0.1\nBackAddrDomain: example.net\nBackAddrSubdomains: yes\n")
    assert (r.route("x.a.example.net").hosts, r.route("x.example.net").hosts) == (H2, H1)


def test_router_most_specific_mailertable_key_wins():
    r = router("UseMailertable: yes\n",
               ".example.net esmtp:[10.0.0.1]\n.a.example.net esmtp:[10.0.0.2]\n")
    assert (r.route("x.a.example.net").hosts, r.route("x.example.net").hosts) == (H2, H1)


def test_router_mailertable_dotted_key_does_not_match_the_domain_itself():
    r = router("UseMailertable: yes\n", ".example.org smtp:[10.0.0.1]:2525\n")
    assert r.route("example.org") is None


def test_router_mailertable_dotted_key_matches_subdomains():
    r = router("UseMailertable: yes\n", ".example.org smtp:[10.0.0.1]:2525\n")
    assert r.route("mail.example.org").hosts == (HostSpec("10.0.0.1", 2525),)


# ---- Router: AllDomains and repeated domains ----

def test_router_alldomains_routes_every_domain_to_the_one_backend():
    r = router("BackSMTPServer: 10.0.0.1\nAllDomains: yes\n")
    assert (r.route("anything.example").hosts, r.route("example.org").hosts) == (H1, H1)


def test_router_alldomains_uses_the_final_backsmtpport():
    r = router("BackSMTPServer: 10.0.0.1\nAllDomains: yes\nBackSMTPPort: 2525\n")
    assert r.route("example.org").hosts == (HostSpec("10.0.0.1", 2525),)


def test_router_later_backaddrdomain_wins_for_the_same_domain():
    r = router("BackSMTPServer: 10.0.0.1\nBackAddrDomain: example.net\n"
               "BackSMTPServer: 10.0.0.2\nBackAddrDomain: example.net\n")
    assert r.route("example.net").hosts == H2


# ---- routing.build ----

def test_build_reads_the_mailertable_file(tmp_path):
    mt = tmp_path / "mailertable"
    mt.write_text("example.net esmtp:[127.0.0.1]\n.example.org smtp:[10.0.0.1]:2525\n")
    r, warnings = routing.build(config(f"UseMailertable: yes\nMailertable: {mt}\n"))
    assert (r.route("example.net").hosts, r.route("a.example.org").hosts) == (
        (HostSpec("127.0.0.1", 25),), (HostSpec("10.0.0.1", 2525),))


def test_build_gives_mailertable_hosts_the_backsmtpport(tmp_path):
    mt = tmp_path / "mailertable"
    mt.write_text("example.net esmtp:[127.0.0.1]\n")
    r, _ = routing.build(config(f"UseMailertable: yes\nMailertable: {mt}\nBackSMTPPort: 2525\n"))
    assert r.route("example.net").hosts == (HostSpec("127.0.0.1", 2525),)


def test_build_returns_the_mailertable_warnings(tmp_path):
    mt = tmp_path / "mailertable"
    mt.write_text("bad.test error:5.1.1:550 nope\nexample.net esmtp:[127.0.0.1]\n")
    _, warnings = routing.build(config(f"UseMailertable: yes\nMailertable: {mt}\n"))
    assert len(warnings) == 1 and warnings[0].startswith(f"{mt}:1:")


def test_build_fails_when_mailertable_routes_nothing_and_no_backaddrdomain(tmp_path):
    mt = tmp_path / "mailertable"
    mt.write_text("a.test error:5.1.1:550 nope\nb.test local:user\n")
    with pytest.raises(ConfigError):
        routing.build(config(f"UseMailertable: yes\nMailertable: {mt}\n"))


def test_build_accepts_empty_mailertable_when_backaddrdomain_routes(tmp_path):
    mt = tmp_path / "mailertable"
    mt.write_text("# nothing\n")
    r, _ = routing.build(config(f"UseMailertable: yes\nMailertable: {mt}\n" + ONE))
    assert r.route("example.net").hosts == H1


def test_build_fails_when_the_mailertable_file_is_missing(tmp_path):
    with pytest.raises(ConfigError):
        routing.build(config(f"UseMailertable: yes\nMailertable: {tmp_path / 'missing'}\n"))


def test_build_without_usemailertable_does_not_read_the_mailertable(tmp_path):
    r, warnings = routing.build(config(ONE + f"Mailertable: {tmp_path / 'missing'}\n"))
    assert (r.route("example.net").hosts, warnings) == (H1, [])
