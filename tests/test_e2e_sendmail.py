"""End to end with a real sendmail 8.17: SMTP client -> sendmail -> scam-back -> backend.

One private sendmail (tests/sendmail.py: `sendmail -bD` in its own UTS and mount namespace, a .cf
built with m4 from an .mc carrying INSTALL's INPUT_MAIL_FILTER and macro lines) talks to one real
scam-back daemon over a unix socket, and relays example.net to a real Backend that knows USERS.
They are shared by the module (stopping scam-back takes ~5 s), so every test uses addresses of its
own: the verdict cache then never answers in place of the backend.
"""

from __future__ import annotations

import smtplib
import time
import uuid
from typing import Iterator

import pytest

from .conftest import Daemon, backend_conf
from .sendmail import SendmailInstance, prepare_sendmail, sendmail_available
from .smtpbackend import Backend

USERS = {"good@example.net", "alice@example.net", "bob@example.net", "carol@example.net",
         "dave@example.net"}
SENDER = "sender@elsewhere.test"
HELO = "mx.test.example"
PROBE_FROM = f"MAIL FROM:<postmaster+backscatter@{HELO}>"
DELIVERY_WAIT = 20.0


@pytest.fixture(scope="module")
def sendmail_root() -> str:
    ok, reason = sendmail_available()
    if not ok:
        pytest.skip(f"no usable sendmail: {reason}")
    root, reason = prepare_sendmail()
    assert root is not None, reason
    return root


@pytest.fixture(scope="module")
def mx_backend(sendmail_root: str) -> Iterator[Backend]:
    with Backend(users=USERS) as server:
        yield server


@pytest.fixture(scope="module")
def scam_back(mx_backend: Backend) -> Iterator[Daemon]:
    """The real daemon (BackSkipLoopback: no, as sendmail's clients here are all 127.0.0.1)."""
    daemon = Daemon(backend_conf(mx_backend, f"HeloName: {HELO}\n"))
    try:
        yield daemon.start()
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def mta(sendmail_root: str, scam_back: Daemon, mx_backend: Backend) -> Iterator[SendmailInstance]:
    instance = SendmailInstance(sendmail_root, scam_back.socket, mx_backend.port)
    try:
        yield instance.start()
    finally:
        instance.cleanup()


def settle(backend: Backend, timeout: float = 10.0) -> bool:
    """Wait until every backend connection so far has said QUIT (scam-back ends its probe
    session when sendmail closes the milter connection, just after the client's QUIT)."""
    return backend.wait_for(lambda: backend.transcript.count("QUIT") >= backend.connections,
                            timeout)


@pytest.fixture(autouse=True)
def fresh_backend(request: pytest.FixtureRequest) -> None:
    """Each test starts with an idle backend and an empty transcript."""
    if "mx_backend" in request.fixturenames:
        backend = request.getfixturevalue("mx_backend")
        settle(backend)
        backend.clear()
        backend.set_users(USERS)


def smtp(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60)
    client.ehlo()
    return client


def rcpt_replies(port: int, *recipients: str) -> list[tuple[int, bytes]]:
    """One SMTP session up to RCPT (no DATA, so nothing is queued); the reply to each RCPT."""
    with smtp(port) as client:
        code, text = client.mail(SENDER)
        assert code == 250, (code, text)
        replies = [client.rcpt(r) for r in recipients]
        client.rset()
    return replies


def message(subject: str) -> bytes:
    return (f"From: <{SENDER}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@elsewhere.test>\r\n"
            "\r\nHello from the scam-back sendmail end-to-end test.\r\n").encode()


def wait_log(daemon: Daemon, text: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in daemon.log():
            return True
        time.sleep(0.05)
    return text in daemon.log()


def test_known_user_gets_250_at_rcpt_after_a_backend_probe(mta, mx_backend, scam_back):
    (reply,) = rcpt_replies(mta.port, "alice@example.net")
    assert reply == (250, b"2.1.5 <alice@example.net>... Recipient ok"), mta.traffic()
    assert PROBE_FROM in mx_backend.transcript           # scam-back asked, not sendmail
    assert "RCPT TO:<alice@example.net>" in mx_backend.transcript
    assert wait_log(scam_back, "rcpt=<alice@example.net> backend=127.0.0.1")


def test_unknown_user_gets_550_5_1_1_at_rcpt(mta, mx_backend, scam_back):
    (reply,) = rcpt_replies(mta.port, "nobody-here@example.net")
    assert reply == (550, b"5.1.1 <nobody-here@example.net>... User unknown"), mta.traffic()
    assert "RCPT TO:<nobody-here@example.net>" in mx_backend.transcript
    assert wait_log(scam_back, "rcpt=<nobody-here@example.net>")
    assert "verdict=invalid" in scam_back.log()


def test_message_to_known_user_is_delivered_to_the_backend(mta, mx_backend, scam_back):
    subject = f"e2e-{uuid.uuid4().hex}"
    with smtp(mta.port) as client:
        client.mail(SENDER)
        assert client.rcpt("carol@example.net")[0] == 250
        code, text = client.data(message(subject))
    assert code == 250 and b"Message accepted for delivery" in text, (code, text)
    queue_id = text.split()[1].decode()

    def arrived() -> bool:
        return any(subject.encode() in body for _, _, body in mx_backend.delivered)
    assert mx_backend.wait_for(arrived, DELIVERY_WAIT), mta.traffic()
    (sender, rcpts, body), = [d for d in mx_backend.delivered if subject.encode() in d[2]]
    assert (sender, rcpts) == (SENDER, ["carol@example.net"])
    assert f"with ESMTP id {queue_id}".encode() in body        # relayed by our sendmail
    # sendmail handed scam-back its queue id ({i} in confMILTER_MACROS_ENVRCPT) at RCPT.
    assert wait_log(scam_back, f"qid={queue_id} rcpt=<carol@example.net>"), scam_back.log()


def test_message_to_known_and_unknown_reaches_the_known_one_only(mta, mx_backend):
    subject = f"e2e-{uuid.uuid4().hex}"
    with smtp(mta.port) as client:
        refused = client.sendmail(SENDER, ["bob@example.net", "ghost@example.net"],
                                  message(subject))
    assert refused == {"ghost@example.net": (550, b"5.1.1 <ghost@example.net>... User unknown")}

    def arrived() -> bool:
        return any(subject.encode() in body for _, _, body in mx_backend.delivered)
    assert mx_backend.wait_for(arrived, DELIVERY_WAIT), mta.traffic()
    assert [rcpts for _, rcpts, body in mx_backend.delivered
            if subject.encode() in body] == [["bob@example.net"]]


def test_second_connection_is_answered_from_the_cache(mta, mx_backend):
    first = rcpt_replies(mta.port, "dave@example.net", "phantom@example.net")
    assert [code for code, _ in first] == [250, 550]
    assert settle(mx_backend), mx_backend.transcript    # the probe session has ended
    mx_backend.clear()
    second = rcpt_replies(mta.port, "dave@example.net", "phantom@example.net")
    assert second == first
    assert mx_backend.connections == 0 and mx_backend.transcript == []


def test_msa_port_is_not_verified(mta, mx_backend):
    """{daemon_name} MSA (BackSkipDaemon default): scam-back accepts the connection unasked."""
    (reply,) = rcpt_replies(mta.msa_port, "unknown-on-msa@example.net")
    assert reply == (250, b"2.1.5 <unknown-on-msa@example.net>... Recipient ok"), mta.traffic()
    assert mx_backend.connections == 0 and mx_backend.transcript == []
    # The same address on the MTA port is verified and rejected.
    (reply,) = rcpt_replies(mta.port, "unknown-on-msa@example.net")
    assert reply == (550, b"5.1.1 <unknown-on-msa@example.net>... User unknown")


@pytest.mark.parametrize("flags, expected", [
    ("T", (451, b"4.3.2 Please try again later")),   # INSTALL's F=T: tempfail while it is down
    ("", (250, b"2.1.0 <sender@elsewhere.test>... Sender ok")),   # F= empty: accept unverified
])
def test_milter_down(sendmail_root, mx_backend, tmp_path, flags, expected):
    missing = str(tmp_path / "no-scam-back.sock")
    with SendmailInstance(sendmail_root, missing, mx_backend.port, milter_flags=flags) as mta:
        with smtp(mta.port) as client:
            assert client.mail(SENDER) == expected, mta.traffic()
            if expected[0] == 250:
                assert client.rcpt("nobody-else@example.net")[0] == 250
            client.rset()
    assert mx_backend.connections == 0


def test_bitbucket_removes_unknown_recipients_through_sendmail(sendmail_root, mx_backend):
    """BitBucket: yes through sendmail (the original's home): both RCPTs get 250, and at end of
    message smfi_delrcpt removes the unknown one, so only the known one is relayed."""
    daemon = Daemon(backend_conf(mx_backend, f"HeloName: {HELO}\nBitBucket: yes\n"))
    subject = f"e2e-bitbucket-{uuid.uuid4().hex}"
    try:
        daemon.start()
        with SendmailInstance(sendmail_root, daemon.socket, mx_backend.port) as mta:
            with smtp(mta.port) as client:
                refused = client.sendmail(SENDER, ["alice@example.net", "nobody-bb@example.net"],
                                          message(subject))
            assert refused == {}, refused

            def arrived() -> bool:
                return any(subject.encode() in body for _, _, body in mx_backend.delivered)
            assert mx_backend.wait_for(arrived, DELIVERY_WAIT), mta.traffic()
        assert [rcpts for _, rcpts, body in mx_backend.delivered
                if subject.encode() in body] == [["alice@example.net"]]
        # The backend refuses unknown users at delivery too: what shows the removal is that
        # sendmail never offered it (one RCPT for it, scam-back's probe), so nothing bounces.
        offered = [line for line in list(mx_backend.transcript)
                   if line.upper() == "RCPT TO:<NOBODY-BB@EXAMPLE.NET>"]
        assert len(offered) == 1, mx_backend.transcript
        assert wait_log(daemon, "BitBucket: removed 1 invalid recipients"), daemon.log()
    finally:
        daemon.stop()
