"""Failover lists and the BackVerifyTimeout cap (issue 4).

Several BackSMTPServer lines before one BackAddrDomain are tried in order; they share one
BackSMTPPort, so these backends listen on different loopback addresses (127.0.0.x) with one
port. The mailertable form (`esmtp:[a]:p1:[b]:p2`) is checked on 127.0.0.1 alone.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Iterator

import pytest

from ..smtpbackend import Backend
from .conftest import (BASE_CONF, FixedPortBackend, Mta, chown_to_run_user, conf, is_invalid,
                       is_tempfail, show)

VERIFY_TIMEOUT = 2.0
STALL_REPLY_TIMEOUT = 1.5      # each stalling server costs this much: 4 of them, 6 s uncapped
BANNER_421 = [(0.0, b"421 4.3.2 Not now\r\n"), "close"]


def free_port_on(*hosts: str) -> int:
    """A port that is free on every one of the given loopback addresses."""
    for _ in range(50):
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = int(probe.getsockname()[1])
        try:
            for host in hosts:
                with socket.create_server((host, port)):
                    pass
        except OSError:
            continue
        return port
    raise RuntimeError("no common free port")


class Env:
    def __init__(self) -> None:
        self.good = Backend(users={"good@fo.test"}).start()       # 127.0.0.1:P
        p = self.port = self.good.port
        self.banner421 = FixedPortBackend(BANNER_421, host="127.0.0.3", port=p).start()
        self.closer = FixedPortBackend([(0.0, b"220 x ESMTP\r\n"), "close"], host="127.0.0.4",
                                       port=p).start()
        q = self.stall_port = free_port_on(*(f"127.0.0.{i}" for i in range(5, 9)))
        self.stallers = [FixedPortBackend(replies={"EHLO": "hang", "HELO": "hang"},
                                          host=f"127.0.0.{i}", port=q).start() for i in range(5, 9)]
        # 127.0.0.2:P has no listener: connections are refused.
        self.routes = {
            "first-refused.test": (p, ["127.0.0.2", "127.0.0.1"]),
            "first-421.test": (p, ["127.0.0.3", "127.0.0.1"]),
            "first-closes.test": (p, ["127.0.0.4", "127.0.0.1"]),
            "first-works.test": (p, ["127.0.0.1", "127.0.0.2"]),
            "all-stall.test": (q, [f"127.0.0.{i}" for i in range(5, 9)]),
        }

    def stop(self) -> None:
        for server in [self.good, self.banner421, self.closer, *self.stallers]:
            server.stop()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    servers = Env()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def daemon(env: Env, module_daemons):  # type: ignore[no-untyped-def]
    text = conf(env.routes, f"BackVerifyTimeout: {VERIFY_TIMEOUT}\nBackErrorTempfail: yes\n")
    text = text.replace("TimeoutSMTPReply: 1\n", f"TimeoutSMTPReply: {STALL_REPLY_TIMEOUT}\n")
    return module_daemons(text)


def test_verify_timeout_caps_a_failover_list_of_four_stalling_servers(env: Env, daemon) -> None:
    with Mta(daemon) as mta:
        reply, elapsed = mta.timed_rcpt("someone@all-stall.test")
    assert elapsed <= VERIFY_TIMEOUT + 1.0, f"answered after {elapsed:.2f} s"
    assert is_tempfail(reply), show(reply)
    tried = [s.connections for s in env.stallers]
    assert tried[0] == 1 and sum(tried) >= 2, f"failover not followed: connections {tried}"


@pytest.mark.parametrize("domain", ["first-refused.test", "first-421.test", "first-closes.test"])
def test_failover_passes_a_failed_server_for_the_next(env: Env, daemon, domain: str) -> None:
    with Mta(daemon) as mta:
        bad, elapsed = mta.timed_rcpt(f"nobody@{domain}")
    assert is_invalid(bad), show(bad)
    assert elapsed <= 1 + STALL_REPLY_TIMEOUT + 1.0
    assert f"RCPT TO:<nobody@{domain}>" in env.good.transcript
    if domain == "first-421.test":
        assert env.banner421.connections >= 1, "the first server was never tried"
    if domain == "first-closes.test":
        assert env.closer.connections >= 1, "the first server was never tried"


def test_failover_list_keeps_its_order_the_first_server_answers(env: Env, daemon) -> None:
    with Mta(daemon) as mta:
        bad = mta.rcpt("nobody@first-works.test")
    assert is_invalid(bad), show(bad)
    assert "RCPT TO:<nobody@first-works.test>" in env.good.transcript


def test_mailertable_host_list_fails_over_in_order(env: Env, module_daemons) -> None:  # noqa
    refused = FixedPortBackend()          # started once for a port, then stopped: refused
    refused.start()
    refused.stop()
    mailertable = (f"failover.test esmtp:[127.0.0.1]:{refused.port}:[127.0.0.1]:{env.port}\n")

    def prepare(d) -> None:  # type: ignore[no-untyped-def]
        path = os.path.join(d.dir, "mailertable")
        with open(path, "w") as handle:
            handle.write(mailertable)
        chown_to_run_user(path)
        d.conf_text += f"UseMailertable: yes\nMailertable: {path}\n"

    d = module_daemons(BASE_CONF + "BackErrorTempfail: yes\n", prepare=prepare)
    with Mta(d) as mta:
        started = time.monotonic()
        bad = mta.rcpt("nobody@failover.test")
        elapsed = time.monotonic() - started
    assert is_invalid(bad), show(bad)
    assert elapsed <= 3.0
    assert "RCPT TO:<nobody@failover.test>" in env.good.transcript
