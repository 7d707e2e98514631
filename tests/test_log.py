"""Logging: syslog facility mail with ident scam-back, stderr fallback, never a traceback per record."""

from __future__ import annotations

import logging
import os
import socket
import tempfile

import pytest

from scam_back import log as logmod


@pytest.fixture
def syslog_socket():
    """A unix datagram socket standing in for /dev/log."""
    directory = tempfile.mkdtemp(prefix="scam-back-log-")
    path = os.path.join(directory, "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()
    os.unlink(path)
    os.rmdir(directory)
    logmod.setup("info", stderr=True, syslog_socket="/nonexistent/log")


def test_records_go_to_syslog_facility_mail_with_ident(syslog_socket):
    sock, path = syslog_socket
    assert logmod.setup("info", stderr=False, syslog_socket=path) is True
    logging.getLogger("scam-back").info("qid=Q1 rcpt=<a@b> verdict=valid")
    datagram = sock.recv(4096).decode()
    # <22> = facility mail (2) * 8 + severity info (6)
    assert datagram.startswith(f"<22>scam-back[{os.getpid()}]: qid=Q1 rcpt=<a@b> verdict=valid")


def test_warning_has_mail_warning_priority(syslog_socket):
    sock, path = syslog_socket
    logmod.setup("info", stderr=False, syslog_socket=path)
    logging.getLogger("scam-back").warning("careful")
    assert sock.recv(4096).decode().startswith("<20>")   # mail (16) + warning (4)


def test_debug_is_dropped_at_info_level(syslog_socket):
    sock, path = syslog_socket
    logmod.setup("info", stderr=False, syslog_socket=path)
    logging.getLogger("scam-back").debug("hidden")
    logging.getLogger("scam-back").info("shown")
    assert "shown" in sock.recv(4096).decode()


def test_without_syslog_socket_stderr_is_used(capsys):
    assert logmod.setup("info", stderr=False, syslog_socket="/nonexistent/log") is False
    logging.getLogger("scam-back").info("to stderr")
    assert "scam-back: to stderr" in capsys.readouterr().err


def test_vanished_syslog_prints_no_traceback(syslog_socket, capsys):
    sock, path = syslog_socket
    logmod.setup("info", stderr=False, syslog_socket=path)
    sock.close()
    os.unlink(path)
    open(path, "w").close()            # the fixture's cleanup unlinks it again
    for _ in range(3):
        logging.getLogger("scam-back").info("into the void")
    assert "Traceback" not in capsys.readouterr().err


def test_fast_verdict_lines_have_the_same_syslog_form(syslog_socket):
    sock, path = syslog_socket
    logmod.setup("info", stderr=False, syslog_socket=path)
    logmod.enable_fast_verdicts()
    try:
        logmod.verdict("qid=Q2 rcpt=<b@c> verdict=invalid")
    finally:
        logmod.disable_fast_verdicts()
    assert sock.recv(4096).decode() == f"<22>scam-back[{os.getpid()}]: qid=Q2 rcpt=<b@c> verdict=invalid\x00"


def test_fast_verdict_lines_respect_the_log_level(syslog_socket):
    sock, path = syslog_socket
    logmod.setup("warning", stderr=False, syslog_socket=path)
    logmod.enable_fast_verdicts()
    try:
        logmod.verdict("hidden")
    finally:
        logmod.disable_fast_verdicts()
    logging.getLogger("scam-back").warning("shown")
    assert "shown" in sock.recv(4096).decode()


def test_fast_verdict_lines_reconnect_after_a_syslog_restart(syslog_socket):
    sock, path = syslog_socket
    logmod.setup("info", stderr=False, syslog_socket=path)
    logmod.enable_fast_verdicts()
    try:
        sock.close()
        os.unlink(path)
        again = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        again.bind(path)
        again.settimeout(5)
        logmod.verdict("after restart")
    finally:
        logmod.disable_fast_verdicts()
    assert "after restart" in again.recv(4096).decode()
    again.close()


def test_lines_rendered_by_the_writer_keep_their_order_and_form(syslog_socket):
    sock, path = syslog_socket
    logmod.setup("info", stderr=False, syslog_socket=path)
    logmod.enable_fast_verdicts()
    try:
        logmod.verdict_bytes(b"qid=Q1 first")
        logmod.verdict_later(lambda a, b: f"qid={a} {b}", "Q2", "second")
        logmod.verdict_later(lambda: 1 / 0)                 # a line that cannot be rendered
        logmod.verdict("qid=Q3 third")
    finally:
        logmod.disable_fast_verdicts()
    got = [sock.recv(4096).decode() for _ in range(4)]
    head = f"<22>scam-back[{os.getpid()}]: "
    assert got[0] == head + "qid=Q1 first\x00"
    assert got[1] == head + "qid=Q2 second\x00"
    assert "could not be written" in got[2] and "ZeroDivisionError" in got[2]
    assert got[3] == head + "qid=Q3 third\x00"


def test_without_the_writer_lines_go_through_logging(caplog):
    with caplog.at_level(logging.INFO, logger="scam-back"):
        logmod.verdict_bytes(b"qid=Q1 bytes \xc3\xa9")
        logmod.verdict_later(lambda a: f"qid={a} later", "Q2")
    assert [r.getMessage() for r in caplog.records][-2:] == ["qid=Q1 bytes \u00e9", "qid=Q2 later"]
