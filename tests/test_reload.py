"""Reloader: a good new config is taken at once, a bad one refused with file:line, changes noticed."""

from __future__ import annotations

import os

import pytest

from scam_back import routing
from scam_back.cache import VerdictCache
from scam_back.reload import Reloader, ReloadError
from scam_back.verdict import Kind
from scam_back.verifier import Verifier



def write(path, text: str) -> None:
    path.write_text(text)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))   # a visible change


@pytest.fixture
def setup(tmp_path, backend):
    conf = tmp_path / "scam.conf"
    base = (f"BackSMTPPort: {backend.port}\nBackSMTPServer: 127.0.0.1\nBackAddrDomain: example.net\n"
            "HeloName: mx.test.example\nTimeoutSMTPConnect: 1\nTimeoutSMTPReply: 1\n"
            "BackCatchAllCheck: 0\n")
    conf.write_text(base)
    config, router, _ = routing.load(str(conf))
    cache = VerdictCache(config.valid_ttl, config.invalid_ttl)
    verifier = Verifier(config, router, cache)
    return conf, base, verifier, Reloader(config, verifier)


def test_a_new_domain_is_verified_after_reload(setup, backend):
    conf, base, verifier, reloader = setup
    assert verifier.verify("<good@b.test>").kind is Kind.SKIPPED
    write(conf, base + "BackAddrDomain: b.test\nBackValidAddrExp: 77\n")
    lines = reloader.reload()
    assert lines[-1] == f"reloaded {conf}"
    assert verifier.verify("<b2@b.test>").kind is Kind.VALID
    assert verifier.cache.valid_ttl == 77


def test_a_bad_config_is_refused_and_the_old_one_serves(setup, backend):
    conf, base, verifier, reloader = setup
    verifier.verify("<good@example.net>")
    write(conf, base + "BackValidAddrExp: forever\n")
    with pytest.raises(ReloadError) as info:
        reloader.reload()
    assert f"{conf}:8: BackValidAddrExp" in str(info.value)
    assert verifier.verify("<bad@example.net>").kind is Kind.INVALID
    assert verifier.config.valid_ttl == 86400


def test_restart_only_keys_are_kept_and_named(setup):
    conf, base, verifier, reloader = setup
    write(conf, base + "BackCacheMax: 5000\nBitBucket: yes\nCPUAffinity: all\n")
    lines = reloader.reload()
    assert any("BackCacheMax changed" in line for line in lines)
    assert any("BitBucket changed" in line for line in lines)
    assert any("CPUAffinity changed: it takes effect at the next restart" in line
               for line in lines)
    assert verifier.config.cache_max == 1_000_000 and verifier.config.bitbucket is False
    assert verifier.config.cpu_affinity == "auto"


def test_check_reloads_only_when_a_file_changed(setup, backend, tmp_path):
    conf, base, verifier, reloader = setup
    reloader.check()
    assert verifier.verify("<good@b.test>").kind is Kind.SKIPPED
    table = tmp_path / "mailertable"
    table.write_text(f"b.test esmtp:[127.0.0.1]:{backend.port}\n")
    write(conf, base + f"UseMailertable: yes\nMailertable: {table}\n")
    reloader.check()
    assert verifier.verify("<b2@b.test>").kind is Kind.VALID
    write(table, f"c.test esmtp:[127.0.0.1]:{backend.port}\n")   # the table alone changes
    reloader.check()
    assert verifier.verify("<x@c.test>").kind is Kind.INVALID
    assert verifier.verify("<new@b.test>").kind is Kind.SKIPPED


def test_a_refused_change_is_not_retried_until_the_files_change_again(setup, caplog):
    conf, base, verifier, reloader = setup
    write(conf, base + "Nonsense: 1\n")
    reloader.check()
    reloader.check()
    refusals = [r for r in caplog.records if "reload refused" in r.getMessage()]
    assert len(refusals) == 1


def test_pooled_sessions_opened_with_old_settings_are_not_reused(setup, backend):
    conf, base, verifier, reloader = setup
    verifier.verify("<good@example.net>")
    assert verifier.pool.idle_count() == 1
    write(conf, base.replace("HeloName: mx.test.example", "HeloName: mx2.test.example"))
    reloader.reload()
    assert verifier.pool.idle_count() == 0
    verifier.verify("<bad@example.net>")
    assert backend.transcript.count("EHLO mx2.test.example") == 1


def test_a_reload_that_keeps_backmaxprobes_keeps_the_probe_gate(setup):
    conf, base, verifier, reloader = setup
    gate = verifier.gate
    write(conf, base + "BackValidAddrExp: 500\n")
    reloader.reload()
    assert verifier.gate is gate
    write(conf, base + "BackMaxProbes: 3\n")
    reloader.reload()
    assert verifier.gate is not gate and verifier.gate.max_probes == 3
