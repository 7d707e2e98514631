"""End to end with a real Postfix: SMTP client (smtplib) -> private Postfix -> scam-back -> backend.

One private Postfix instance, three scam-back daemons and two backends serve the whole module:

- the MTA listener (PostfixInstance.port): smtpd_milters = the main scam-back, which verifies
  example.net at the main backend and down.example at a port where nothing listens;
- "submission": the same milter, with `-o milter_macro_daemon_name=MSA`;
- "backend_tempfail": a scam-back with BackErrorTempfail: yes;
- "milter_down_accept" / "milter_down_tempfail": a milter socket nobody listens on, with
  milter_default_action accept and tempfail;
- "restart": a scam-back of its own, SIGTERMed and restarted in one test, with its own backend
  for restart.example that the test stops;
- "transport": a scam-back whose only routing is `TransportMap:` naming the very transport file
  Postfix uses, which sends transport.example to the main backend;
- "bitbucket": a scam-back with BitBucket: yes (unknown recipients accepted, then removed at
  end of message).

Postfix delivers example.net to the main backend (relay_transport), and by transport_maps
down.example to the dead port and restart.example to the restart backend.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pytest

from .conftest import Daemon
from .postfix import PostfixInstance, postfix_available
from .smtpbackend import Backend, refused_port

AVAILABLE, WHY_NOT = postfix_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY_NOT)

SENDER = "sender@client.test"
HELO_NAME = "scam-back.test"
PROBE_MAIL = f"MAIL FROM:<postmaster+backscatter@{HELO_NAME}>"
DELIVERY_TIMEOUT = 20.0
_serial = itertools.count(1)


def unique(local: str, domain: str = "example.net") -> str:
    """A fresh address, so no test sees another test's cache entries."""
    return f"{local}-{os.getpid()}-{next(_serial)}@{domain}"


def milter_conf(main_port: int, dead_port: int, extra: str = "") -> str:
    """scam-back config: example.net at the backend, down.example at a dead port."""
    return (f"HeloName: {HELO_NAME}\nBackSMTPServer: 127.0.0.1\n"
            f"BackSMTPPort: {main_port}\nBackAddrDomain: example.net\n"
            f"BackSMTPPort: {dead_port}\nBackAddrDomain: down.example\n"
            "TimeoutSMTPConnect: 1\nTimeoutSMTPReply: 2\nBackVerifyTimeout: 5\n"
            "BackSkipLoopback: no\n" + extra)


def restart_conf(port: int) -> str:
    return (f"HeloName: {HELO_NAME}\nBackSMTPServer: 127.0.0.1\nBackSMTPPort: {port}\n"
            "BackAddrDomain: restart.example\nTimeoutSMTPConnect: 1\nTimeoutSMTPReply: 2\n"
            "BackVerifyTimeout: 5\nBackSkipLoopback: no\n")


# ---- helpers ----

def stale_socket(directory: str) -> str:
    """A unix socket file nobody listens on, as a crashed milter leaves it (ECONNREFUSED)."""
    path = os.path.join(directory, "dead-milter.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()
    os.chmod(path, 0o666)
    return path


def wait_listening(path: str, timeout: float = 15.0) -> None:
    """Wait until something accepts on the unix socket at path (a restarted milter)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(path)
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def check_reachable_by_postfix(path: str) -> None:
    """Postfix's smtpd runs as user postfix: it must be able to open the milter socket."""
    result = subprocess.run(["test", "-w", path], user="postfix", group="postfix",
                            extra_groups=[], timeout=10)
    assert result.returncode == 0, f"user postfix cannot write {path}: {oct(os.stat(path).st_mode)}"


def start_milter(daemon: Daemon) -> Daemon:
    daemon.start()
    wait_listening(daemon.socket)
    check_reachable_by_postfix(daemon.socket)
    return daemon


def stop_all(daemons: list[Daemon]) -> None:
    """SIGTERM every daemon first, so their ~5 s libmilter exits overlap; then stop each."""
    for daemon in daemons:
        if daemon.pid is not None:
            try:
                os.kill(daemon.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for daemon in daemons:
        daemon.stop()


@dataclass
class Result:
    """What one SMTP transaction got: MAIL, each RCPT, DATA (None when not sent)."""

    mail: tuple[int, str]
    rcpt: dict[str, tuple[int, str]] = field(default_factory=dict)
    data: Optional[tuple[int, str]] = None


def reply(pair: tuple[int, bytes]) -> tuple[int, str]:
    return pair[0], pair[1].decode("utf-8", "replace").replace("\n", " ")


def transaction(port: int, rcpts: list[str], body: Optional[str] = None) -> Result:
    """One SMTP session: EHLO, MAIL, each RCPT; DATA with body if given and a RCPT got 250."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
        assert smtp.ehlo()[0] == 250
        result = Result(reply(smtp.mail(SENDER)))
        if result.mail[0] != 250:
            return result
        for rcpt in rcpts:
            result.rcpt[rcpt] = reply(smtp.rcpt(rcpt))
        if body is not None and any(code == 250 for code, _ in result.rcpt.values()):
            smtp.putcmd("data")
            code, text = smtp.getreply()
            assert code == 354, (code, text)
            message = (f"From: <{SENDER}>\r\nSubject: {body}\r\n"
                       f"Message-ID: <{body}@client.test>\r\n\r\n{body}\r\n")
            smtp.send(message.encode() + b".\r\n")
            result.data = reply(smtp.getreply())
        else:
            smtp.rset()
    return result


def delivered_with(backend: Backend, token: str) -> list[tuple[str, list[str], bytes]]:
    return [entry for entry in list(backend.delivered) if token.encode() in entry[2]]


def wait_delivered(backend: Backend, token: str, postfix: PostfixInstance) -> list[str]:
    """Wait (bounded) until the message carrying token reached the backend; its recipients."""
    arrived = backend.wait_for(lambda: bool(delivered_with(backend, token)), DELIVERY_TIMEOUT)
    assert arrived, f"not delivered in {DELIVERY_TIMEOUT} s\n{postfix.mailq()}\n{postfix.maillog()}"
    return [rcpt for entry in delivered_with(backend, token) for rcpt in entry[1]]


def queue_id(data_reply: tuple[int, str]) -> str:
    """The id in Postfix's '250 2.0.0 Ok: queued as 4Xk2...'."""
    return data_reply[1].rsplit(" ", 1)[-1]


def verdicts(daemon: Daemon, address: str) -> list[str]:
    """scam-back's verdict log lines for one address."""
    return [line for line in daemon.log().splitlines() if f"rcpt=<{address}>" in line]


def rcpt_lines(backend: Backend, address: str) -> int:
    """How many RCPT TO:<address> lines the backend has read (probes and deliveries alike)."""
    wanted = f"RCPT TO:<{address}>".upper()
    return sum(1 for line in list(backend.transcript) if line.upper() == wanted)


# ---- the shared set-up ----

@dataclass
class Setup:
    postfix: PostfixInstance
    backend: Backend
    milter: Daemon
    tempfail_milter: Daemon
    restart_milter: Daemon
    restart_backend: Backend
    transport_milter: Daemon
    bitbucket_milter: Daemon


@pytest.fixture(scope="module")
def e2e() -> Iterator[Setup]:
    backends: list[Backend] = []
    daemons: list[Daemon] = []
    scratch = tempfile.mkdtemp(prefix="scam-back-e2e-")
    os.chmod(scratch, 0o755)
    postfix: Optional[PostfixInstance] = None
    try:
        backend = Backend(users={"good@example.net"}).start()
        backends.append(backend)
        restart_backend = Backend(users={"good@restart.example"}).start()
        backends.append(restart_backend)
        dead = refused_port()
        flags = ("-g", "postfix")       # the unix socket becomes 0660 group postfix
        milter = Daemon(milter_conf(backend.port, dead), flags)
        tempfail_milter = Daemon(milter_conf(backend.port, dead, "BackErrorTempfail: yes\n"),
                                 flags)
        restart_milter = Daemon(restart_conf(restart_backend.port), flags)
        transport = Path(scratch, "transport")
        transport.write_text(f"down.example relay:[127.0.0.1]:{dead}\n"
                             f"restart.example relay:[127.0.0.1]:{restart_backend.port}\n"
                             f"transport.example relay:[127.0.0.1]:{backend.port}\n"
                             "bounce.example error:no mail is delivered here\n")
        transport_milter = Daemon(
            f"HeloName: {HELO_NAME}\nTransportMap: {transport}\nTimeoutSMTPConnect: 1\n"
            "TimeoutSMTPReply: 2\nBackSkipLoopback: no\n", flags)
        bitbucket_milter = Daemon(milter_conf(backend.port, dead, "BitBucket: yes\n"), flags)
        daemons += [milter, tempfail_milter, restart_milter, transport_milter, bitbucket_milter]
        start_milter(milter)
        start_milter(tempfail_milter)
        start_milter(transport_milter)
        start_milter(bitbucket_milter)
        dead_milter = f"unix:{stale_socket(scratch)}"
        postfix = PostfixInstance(
            milter.address, backend.port,
            domains=("example.net", "down.example", "restart.example", "transport.example"),
            milter_default_action="tempfail",
            main_extra={"transport_maps": f"texthash:{transport}"},
            listeners={
                "backend_tempfail": {"smtpd_milters": tempfail_milter.address},
                "milter_down_accept": {"smtpd_milters": dead_milter,
                                       "milter_default_action": "accept"},
                "milter_down_tempfail": {"smtpd_milters": dead_milter,
                                         "milter_default_action": "tempfail"},
                "restart": {"smtpd_milters": restart_milter.address},
                "transport": {"smtpd_milters": transport_milter.address},
                "bitbucket": {"smtpd_milters": bitbucket_milter.address},
            })
        postfix.start()
        yield Setup(postfix, backend, milter, tempfail_milter, restart_milter, restart_backend,
                    transport_milter, bitbucket_milter)
    finally:
        if postfix is not None:
            postfix.cleanup()
        stop_all(daemons)
        for server in backends:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


# ---- the scenarios ----

def test_known_user_gets_250_and_the_message_reaches_the_backend(e2e):
    good = "good@example.net"
    token = f"known-{os.getpid()}-{next(_serial)}"
    result = transaction(e2e.postfix.port, [good], body=token)
    assert result.rcpt[good][0] == 250, result
    assert result.data is not None and result.data[0] == 250, result
    assert wait_delivered(e2e.backend, token, e2e.postfix) == [good]
    assert any("verdict=valid" in line for line in verdicts(e2e.milter, good))


def test_unknown_user_gets_550_5_1_1_from_postfix(e2e):
    bad = unique("nosuchuser")
    result = transaction(e2e.postfix.port, [bad])
    code, text = result.rcpt[bad]
    assert (code, text) == (550, "5.1.1 User unknown"), result
    assert f"RCPT TO:<{bad}>" in e2e.backend.transcript
    assert e2e.postfix.wait_maillog(
        "milter-reject: RCPT from unknown[127.0.0.1]: 550 5.1.1 User unknown"), \
        e2e.postfix.maillog()


def test_message_to_known_and_unknown_reaches_the_known_one_only(e2e):
    good, bad = unique("mixed-good"), unique("mixed-bad")
    e2e.backend.users.add(good)
    token = f"mixed-{os.getpid()}-{next(_serial)}"
    result = transaction(e2e.postfix.port, [bad, good], body=token)
    assert result.rcpt[good][0] == 250 and result.rcpt[bad][0] == 550, result
    assert result.data is not None and result.data[0] == 250, result
    assert wait_delivered(e2e.backend, token, e2e.postfix) == [good]
    assert all(bad not in rcpts for _, rcpts, _ in list(e2e.backend.delivered))


def test_bitbucket_accepts_unknown_recipients_and_postfix_delivers_to_the_known_one_only(e2e):
    """BitBucket: every RCPT gets 250 (a dictionary attack learns nothing), and the unknown
    ones are removed at end of message (smfi_delrcpt), so the backend never bounces them."""
    good, bad1, bad2 = unique("bb-good"), unique("bb-bad"), unique("bb-bad")
    e2e.backend.users.add(good)
    token = f"bitbucket-{os.getpid()}-{next(_serial)}"
    result = transaction(e2e.postfix.ports["bitbucket"], [bad1, good, bad2], body=token)
    assert all(code == 250 for code, _ in result.rcpt.values()), result
    assert result.data is not None and result.data[0] == 250, result
    assert wait_delivered(e2e.backend, token, e2e.postfix) == [good]
    # The backend refuses unknown users at delivery too: what shows the removal is that
    # Postfix never offered them (one RCPT each, scam-back's probe), so nothing bounces.
    assert (rcpt_lines(e2e.backend, bad1), rcpt_lines(e2e.backend, bad2)) == (1, 1)
    assert any("BitBucket: removed 2 invalid recipients" in line
               for line in e2e.bitbucket_milter.log().splitlines())


def test_bitbucket_rejects_a_message_whose_every_recipient_is_unknown(e2e):
    bad = unique("bb-only-bad")
    token = f"bitbucket-none-{os.getpid()}-{next(_serial)}"
    result = transaction(e2e.postfix.ports["bitbucket"], [bad], body=token)
    assert result.rcpt[bad][0] == 250, result
    assert result.data is not None and result.data[0] == 550, result
    assert "5.1.1" in result.data[1], result
    assert not delivered_with(e2e.backend, token)


def test_second_message_to_the_same_recipients_is_answered_from_the_cache(e2e):
    good, bad = unique("cached-good"), unique("cached-bad")
    e2e.backend.users.add(good)
    first = f"cache1-{os.getpid()}-{next(_serial)}"
    result = transaction(e2e.postfix.port, [good, bad], body=first)
    assert result.rcpt[good][0] == 250 and result.rcpt[bad][0] == 550, result
    wait_delivered(e2e.backend, first, e2e.postfix)
    assert rcpt_lines(e2e.backend, bad) == 1           # the probe
    assert rcpt_lines(e2e.backend, good) == 2          # the probe and the delivery
    mark = len(e2e.backend.transcript)

    second = f"cache2-{os.getpid()}-{next(_serial)}"
    result = transaction(e2e.postfix.port, [good, bad], body=second)
    assert result.rcpt[good][0] == 250, result
    assert result.rcpt[bad] == (550, "5.1.1 User unknown"), result
    assert wait_delivered(e2e.backend, second, e2e.postfix) == [good]
    new = list(e2e.backend.transcript)[mark:]
    assert PROBE_MAIL not in new and f"EHLO {HELO_NAME}" not in new, new   # no probe session
    assert f"RCPT TO:<{bad}>" not in new, new
    assert new.count(f"RCPT TO:<{good}>") == 1, new     # Postfix's delivery only
    sources = [line.split("source=")[1].split()[0] for a in (good, bad)
               for line in verdicts(e2e.milter, a)]
    assert sources == ["backend", "cache", "backend", "cache"], sources


def test_backend_down_accepts_unverified(e2e):
    rcpt = unique("anyone", "down.example")
    token = f"down-{os.getpid()}-{next(_serial)}"
    result = transaction(e2e.postfix.port, [rcpt], body=token)
    assert result.rcpt[rcpt][0] == 250, result
    assert result.data is not None and result.data[0] == 250, result
    assert any("verdict=unverified" in line for line in verdicts(e2e.milter, rcpt))
    # The inner server is down for Postfix too: drop the deferred copy instead of retrying it.
    removed = e2e.postfix.tool("postsuper", "-d", queue_id(result.data))
    assert removed.returncode == 0, removed.stderr


def test_backend_down_with_backerrortempfail_gives_451_at_rcpt(e2e):
    rcpt = unique("anyone", "down.example")
    result = transaction(e2e.postfix.ports["backend_tempfail"], [rcpt])
    assert result.mail[0] == 250, result
    code, text = result.rcpt[rcpt]
    assert code == 451 and text.startswith("4.4.3 "), result
    assert any("verdict=unverified" in line for line in verdicts(e2e.tempfail_milter, rcpt))


def test_milter_down_with_default_action_accept_accepts(e2e):
    bad = unique("unverified")
    mark = len(e2e.backend.transcript)
    result = transaction(e2e.postfix.ports["milter_down_accept"], [bad])
    assert result.mail[0] == 250 and result.rcpt[bad][0] == 250, result
    assert f"RCPT TO:<{bad}>" not in list(e2e.backend.transcript)[mark:]
    assert e2e.postfix.wait_maillog("postfix/milter_down_accept/smtpd[",
                                    "warning: connect to Milter service unix:"), \
        e2e.postfix.maillog()


def test_milter_down_with_default_action_tempfail_gives_451_4_7_1(e2e):
    rcpt = unique("whoever")
    result = transaction(e2e.postfix.ports["milter_down_tempfail"], [rcpt])
    first_failure = result.mail if result.mail[0] != 250 else result.rcpt[rcpt]
    assert first_failure[0] == 451 and first_failure[1].startswith("4.7.1 "), result
    assert all(code != 250 for code, _ in result.rcpt.values()), result


def test_submission_listener_with_daemon_name_msa_is_not_verified(e2e):
    bad = unique("submitted")
    mark = len(e2e.backend.transcript)
    result = transaction(e2e.postfix.submission_port, [bad])
    assert result.rcpt[bad][0] == 250, result
    assert f"RCPT TO:<{bad}>" not in list(e2e.backend.transcript)[mark:]
    assert verdicts(e2e.milter, bad) == []
    # The same address on the MTA port is verified and refused.
    assert transaction(e2e.postfix.port, [bad]).rcpt[bad][0] == 550


def test_sigterm_and_restart_of_scam_back_keep_the_cache_while_postfix_runs(e2e):
    daemon, backend, port = e2e.restart_milter, e2e.restart_backend, e2e.postfix.ports["restart"]
    master = e2e.postfix.pid
    good, bad = "good@restart.example", unique("gone", "restart.example")
    start_milter(daemon)
    token = f"restart-{os.getpid()}-{next(_serial)}"
    result = transaction(port, [good, bad], body=token)
    assert result.rcpt[good][0] == 250 and result.rcpt[bad][0] == 550, result
    assert wait_delivered(backend, token, e2e.postfix) == [good]

    assert daemon.terminate() == 0                     # SIGTERM: the cache is saved
    saved = Path(daemon.cachefile).read_text()
    assert f"0 {good} " in saved and f"1 {bad} " in saved, saved
    backend.stop()                                     # only the cache can answer now
    while_down = transaction(port, [good])             # Postfix still runs, without its milter
    assert while_down.mail[0] == 451 or while_down.rcpt[good][0] == 451, while_down

    start_milter(daemon)                               # same socket path, same cache file
    result = transaction(port, [good, bad])
    assert result.rcpt[good][0] == 250, result
    assert result.rcpt[bad] == (550, "5.1.1 User unknown"), result
    assert [line.split("source=")[1].split()[0] for line in verdicts(daemon, bad)] == [
        "backend", "cache"]
    assert e2e.postfix.alive() and e2e.postfix.pid == master


def test_relay_to_an_unlisted_domain_is_refused_by_postfix_before_the_milter(e2e):
    outside, bad = unique("someone", "unlisted.test"), unique("relay-bad")
    mark = len(e2e.backend.transcript)
    result = transaction(e2e.postfix.port, [outside, bad])
    code, text = result.rcpt[outside]
    assert code in (554, 454) and "Relay access denied" in text, result
    assert code == 454 or text.startswith("5.7.1 "), result
    assert result.rcpt[bad][0] == 550, result          # the milter did answer this session
    assert verdicts(e2e.milter, outside) == [] and verdicts(e2e.milter, bad)
    assert not any(outside in line for line in list(e2e.backend.transcript)[mark:])


def test_transport_map_shared_with_postfix_routes_verification(e2e):
    """TransportMap: scam-back reads the same transport(5) file Postfix routes mail with."""
    e2e.backend.users.add("good@transport.example")
    bad = unique("nosuchuser", "transport.example")
    token = f"transport-{os.getpid()}-{next(_serial)}"
    port = e2e.postfix.ports["transport"]
    result = transaction(port, ["good@transport.example", bad], body=token)
    assert result.rcpt[bad][0] == 550 and "5.1.1" in result.rcpt[bad][1], result
    assert result.rcpt["good@transport.example"][0] == 250, result
    assert wait_delivered(e2e.backend, token, e2e.postfix) == ["good@transport.example"]
    assert rcpt_lines(e2e.backend, bad) == 1          # scam-back's probe, at the same backend
    log = e2e.transport_milter.log()
    assert "bounce.example" in log and "not an SMTP route" in log
    assert any("verdict=invalid" in line for line in verdicts(e2e.transport_milter, bad))
