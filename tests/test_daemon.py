"""The real scam-back process: flags, start-up checks, privilege drop, milter protocol, cache file."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import IS_ROOT, RUN_USER, Daemon, backend_conf, run_cli
from .milterclient import P_NOBODY, P_NODATA, P_NOEOH, P_NOHDRS, P_NOUNKNOWN, MilterClient

CLIENT_IP = "192.0.2.10"


def ask(daemon: Daemon, *recipients: str, ip: str = CLIENT_IP, daemon_name: str = "MTA"):
    """One SMTP connection's worth of milter traffic; returns the reply per recipient."""
    with MilterClient(daemon.address, timeout=20) as client:
        client.negotiate()
        client.connect("client.test", "inet", ip, 4321, macros={"{daemon_name}": daemon_name})
        client.mail("<sender@elsewhere.test>", macros={"i": "Q1"})
        replies = [client.rcpt(f"<{r}>", macros={"{rcpt_addr}": r}) for r in recipients]
        client.quit()
    return replies


def test_known_user_continues_unknown_gets_550_5_1_1(backend, daemon_factory):
    daemon = daemon_factory(backend_conf(backend))
    good, bad = ask(daemon, "good@example.net", "bad@example.net")
    assert good.action == "continue"
    assert bad.action == "replycode" and bad.text == "550 5.1.1 User unknown"
    assert "RCPT TO:<bad@example.net>" in backend.transcript
    assert "verdict=invalid" in daemon.log() and "rcpt=<bad@example.net>" in daemon.log()


def test_second_connection_is_answered_from_the_cache(backend, daemon_factory):
    daemon = daemon_factory(backend_conf(backend))
    ask(daemon, "good@example.net", "bad@example.net")
    backend.wait_line("QUIT")
    backend.clear()
    good, bad = ask(daemon, "GOOD@example.net", "bad@example.net")
    assert good.action == "continue" and bad.text == "550 5.1.1 User unknown"
    assert backend.connections == 0


def test_negotiates_away_headers_body_data_and_unknown(backend, daemon_factory):
    daemon = daemon_factory(backend_conf(backend))
    with MilterClient(daemon.address, timeout=20) as client:
        client.negotiate()
        for bit in (P_NOHDRS, P_NOBODY, P_NOEOH, P_NODATA, P_NOUNKNOWN):
            assert client.protocol & bit, hex(bit)
        client.quit()


def test_sigterm_saves_the_cache_removes_the_pidfile_and_restart_uses_it(backend, daemon_factory):
    daemon = daemon_factory(backend_conf(backend))
    ask(daemon, "good@example.net", "bad@example.net")
    assert daemon.terminate() == 0
    assert not os.path.exists(daemon.pidfile)
    lines = Path(daemon.cachefile).read_text().splitlines()
    assert {line.split()[0] + " " + line.split()[1] for line in lines} == {
        "0 good@example.net", "1 bad@example.net"}
    assert all(len(line.split()) == 3 and line.split()[2].isdigit() for line in lines)
    assert oct(os.stat(daemon.cachefile).st_mode & 0o777) == "0o600"
    backend.stop()              # the backend is gone: only the cache can answer now
    daemon.start()
    good, bad = ask(daemon, "good@example.net", "bad@example.net")
    assert good.action == "continue" and bad.text == "550 5.1.1 User unknown"


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT], ids=["SIGHUP", "SIGINT"])
def test_sighup_and_sigint_stop_it_like_sigterm_saving_the_cache(backend, daemon_factory, sig):
    """As the original: smfi_main returns on SIGHUP and SIGINT too, and the cache is saved."""
    daemon = daemon_factory(backend_conf(backend))
    ask(daemon, "good@example.net", "bad@example.net")
    assert daemon.terminate(sig=sig) == 0
    assert not os.path.exists(daemon.pidfile)
    lines = Path(daemon.cachefile).read_text().splitlines()
    assert {" ".join(line.split()[:2]) for line in lines} == {"0 good@example.net",
                                                              "1 bad@example.net"}


def test_original_format_cache_file_loads(backend, daemon_factory, tmp_path):
    daemon = Daemon(backend_conf(backend) + "BackErrorTempfail: yes\n")
    Path(daemon.cachefile).write_text("0 old-good@example.net\n1 old-bad@example.net\n7 junk\n")
    try:
        daemon.start()
        backend.stop()
        good, bad = ask(daemon, "old-good@example.net", "old-bad@example.net")
        assert good.action == "continue" and bad.text == "550 5.1.1 User unknown"
        assert "1 malformed" in daemon.log()
    finally:
        daemon.stop()


def test_periodic_save_writes_the_cache_while_running(backend, daemon_factory):
    daemon = daemon_factory(backend_conf(backend, "BackListSaveInterval: 1\n"))
    ask(daemon, "bad@example.net")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not os.path.exists(daemon.cachefile):
        time.sleep(0.1)
    assert "1 bad@example.net" in Path(daemon.cachefile).read_text()
    assert daemon.alive()


def test_pidfile_is_written_in_the_foreground(backend, daemon_factory):
    daemon = daemon_factory(backend_conf(backend))
    assert int(Path(daemon.pidfile).read_text()) == daemon.proc.pid


def test_detach_forks_into_the_background(backend, daemon_factory):
    daemon = daemon_factory(backend_conf(backend), detach=True)
    assert daemon.proc.wait(10) == 0
    assert daemon.pid != daemon.proc.pid and daemon.alive()
    status = Path(f"/proc/{daemon.pid}/status").read_text()
    assert f"PPid:\t{daemon.proc.pid}\n" not in status and f"PPid:\t{os.getpid()}\n" not in status
    assert os.readlink(f"/proc/{daemon.pid}/cwd") == "/"
    assert ask(daemon, "bad@example.net")[0].text == "550 5.1.1 User unknown"


@pytest.mark.skipif(not IS_ROOT, reason="privilege drop needs root; CI runs as root")
def test_drops_to_the_user_and_its_groups_only(backend, daemon_factory):
    daemon = daemon_factory(backend_conf(backend))
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{daemon.pid}/status").read_text().splitlines())
    import pwd
    entry = pwd.getpwnam(RUN_USER)
    assert status["Uid"].split() == [str(entry.pw_uid)] * 4
    assert status["Gid"].split()[0] == str(entry.pw_gid)
    assert "0" not in status["Groups"].split()


@pytest.mark.skipif(not IS_ROOT, reason="the root refusal needs root; CI runs as root")
def test_refuses_to_serve_as_root(backend, tmp_path):
    conf = tmp_path / "scam.conf"
    conf.write_text(backend_conf(backend))
    result = run_cli("-p", f"unix:{tmp_path}/s.sock", "-f", str(conf), "-P", str(tmp_path / "p"))
    assert result.returncode != 0
    assert "root" in result.stderr and "-u" in result.stderr
    assert not os.path.exists(tmp_path / "s.sock")


def test_starts_when_its_parent_is_pid_1(backend, daemon_factory):
    """Weakness 16: the original exited silently under systemd or as a container's child."""
    daemon = Daemon(backend_conf(backend))
    with open(daemon.conf, "w") as handle:
        handle.write(daemon.conf_text)
    command = " ".join(f"'{a}'" for a in daemon.args())
    subprocess.run(["setsid", "sh", "-c", f"{command} >>'{daemon.logpath}' 2>&1 &"], timeout=10,
                   check=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not os.path.exists(daemon.socket):
            time.sleep(0.05)
        daemon.pid = int(Path(daemon.pidfile).read_text())
        assert "PPid:\t1\n" in Path(f"/proc/{daemon.pid}/status").read_text()
        assert ask(daemon, "bad@example.net")[0].text == "550 5.1.1 User unknown"
    finally:
        daemon.stop()


def test_config_check_flag(backend, tmp_path):
    good = tmp_path / "good.conf"
    good.write_text(backend_conf(backend))
    assert run_cli("-t", "-f", str(good)).returncode == 0
    bad = tmp_path / "bad.conf"
    bad.write_text("BackSMTPServer: 127.0.0.1\nBackSMTPPort: 2x5\nBackAddrDomain: example.net\n")
    result = run_cli("-t", "-f", str(bad))
    assert result.returncode == 78
    assert f'{bad}:2: BackSMTPPort: not a port number: "2x5"' in result.stderr


def test_bad_config_stops_start_up_before_detaching(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("BackSMTPServer: 127.0.0.1\nBackAddrDomain: example.net\nNoSuchKey: 1\n")
    result = run_cli("-p", f"unix:{tmp_path}/s.sock", "-f", str(bad), "-P", str(tmp_path / "p.pid"),
                     "-u", RUN_USER, "-D")
    assert result.returncode == 78
    assert f"{bad}:3: NoSuchKey: unknown key" in result.stderr
    assert not os.path.exists(tmp_path / "p.pid")


def test_config_routing_no_domain_is_refused(tmp_path):
    conf = tmp_path / "scam.conf"
    conf.write_text("BackSMTPServer: 127.0.0.1\n")
    result = run_cli("-t", "-f", str(conf))
    assert result.returncode == 78 and "no domain is routed" in result.stderr


def test_unknown_flag_prints_usage_and_exits_64():
    result = run_cli("-x")
    assert result.returncode == 64 and "usage: scam-back" in result.stderr


def test_help_prints_usage_and_features_and_exits_0(backend, tmp_path):
    conf = tmp_path / "scam.conf"
    conf.write_text(backend_conf(backend, "BitBucket: yes\n"))
    result = run_cli("-h", "-f", str(conf))
    assert result.returncode == 0
    assert "usage: scam-back" in result.stdout and "BitBucket: yes" in result.stdout
    assert "CPUAffinity: auto" in result.stdout


def test_empty_socket_is_a_usage_error():
    assert run_cli("-p", "").returncode == 64


def test_unknown_user_is_refused(backend, tmp_path):
    conf = tmp_path / "scam.conf"
    conf.write_text(backend_conf(backend))
    result = run_cli("-p", f"unix:{tmp_path}/s.sock", "-f", str(conf), "-u", "no-such-user-xyz")
    assert result.returncode == 67 and "no such user" in result.stderr


def test_inet_socket_works(backend, tmp_path):
    import socket as socketmod
    with socketmod.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = Daemon(backend_conf(backend))
    try:
        with open(daemon.conf, "w") as handle:
            handle.write(daemon.conf_text)
        args = [a if a != daemon.address else f"inet:{port}@127.0.0.1" for a in daemon.args()]
        daemon.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not os.path.exists(daemon.pidfile):
            time.sleep(0.05)
        daemon.pid = int(Path(daemon.pidfile).read_text())
        for _ in range(100):
            try:
                with MilterClient(f"inet:{port}@127.0.0.1", timeout=5) as client:
                    client.negotiate()
                    client.quit()
                break
            except Exception:
                time.sleep(0.05)
        daemon.socket = ""
        reply = None
        with MilterClient(f"inet:{port}@127.0.0.1", timeout=20) as client:
            client.negotiate()
            client.connect("c", "inet", CLIENT_IP, 1)
            client.mail("<s@x.test>")
            reply = client.rcpt("<bad@example.net>", macros={"{rcpt_addr}": "bad@example.net"})
            client.quit()
        assert reply.text == "550 5.1.1 User unknown"
    finally:
        daemon.stop()



def test_bitbucket_through_libmilter_removes_invalid_recipients_at_end_of_message(backend,
                                                                                   daemon_factory):
    daemon = daemon_factory(backend_conf(backend, "BitBucket: yes\n"))
    assert "BitBucket is on" in daemon.log()
    with MilterClient(daemon.address, timeout=20) as client:
        client.negotiate()
        client.connect("client.test", "inet", CLIENT_IP, 4321)
        client.mail("<sender@elsewhere.test>")
        for address in ("good@example.net", "bad@example.net", "bad@example.net"):
            assert client.rcpt(f"<{address}>", macros={"{rcpt_addr}": address}).is_continue
        result = client.eom()
        client.quit()
    assert result.actions == [("delrcpt", "bad@example.net")]


def test_tempfail_reply_does_not_stick_to_the_next_recipient(backend, daemon_factory):
    """Weakness 9: a stale 451 could be left on the context after a CONTINUE."""
    backend.set_rcpt_reply("grey@example.net", "450 4.2.0 greylisted")
    daemon = daemon_factory(backend_conf(backend, "BackErrorTempfail: yes\n"))
    grey, good = ask(daemon, "grey@example.net", "good@example.net")
    assert grey.text.startswith("451 4.4.3 ")
    assert good.action == "continue"


@pytest.mark.skipif(not IS_ROOT, reason="-g needs root to change groups; CI runs as root")
def test_group_flag_sets_the_group_and_a_group_writable_socket(backend, daemon_factory):
    import grp
    daemon = daemon_factory(backend_conf(backend), "-g", "nogroup")
    status = Path(f"/proc/{daemon.pid}/status").read_text()
    gid = grp.getgrnam("nogroup").gr_gid
    assert f"Gid:\t{gid}\t" in status
    assert os.stat(daemon.socket).st_mode & 0o777 == 0o660


def test_second_instance_with_the_same_pidfile_is_refused(backend, daemon_factory):
    first = daemon_factory(backend_conf(backend))
    second = Daemon(backend_conf(backend))
    try:
        second.pidfile = first.pidfile
        with open(second.conf, "w") as handle:
            handle.write(second.conf_text)
        result = run_cli(*second.flags())
        assert result.returncode == 73 and "another scam-back" in result.stderr
        assert first.alive()
    finally:
        second.stop()


def test_unwritable_pidfile_in_the_foreground_only_warns(backend, daemon_factory):
    daemon = Daemon(backend_conf(backend))
    daemon.pidfile = "/nonexistent-dir/sub/scam-back.pid"
    try:
        with open(daemon.conf, "w") as handle:
            handle.write(daemon.conf_text)
        daemon.proc = subprocess.Popen(daemon.args(), stdin=subprocess.DEVNULL,
                                       stdout=open(daemon.logpath, "ab"), stderr=subprocess.STDOUT)
        daemon.pid = daemon.proc.pid
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not os.path.exists(daemon.socket):
            time.sleep(0.05)
        assert "serving without a pid file" in daemon.log()
        assert ask(daemon, "bad@example.net")[0].text == "550 5.1.1 User unknown"
    finally:
        daemon.stop()


@pytest.mark.skipif(not IS_ROOT, reason="creating the run directory needs root; CI runs as root")
def test_missing_pidfile_directory_is_created_for_the_user(backend):
    import pwd
    import shutil
    import tempfile
    parent = tempfile.mkdtemp(prefix="scam-back-run-")
    os.chmod(parent, 0o755)
    daemon = Daemon(backend_conf(backend))
    try:
        daemon.pidfile = os.path.join(parent, "run", "s.pid")
        daemon.start()
        run_dir = os.path.join(parent, "run")
        assert os.stat(run_dir).st_uid == pwd.getpwnam(RUN_USER).pw_uid
        assert os.path.exists(os.path.join(run_dir, "s.pid"))
        daemon.terminate()
        assert not os.path.exists(os.path.join(run_dir, "s.pid"))
    finally:
        daemon.stop()
        shutil.rmtree(parent, ignore_errors=True)


def test_detach_reports_a_bad_socket_before_detaching(backend, tmp_path):
    conf = tmp_path / "scam.conf"
    conf.write_text(backend_conf(backend))
    user = ["-u", RUN_USER] if IS_ROOT else []
    result = run_cli("-p", "unix:/nonexistent-dir/s.sock", "-f", str(conf), "-P",
                     str(tmp_path / "p.pid"), *user, "-D")
    assert result.returncode != 0 and "/nonexistent-dir" in result.stderr


def test_detach_reports_a_port_in_use_before_detaching(backend, tmp_path):
    import socket as socketmod
    from .conftest import user_dir
    run_dir = user_dir()
    conf = Path(run_dir) / "scam.conf"
    conf.write_text(backend_conf(backend))
    with socketmod.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        user = ["-u", RUN_USER] if IS_ROOT else []
        result = run_cli("-p", f"inet:{port}@127.0.0.1", "-f", str(conf), "-P",
                         f"{run_dir}/p.pid", *user, "-D")
    assert result.returncode == 71 and "cannot open milter socket" in result.stderr
    assert not os.path.exists(f"{run_dir}/p.pid")


def test_unknown_address_family_through_libmilter_is_accepted_not_crashed(backend, daemon_factory):
    """Weakness 12: the original crashed (SIGSEGV) on a connection of unknown family."""
    daemon = daemon_factory(backend_conf(backend))
    with MilterClient(daemon.address, timeout=20) as client:
        client.negotiate()
        assert client.connect("localhost", "unknown").action == "accept"
        client.quit()
    with MilterClient(daemon.address, timeout=20) as client:
        client.negotiate()
        assert client.connect("localhost", "unix", "/var/run/sock").action == "accept"
        client.quit()
    assert ask(daemon, "bad@example.net")[0].text == "550 5.1.1 User unknown"


def test_loglevel_debug_in_the_config_logs_the_backend_dialogue(backend, daemon_factory):
    daemon = daemon_factory(backend_conf(backend, "LogLevel: debug\n"))
    ask(daemon, "good@example.net")
    assert ">>> RCPT TO:<good@example.net>" in daemon.log() and "<<< 250" in daemon.log()


def test_loglevel_info_does_not_log_the_backend_dialogue(backend, daemon_factory):
    daemon = daemon_factory(backend_conf(backend))
    ask(daemon, "good@example.net")
    assert "verdict=valid" in daemon.log() and ">>> RCPT" not in daemon.log()


@pytest.mark.parametrize("bitbucket", [False, True])
def test_end_of_message_and_abort_reach_python_only_with_bitbucket(monkeypatch, bitbucket):
    """Issue 5: without BitBucket the end-of-message and abort callbacks are unset, so libmilter
    answers them itself and never takes the GIL for them; pymilter's setters are put back."""
    import Milter
    import milter as libmilter
    from scam_back import daemon as daemonmod
    given: dict = {"eom": [], "abort": []}
    monkeypatch.setattr(libmilter, "set_eom_callback", given["eom"].append)
    monkeypatch.setattr(libmilter, "set_abort_callback", given["abort"].append)
    recorders = (libmilter.set_eom_callback, libmilter.set_abort_callback)

    def fake_runmilter(name, socket_spec, timeout):  # as pymilter's runmilter sets its callbacks
        libmilter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
        libmilter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    monkeypatch.setattr(Milter, "runmilter", fake_runmilter)
    daemonmod.run_milter("unix:/nonexistent/x.sock", 10, end_of_message=bitbucket)
    for step in ("eom", "abort"):
        assert len(given[step]) == 1 and (given[step][0] is not None) is bitbucket, step
    assert (libmilter.set_eom_callback, libmilter.set_abort_callback) == recorders
