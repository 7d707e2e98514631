"""scam.conf parsing: keys, defaults, errors as file:line: Key: why, order rules and warnings."""

from __future__ import annotations

import ipaddress
import re

import pytest

from scam_back import config as cfg
from scam_back.config import ConfigError, DomainRoute, HostSpec

PATH = "/etc/mail/scam.conf"
ROUTE = "BackSMTPServer: 127.0.0.1\nBackAddrDomain: example.net\n"   # lines 1 and 2
HELO = "HeloName: mx.test.example\n"


def parse(extra: str = "", route: str = ROUTE) -> cfg.Config:
    """A config routing example.net to 127.0.0.1, plus extra lines (from line 3 on)."""
    return cfg.parse_text(route + extra, PATH)


def error(text: str, path: str = PATH) -> str:
    """The str of the ConfigError that parsing text raises."""
    with pytest.raises(ConfigError) as info:
        cfg.parse_text(text, path)
    return str(info.value)


def assert_located(message: str, lineno: int, key: str) -> None:
    """message is `PATH:lineno: key: why` with a non-empty why."""
    assert re.fullmatch(rf"{re.escape(PATH)}:{lineno}: {re.escape(key)}: \S.*", message), message


# ---- defaults ----

@pytest.mark.parametrize("field, default", [
    ("smtp_port", 25),
    ("valid_ttl", 86400),
    ("invalid_ttl", 3000),
    ("subdomains", False),
    ("backlist", None),
    ("timeout_connect", 1.5),
    ("timeout_reply", 3.0),
    ("verify_timeout", 10.0),
    ("skip_verify", ()),
    ("skip_loopback", True),
    ("skip_daemons", ("MSA",)),
    ("skip_recipients", ("postmaster",)),
    ("error_tempfail", False),
    ("use_mailertable", False),
    ("mailertable", "/etc/mail/mailertable"),
    ("prefer_ip_version", 0),
    ("backoff", 60),
    ("ehlo", True),
    ("bitbucket", False),
    ("all_domains", False),
    ("mail_from", None),
    ("cache_max", 1_000_000),
    ("save_interval", 300),
    ("reject_text", "User unknown"),
    ("log_level", "info"),
    ("dns_server", None),
])
def test_default_when_key_absent(field, default):
    assert getattr(parse(), field) == default


def test_heloname_defaults_to_the_hosts_fqdn(monkeypatch):
    monkeypatch.setattr(cfg.socket, "getfqdn", lambda *a: "mx.example.org")
    assert parse().helo_name == "mx.example.org"


def test_ehlo_defaults_to_yes():
    assert parse().ehlo is True


# ---- each key with a set value ----

@pytest.mark.parametrize("line, field, value", [
    ("BackValidAddrExp: 600", "valid_ttl", 600),
    ("BackInvalidAddrExp: 60", "invalid_ttl", 60),
    ("BackAddrSubdomains: YES", "subdomains", True),
    ("BackList: /var/spool/scam/backscatter.txt", "backlist", "/var/spool/scam/backscatter.txt"),
    ("TimeoutSMTPConnect: 2", "timeout_connect", 2.0),
    ("TimeoutSMTPConnect: 0.5", "timeout_connect", 0.5),
    ("TimeoutSMTPReply: 7", "timeout_reply", 7.0),
    ("BackVerifyTimeout: 20", "verify_timeout", 20.0),
    ("BackSkipVerify: 192.0.2.0/24", "skip_verify", (ipaddress.ip_network("192.0.2.0/24"),)),
    ("BackSkipLoopback: no", "skip_loopback", False),
    ("BackSkipDaemon: ORIG", "skip_daemons", ("ORIG",)),
    ("BackSkipRecipient: abuse", "skip_recipients", ("abuse",)),
    ("BackErrorTempfail: Yes", "error_tempfail", True),
    ("UseMailertable: yes", "use_mailertable", True),
    ("Mailertable: /etc/mail/mt.txt", "mailertable", "/etc/mail/mt.txt"),
    ("PreferIPVersion: 6", "prefer_ip_version", 6),
    ("PreferIPVersion: 4", "prefer_ip_version", 4),
    ("BackSMTPBackoff: 120", "backoff", 120),
    ("Ehlo: no", "ehlo", False),
    ("BitBucket: yes", "bitbucket", True),
    ("AllDomains: yes", "all_domains", True),
    ("BackMailFrom: probe@example.org", "mail_from", "probe@example.org"),
    ("HeloName: MX.Example.ORG", "helo_name", "MX.Example.ORG"),
    ("BackCacheMax: 5000", "cache_max", 5000),
    ("BackListSaveInterval: 60", "save_interval", 60),
    ("BackRejectText: No such user here", "reject_text", "No such user here"),
    ("LogLevel: DEBUG", "log_level", "debug"),
    ("DNSServer: 127.0.0.1:5353", "dns_server", ("127.0.0.1", 5353)),
])
def test_key_sets_its_value(line, field, value):
    assert getattr(parse(line + "\n"), field) == value


def test_backsmtpserver_and_backaddrdomain_route_the_domain():
    assert parse().domains == (DomainRoute("example.net", (HostSpec("127.0.0.1", 25),), 2),)


def test_backsmtpport_sets_the_port_of_later_domains():
    conf = cfg.parse_text("BackSMTPPort: 2525\n" + ROUTE, PATH)
    assert conf.domains[0].hosts == (HostSpec("127.0.0.1", 2525),)


def test_backaddrdomain_is_lower_cased_without_trailing_dot():
    conf = parse(route="BackSMTPServer: 127.0.0.1\nBackAddrDomain: Example.NET.\n")
    assert conf.domains[0].domain == "example.net"


# ---- key spelling and line rules ----

@pytest.mark.parametrize("line, field, value", [
    ("TimeoutSMTPconnect: 2", "timeout_connect", 2.0),       # as in the original's sample
    ("TimeoutSMTPreply: 5", "timeout_reply", 5.0),           # as in the original's sample
    ("timeoutsmtpreply: 4", "timeout_reply", 4.0),
    ("BACKVALIDADDREXP: 99", "valid_ttl", 99),
])
def test_keys_match_case_insensitively(line, field, value):
    assert getattr(parse(line + "\n"), field) == value


def test_short_port_line_is_not_ignored():
    # "BackSMTPPort:26\n" is 16 characters: the original dropped it.
    conf = cfg.parse_text("BackSMTPPort:26\n" + ROUTE, PATH)
    assert conf.domains[0].hosts[0].port == 26


def test_short_backlist_line_is_not_ignored():
    assert parse("BackList:/a/b\n").backlist == "/a/b"


def test_blank_and_comment_lines_are_ignored():
    text = "\n# Bogus: this would be an unknown key\n   \n\t\n#BackSMTPPort: x\n" + ROUTE
    conf = cfg.parse_text(text, PATH)
    assert conf.domains == (DomainRoute("example.net", (HostSpec("127.0.0.1", 25),), 7),)


# ---- errors: ConfigError whose str is path:line: Key: why ----

def test_unknown_key_is_an_error_naming_file_line_and_key():
    assert_located(error(ROUTE + "BackFrobnicate: yes\n"), 3, "BackFrobnicate")


def test_bad_bool_is_an_error_naming_file_line_and_key():
    assert_located(error(ROUTE + "BackAddrSubdomains: maybe\n"), 3, "BackAddrSubdomains")


def test_bad_port_is_an_error_naming_file_line_and_key():
    assert_located(error(ROUTE + "BackSMTPPort: 2x5\n"), 3, "BackSMTPPort")


def test_out_of_range_port_is_an_error():
    assert_located(error(ROUTE + "BackSMTPPort: 65536\n"), 3, "BackSMTPPort")


@pytest.mark.parametrize("value", ["soon", "0", "-1", "1s"])
def test_bad_seconds_is_an_error_naming_file_line_and_key(value):
    assert_located(error(ROUTE + f"TimeoutSMTPReply: {value}\n"), 3, "TimeoutSMTPReply")


@pytest.mark.parametrize("value", ["192.0.2.0/33", "192.0.2.300", "2001:db8::/129", "localhost"])
def test_bad_cidr_is_an_error_naming_file_line_and_key(value):
    assert_located(error(ROUTE + f"BackSkipVerify: {value}\n"), 3, "BackSkipVerify")


def test_backaddrdomain_before_any_backsmtpserver_is_an_error():
    message = error("BackAddrDomain: example.net\nBackSMTPServer: 127.0.0.1\n")
    assert_located(message, 1, "BackAddrDomain")


def test_line_without_colon_is_an_error_at_its_line():
    message = error(ROUTE + "BackSMTPPort 25\n")
    assert message.startswith(f"{PATH}:3: ") and "BackSMTPPort 25" in message


def test_percent_in_backrejecttext_is_an_error():
    assert_located(error(ROUTE + "BackRejectText: 100% unknown\n"), 3, "BackRejectText")


def test_bad_host_in_backsmtpserver_is_an_error():
    assert_located(error("BackSMTPServer: mail server!\nBackAddrDomain: example.net\n"),
                   1, "BackSMTPServer")


def test_error_names_the_file_it_was_given():
    message = error("Bogus: 1\n", path="/srv/other.conf")
    assert message.startswith("/srv/other.conf:1: Bogus: ")


def test_config_error_carries_path_and_line():
    with pytest.raises(ConfigError) as info:
        cfg.parse_text(ROUTE + "Bogus: 1\n", PATH)
    assert (info.value.path, info.value.lineno) == (PATH, 3)


# ---- a config must route something ----

def test_config_routing_no_domain_is_an_error_at_the_end_of_the_file():
    message = error("BackSMTPServer: 127.0.0.1\nBackValidAddrExp: 60\n")
    assert message.startswith(f"{PATH}:2: no domain is routed") and "BackAddrDomain" in message


def test_empty_config_is_an_error():
    assert error("# nothing here\n").startswith(f"{PATH}:1: no domain is routed")


def test_alldomains_alone_routes_every_domain():
    conf = cfg.parse_text("BackSMTPServer: 127.0.0.1\nAllDomains: yes\n", PATH)
    assert conf.all_domains_hosts == (HostSpec("127.0.0.1", 25),)


def test_alldomains_without_server_is_an_error_at_its_line():
    assert_located(error("BackSMTPPort: 25\nAllDomains: yes\n"), 2, "AllDomains")


# ---- errors that say how to mend the line ----

def test_a_near_miss_of_a_key_names_the_key_meant():
    message = error(ROUTE + "BackAddrSubdomain: yes\n")
    assert_located(message, 3, "BackAddrSubdomain")
    assert "did you mean BackAddrSubdomains?" in message
    assert "did you mean" not in error(ROUTE + "BackFrobnicate: yes\n")


def test_a_comment_after_a_value_is_an_error_that_says_comments_start_a_line():
    message = error("BackSMTPServer: 192.0.2.1   # the inner server\nBackAddrDomain: example.net\n")
    assert_located(message, 1, "BackSMTPServer")
    assert "a # comment must start its own line" in message


def test_a_port_after_the_server_is_an_error_that_names_backsmtpport():
    message = error("BackSMTPServer: 192.0.2.1:2525\nBackAddrDomain: example.net\n")
    assert_located(message, 1, "BackSMTPServer")
    assert "BackSMTPPort line" in message


# ---- keys that do nothing, or less, without another ----

def test_a_second_mailertable_line_is_ignored_as_in_the_original_with_a_warning():
    conf = parse("UseMailertable: yes\nMailertable: /etc/a\nMailertable: /etc/b\n" + HELO)
    assert conf.mailertable == "/etc/a"
    assert conf.warnings == (f"{PATH}:5: Mailertable repeats line 4; the first value is used, "
                             "as in the original",)


def test_mailertable_without_usemailertable_warns_at_its_line():
    (warning,) = parse("Mailertable: /etc/mail/mailertable\n" + HELO).warnings
    assert warning.startswith(f"{PATH}:3: Mailertable is read only with UseMailertable: yes")


@pytest.mark.parametrize("lines, lineno, key", [
    ("TimeoutSMTPReply: 20\n", 3, "TimeoutSMTPReply 20 s"),
    ("TimeoutSMTPConnect: 10\n", 3, "TimeoutSMTPConnect 10 s"),
    ("BackVerifyTimeout: 4\nTimeoutSMTPReply: 5\n", 4, "TimeoutSMTPReply 5 s"),
])
def test_a_smtp_timeout_beyond_backverifytimeout_warns_that_it_is_cut_short(lines, lineno, key):
    (warning,) = parse(lines + HELO).warnings
    assert warning.startswith(f"{PATH}:{lineno}: {key} is cut short by BackVerifyTimeout")
    assert parse("TimeoutSMTPReply: 9\n" + HELO).warnings == ()


def test_usemailertable_alone_is_accepted_by_the_config_parser():
    assert cfg.parse_text("UseMailertable: yes\n", PATH).use_mailertable is True


# ---- the original's order rules ----

def test_backsmtpport_after_backaddrdomain_does_not_change_that_domain():
    conf = parse("BackSMTPPort: 2525\n")
    assert conf.domains[0].hosts == (HostSpec("127.0.0.1", 25),)


def test_backsmtpport_applies_only_to_backaddrdomain_lines_after_it():
    conf = cfg.parse_text("BackSMTPServer: 10.0.0.1\nBackAddrDomain: a.test\n"
                          "BackSMTPPort: 2525\nBackAddrDomain: b.test\n", PATH)
    ports = {d.domain: d.hosts[0].port for d in conf.domains}
    assert ports == {"a.test": 25, "b.test": 2525}


def test_two_servers_each_route_their_own_domains():
    conf = cfg.parse_text("BackSMTPServer: 10.0.0.1\nBackAddrDomain: a.test\nBackAddrDomain: a2.test\n"
                          "BackSMTPServer: 10.0.0.2\nBackSMTPPort: 2525\nBackAddrDomain: b.test\n", PATH)
    routes = {d.domain: d.hosts for d in conf.domains}
    assert routes == {
        "a.test": (HostSpec("10.0.0.1", 25),),
        "a2.test": (HostSpec("10.0.0.1", 25),),
        "b.test": (HostSpec("10.0.0.2", 2525),),
    }


# ---- warnings for server and port lines no domain uses ----

def test_well_ordered_config_has_no_warnings():
    conf = cfg.parse_text("BackSMTPPort: 2525\nBackSMTPServer: 10.0.0.1\nBackAddrDomain: a.test\n"
                          "HeloName: mx.a.test\n", PATH)
    assert conf.warnings == ()


def test_unqualified_default_heloname_warns(monkeypatch):
    monkeypatch.setattr(cfg, "default_helo_name", lambda: "vm")
    conf = cfg.parse_text("BackSMTPServer: 10.0.0.1\nBackAddrDomain: a.test\n", PATH)
    assert any("HeloName" in w and "not fully qualified" in w for w in conf.warnings)


def test_trailing_backsmtpport_warns_naming_its_line():
    conf = parse("BackSMTPPort: 2525\n")
    assert any(w.startswith(f"{PATH}:3:") and "BackSMTPPort" in w for w in conf.warnings), conf.warnings


def test_trailing_backsmtpserver_warns_naming_its_line():
    conf = parse("BackSMTPServer: 10.0.0.9\n")
    assert any(w.startswith(f"{PATH}:3:") and "BackSMTPServer" in w for w in conf.warnings), conf.warnings


def test_backsmtpport_between_server_lines_keeps_one_failover_list():
    conf = cfg.parse_text("BackSMTPServer: 10.0.0.9\nBackSMTPPort: 26\nBackAddrDomain: a.test\n"
                          "BackSMTPServer: 10.0.0.8\nBackSMTPPort: 27\nBackSMTPServer: 10.0.0.7\n"
                          "BackAddrDomain: b.test\n", PATH)
    assert conf.domains[1].hosts == (HostSpec("10.0.0.8", 27), HostSpec("10.0.0.7", 27))
    assert not any("BackSMTPServer" in w for w in conf.warnings), conf.warnings


def test_consecutive_backsmtpserver_lines_are_an_ordered_failover_list():
    conf = cfg.parse_text("BackSMTPPort: 2525\nBackSMTPServer: 10.0.0.1\nBackSMTPServer: mx2.a.test\n"
                          "BackAddrDomain: a.test\nBackSMTPServer: 10.0.0.3\nBackAddrDomain: b.test\n",
                          PATH)
    assert [d.hosts for d in conf.domains] == [
        (HostSpec("10.0.0.1", 2525), HostSpec("mx2.a.test", 2525)), (HostSpec("10.0.0.3", 2525),)]


def test_backsmtpport_replaced_before_use_warns_naming_its_line():
    conf = cfg.parse_text("BackSMTPPort: 2525\nBackSMTPPort: 2526\n" + ROUTE, PATH)
    assert any(w.startswith(f"{PATH}:1:") and "BackSMTPPort" in w for w in conf.warnings), conf.warnings


# ---- BackSMTPServer forms ----

@pytest.mark.parametrize("value, host", [
    ("mail.example.net", "mail.example.net"),
    ("Mail.Example.NET", "mail.example.net"),
    ("mx", "mx"),
    ("192.0.2.25", "192.0.2.25"),
    ("::1", "::1"),
    ("[::1]", "::1"),
    ("[IPv6:2001:db8::25]", "2001:db8::25"),
])
def test_backsmtpserver_accepts_name_ipv4_and_ipv6_literal(value, host):
    conf = cfg.parse_text(f"BackSMTPServer: {value}\nBackAddrDomain: example.net\n", PATH)
    assert conf.domains[0].hosts == (HostSpec(host, 25),)


# ---- BackSkipVerify ----

@pytest.mark.parametrize("value", ["192.0.2.1", "192.0.2.0/24", "::1", "2001:db8::/32",
                                   "0.0.0.0/0", "::/0"])
def test_backskipverify_accepts_ipv4_ipv6_and_cidr(value):
    assert parse(f"BackSkipVerify: {value}\n").skip_verify == (ipaddress.ip_network(value),)


def test_backskipverify_ipv4_mapped_network_is_its_ipv4_network():
    """Mapped clients (::ffff:192.0.2.9) are matched as IPv4, so the rule must be IPv4 too."""
    conf = parse("BackSkipVerify: ::ffff:192.0.2.0/120\nBackSkipVerify: ::ffff:127.0.0.2\n")
    assert conf.skip_verify == (ipaddress.ip_network("192.0.2.0/24"),
                                ipaddress.ip_network("127.0.0.2/32"))


def test_backskipverify_slash_zero_covers_every_address():
    (net,) = parse("BackSkipVerify: 0.0.0.0/0\n").skip_verify
    assert ipaddress.ip_address("203.0.113.9") in net


def test_backskipverify_lines_accumulate():
    conf = parse("BackSkipVerify: 192.0.2.0/28\nBackSkipVerify: 2001:db8::/64\n")
    assert conf.skip_verify == (ipaddress.ip_network("192.0.2.0/28"), ipaddress.ip_network("2001:db8::/64"))


# ---- list defaults only when none given ----

def test_backskipdaemon_replaces_the_msa_default():
    assert "MSA" not in parse("BackSkipDaemon: ORIG\n").skip_daemons


def test_backskipdaemon_lines_accumulate():
    assert parse("BackSkipDaemon: ORIG\nBackSkipDaemon: MSA-v6\n").skip_daemons == ("ORIG", "MSA-v6")


def test_backskiprecipient_replaces_the_postmaster_default():
    assert parse("BackSkipRecipient: abuse\n").skip_recipients == ("abuse",)


# ---- probe sender ----

def test_probe_sender_defaults_to_postmaster_backscatter_at_heloname():
    assert parse("HeloName: mx.example.org\n").probe_sender == "postmaster+backscatter@mx.example.org"


def test_backmailfrom_null_sender_gives_empty_probe_sender():
    conf = parse(HELO + "BackMailFrom: <>\n")
    assert (conf.mail_from, conf.probe_sender) == ("", "")


def test_backmailfrom_sets_probe_sender():
    assert parse(HELO + "BackMailFrom: <probe@example.org>\n").probe_sender == "probe@example.org"


def test_backmailfrom_with_space_is_an_error():
    assert_located(error(ROUTE + "BackMailFrom: a b@example.org\n"), 3, "BackMailFrom")


# ---- load() ----

def test_load_of_missing_file_is_config_error(tmp_path):
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError) as info:
        cfg.load(missing)
    assert str(info.value).startswith(missing)


def test_load_reads_the_file(tmp_path):
    path = tmp_path / "scam.conf"
    path.write_text(ROUTE + "BackValidAddrExp: 77\n")
    conf = cfg.load(str(path))
    assert (conf.path, conf.valid_ttl) == (str(path), 77)


def test_load_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "scam.conf"
    path.write_text(ROUTE + "BackSMTPPort: 2x5\n")
    with pytest.raises(ConfigError) as info:
        cfg.load(str(path))
    assert str(info.value).startswith(f"{path}:3: BackSMTPPort: ")


ORIGINAL_SAMPLE = """\
BackSMTPServer:192.168.0.2
BackAddrDomain:example.net
BackSMTPServer:192.0.2.2
BackAddrDomain:example.org
BackSMTPPort:25
BackValidAddrExp:86400
BackInvalidAddrExp:3000
BackAddrSubdomains:Yes
BackList:/var/spool/scam/backscatter.txt
TimeoutSMTPconnect:2
TimeoutSMTPreply:3
BackSkipDaemon:MSA
BackSkipDaemon:MSA-v6
BackSkipVerify:127.0.0.1
BackSkipVerify:192.0.2.2
BackSkipVerify:192.0.2.32/28
BackErrorTempfail:No
Mailertable:/etc/mail/mailertable
"""


def test_the_original_documentations_settings_all_load():
    """Every line the original's documentation shows, in its own spelling, is understood."""
    config = cfg.parse_text(ORIGINAL_SAMPLE, "/etc/mail/scam.conf")
    assert [(d.domain, d.hosts[0].host, d.hosts[0].port) for d in config.domains] == [
        ("example.net", "192.168.0.2", 25), ("example.org", "192.0.2.2", 25)]
    assert (config.subdomains, config.timeout_connect, config.timeout_reply) == (True, 2.0, 3.0)
    assert config.backlist == "/var/spool/scam/backscatter.txt"
    assert config.skip_daemons == ("MSA", "MSA-v6") and len(config.skip_verify) == 3
    assert config.error_tempfail is False and config.mailertable == "/etc/mail/mailertable"


@pytest.mark.parametrize("value,sent", [("MX1.Example.NET", "MX1.Example.NET"),
                                        ("192.0.2.1", "[192.0.2.1]"),
                                        ("2001:db8::1", "[IPv6:2001:db8::1]")])
def test_heloname_keeps_its_case_and_brackets_ip_literals(value, sent):
    config = cfg.parse_text(f"AllDomains: yes\nBackSMTPServer: 127.0.0.1\nHeloName: {value}\n", "/c")
    assert config.helo_name == sent
    assert config.probe_sender == f"postmaster+backscatter@{sent}"


def test_latin1_config_file_loads(tmp_path):
    path = tmp_path / "scam.conf"
    path.write_bytes(b"# Serveur de messagerie \xe9tabli\nBackSMTPServer: 127.0.0.1\n"
                     b"BackAddrDomain: example.net\n")
    assert cfg.load(str(path)).domains[0].domain == "example.net"


# ---- issue 6 keys: admin, statistics, shared cache, report-only ----

@pytest.mark.parametrize("field, default", [
    ("shared_cache", None), ("cache_password_file", None), ("cache_timeout", 0.05),
    ("control_socket", None), ("stats_interval", 3600), ("stats_listen", None), ("dry_run", False),
])
def test_operations_keys_default(field, default):
    assert getattr(parse(""), field) == default


@pytest.mark.parametrize("line, field, value", [
    ("BackCache: redis://127.0.0.1:6379/0", "shared_cache", "redis://127.0.0.1:6379/0"),
    ("BackCache: rediss://:secret@redis.example.net", "shared_cache", "rediss://:secret@redis.example.net"),
    ("BackCache: redis://[::1]:6380/2", "shared_cache", "redis://[::1]:6380/2"),
    ("BackCachePasswordFile: /etc/mail/redis.pass", "cache_password_file", "/etc/mail/redis.pass"),
    ("BackCacheTimeout: 0.2", "cache_timeout", 0.2),
    ("ControlSocket: /run/scam/ctl", "control_socket", "/run/scam/ctl"),
    ("StatsInterval: 0", "stats_interval", 0),
    ("StatsListen: 127.0.0.1:9108", "stats_listen", ("127.0.0.1", 9108)),
    ("StatsListen: [::1]:9108", "stats_listen", ("::1", 9108)),
    ("BackDryRun: yes", "dry_run", True),
])
def test_operations_key_sets_its_value(line, field, value):
    assert getattr(parse(line + "\n"), field) == value


@pytest.mark.parametrize("line, key", [
    ("BackCache: http://127.0.0.1:6379", "BackCache"),
    ("BackCache: redis://127.0.0.1:99999/0", "BackCache"),
    ("BackCacheTimeout: 0", "BackCacheTimeout"),
    ("StatsListen: localhost:9108", "StatsListen"),
    ("StatsListen: 127.0.0.1", "StatsListen"),
    ("StatsInterval: soon", "StatsInterval"),
    ("BackDryRun: maybe", "BackDryRun"),
])
def test_bad_operations_value_is_located(line, key):
    assert_located(error(ROUTE + line + "\n"), ROUTE.count("\n") + 1, key)


def test_password_never_shown_in_features():
    config = parse("BackCache: redis://:hunter2@127.0.0.1:6379/0\n")
    assert "hunter2" not in "\n".join(config.features())
    assert "redis://***@127.0.0.1:6379/0" in config.shared_cache_shown


def test_non_loopback_stats_listen_warns_with_its_line():
    config = parse("StatsListen: 192.0.2.1:9108\n")
    assert any(":3: StatsListen 192.0.2.1" in w for w in config.warnings), config.warnings


def test_where_names_the_line_of_a_key():
    config = parse("ControlSocket: /x/ctl\n")
    assert config.where("control_socket") == f"{PATH}:3"
    assert config.where("stats_listen") == PATH


# ---- issue 7 keys: accept-all checks, STARTTLS, LMTP ----

@pytest.mark.parametrize("line, field, value", [
    ("BackCatchAllCheck: 3600", "catchall_check", 3600),
    ("BackCatchAllCheck: 0", "catchall_check", 0),
    ("BackTLS: MAY", "tls", "may"),
    ("BackTLS: verify", "tls", "verify"),
    ("BackTLSCAFile: /etc/ssl/inner-ca.pem", "tls_ca_file", "/etc/ssl/inner-ca.pem"),
    ("BackProtocol: LMTP", "protocol", "lmtp"),
])
def test_smarter_key_sets_its_value(line, field, value):
    assert getattr(parse(line + "\n"), field) == value


def test_smarter_defaults():
    config = parse("")
    assert (config.catchall_check, config.tls, config.tls_ca_file, config.protocol) == \
        (21600, "no", None, "smtp")


@pytest.mark.parametrize("line, key", [
    ("BackTLS: yes", "BackTLS"), ("BackProtocol: esmtp", "BackProtocol"),
    ("BackCatchAllCheck: -1", "BackCatchAllCheck"),
])
def test_bad_smarter_value_is_located(line, key):
    assert_located(error(ROUTE + line + "\n"), 3, key)


def test_ca_file_without_tls_warns():
    assert any("BackTLSCAFile is used only with" in w for w in parse("BackTLSCAFile: /x.pem\n").warnings)
