"""CPUAffinity: every thread of the daemon, libmilter's included, on one CPU (or where told)."""

from __future__ import annotations

import os

import pytest

from scam_back import placement
from scam_back.config import ConfigError

from .conftest import backend_conf, make_config, run_cli
from .milterclient import MilterClient

ALLOWED = set(os.sched_getaffinity(0))


def test_auto_takes_the_last_allowed_cpu_and_leaves_a_single_one_alone():
    assert placement.choose("auto", {0, 1, 3}) == 3
    assert placement.choose("auto", {2}) is None
    assert placement.choose("auto", set()) is None       # a system that cannot pin


def test_all_leaves_placement_to_the_kernel_and_a_number_is_that_cpu():
    assert placement.choose("all", {0, 1}) is None
    assert placement.choose("1", {0, 1}) == 1


def test_a_cpu_the_process_may_not_use_is_refused_with_the_choice():
    with pytest.raises(ValueError, match=r"CPUAffinity 5: not a CPU this process may use "
                                         r"\(allowed: 0, 1\); give one of them, or auto"):
        placement.choose("5", {0, 1})
    with pytest.raises(ValueError, match="cannot pin threads to a CPU; use CPUAffinity: all"):
        placement.choose("0", set())


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("ALL", "all"), ("1", "1"),
                                         ("007", "7")])
def test_the_key_takes_auto_all_or_a_number(text, value):
    assert make_config(f"BackSMTPServer: 127.0.0.1\nBackAddrDomain: a.test\n"
                       f"CPUAffinity: {text}\n").cpu_affinity == value
    assert make_config("BackSMTPServer: 127.0.0.1\nBackAddrDomain: a.test\n").cpu_affinity == "auto"


def test_a_bad_value_names_the_line_and_the_choices():
    with pytest.raises(ConfigError, match=r'/test/scam.conf:3: CPUAffinity: must be auto, all or '
                                          r'a CPU number: "two"'):
        make_config("BackSMTPServer: 127.0.0.1\nBackAddrDomain: a.test\nCPUAffinity: two\n")


def test_config_check_refuses_a_cpu_not_allowed_with_file_and_line(backend, tmp_path):
    conf = tmp_path / "scam.conf"
    conf.write_text(backend_conf(backend, "CPUAffinity: 4095\n"))
    result = run_cli("-t", "-f", str(conf))
    assert result.returncode == 78
    assert f"{conf}:9: CPUAffinity 4095: not a CPU this process may use" in result.stderr


def thread_cpus(pid: int) -> dict[int, set[int]]:
    """Each thread of a process and the CPUs it may run on."""
    cpus = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            cpus[int(tid)] = set(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:
            pass
    return cpus


def serving_threads(daemon) -> dict[int, set[int]]:
    """The daemon's threads while a milter connection is open (libmilter's worker included)."""
    with MilterClient(daemon.address, timeout=20) as client:
        client.negotiate()
        client.connect("client.test", "inet", "192.0.2.10", 4321)
        client.mail("<sender@elsewhere.test>")
        assert client.rcpt("<good@example.net>", macros={"{rcpt_addr}": "good@example.net"}
                           ).action == "continue"
        threads = thread_cpus(daemon.pid)
        client.quit()
    return threads


@pytest.mark.parametrize("setting", ["default", "auto", "lowest"])
def test_every_thread_serves_on_one_cpu(backend, daemon_factory, setting):
    extra = {"default": "", "auto": "CPUAffinity: auto\n",
             "lowest": f"CPUAffinity: {min(ALLOWED)}\n"}[setting]
    daemon = daemon_factory(backend_conf(backend, extra))
    threads = serving_threads(daemon)
    cpu = min(ALLOWED) if setting == "lowest" else max(ALLOWED)
    assert len(threads) > 3            # main, libmilter's listener and worker, ours
    assert all(cpus == {cpu} for cpus in threads.values()), threads
    assert f"on CPU {cpu})" in daemon.log() or (len(ALLOWED) == 1 and setting != "lowest")


def test_all_leaves_every_thread_on_every_allowed_cpu(backend, daemon_factory):
    daemon = daemon_factory(backend_conf(backend, "CPUAffinity: all\n"))
    threads = serving_threads(daemon)
    assert all(cpus == ALLOWED for cpus in threads.values()), threads
    assert "on any CPU)" in daemon.log()
