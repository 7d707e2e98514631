"""Probe loops (issue 4): a transaction whose sender is a verifier's probe sender (our own, or
another scam-back's postmaster+backscatter@..., or our BackMailFrom) is not itself verified, so
two verifiers in front of each other cannot loop; the next ordinary transaction is."""

from __future__ import annotations

from typing import Iterator

import pytest

from ..smtpbackend import Backend
from .conftest import PROBE_SENDER, Mta, conf, is_invalid, show

SENDERS = {
    "our-own-probe-sender": PROBE_SENDER,
    "another-verifiers-probe-sender": "postmaster+backscatter@other.host",
}


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with Backend(users={"good@example.net"}) as server:
        yield server


@pytest.fixture(scope="module")
def daemon(backend: Backend, module_daemons):  # type: ignore[no-untyped-def]
    return module_daemons(conf({"example.net": backend.port}))


def rcpt_lines(backend: Backend, address: str) -> list[str]:
    return [line for line in list(backend.transcript) if line == f"RCPT TO:<{address}>"]


@pytest.mark.parametrize("sender", list(SENDERS.values()), ids=list(SENDERS))
def test_probe_sender_transaction_is_not_verified(backend: Backend, daemon, sender: str) -> None:
    tag = sender.split("@")[1].replace(".", "-")
    looped, ordinary = f"loop-{tag}@example.net", f"plain-{tag}@example.net"
    with Mta(daemon, sender=sender) as mta:
        reply = mta.rcpt(looped)
        assert reply.action == "continue", show(reply)
        mta.abort()
        mta.mail("someone@elsewhere.test")          # the next transaction is verified again
        after = mta.rcpt(ordinary)
    assert is_invalid(after), show(after)
    assert rcpt_lines(backend, looped) == [], "the probe was itself verified"
    assert rcpt_lines(backend, ordinary) == [f"RCPT TO:<{ordinary}>"]


def test_custom_back_mail_from_is_not_verified(backend: Backend, daemons) -> None:
    daemon = daemons(conf({"example.net": backend.port}, "BackMailFrom: verifier@mx.test.example\n"))
    with Mta(daemon, sender="verifier@mx.test.example") as mta:
        reply = mta.rcpt("loop-custom@example.net")
    assert reply.action == "continue", show(reply)
    assert rcpt_lines(backend, "loop-custom@example.net") == []
    assert "MAIL FROM:<verifier@mx.test.example>" not in backend.transcript
