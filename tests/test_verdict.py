"""verdict.classify: invalid only for a real "no such mailbox"; everything else is trouble (weakness 8)."""

from __future__ import annotations

import pytest

from scam_back.verdict import Kind, classify, enhanced_code

PROBE = "postmaster+backscatter@mx.test.example"


@pytest.mark.parametrize("code, text", [
    (250, "2.1.5 Ok"),
    (251, "2.1.5 User not local; will forward"),
    (252, "2.1.5 Cannot VRFY user, but will accept message"),
])
def test_2xx_rcpt_reply_is_valid(code, text):
    assert classify(code, text, PROBE) is Kind.VALID


@pytest.mark.parametrize("code, text", [
    (550, "5.1.1 <bad@example.net>: Recipient address rejected: User unknown in virtual mailbox table"),
    (553, "5.1.3 Bad destination mailbox address syntax"),
    (550, "5.1.6 Destination mailbox has moved, No forwarding address"),
    (550, "5.1.10 Recipient address has null MX"),
    (551, "5.1.1 User not local"),
])
def test_mailbox_unknown_enhanced_code_is_invalid(code, text):
    assert classify(code, text, PROBE) is Kind.INVALID


def test_qmail_style_trailing_enhanced_code_is_invalid():
    assert classify(553, "sorry, no mailbox here by that name. (#5.1.1)", PROBE) is Kind.INVALID


def test_550_without_enhanced_code_and_neutral_text_is_invalid():
    assert classify(550, "No such user here", PROBE) is Kind.INVALID


def test_553_without_enhanced_code_and_neutral_text_is_invalid():
    assert classify(553, "<bad@example.net>... User unknown", PROBE) is Kind.INVALID


def test_enhanced_code_is_read_from_the_first_line_of_a_multiline_reply():
    assert classify(550, "5.1.1 User unknown\nplease check the address", PROBE) is Kind.INVALID


def test_550_5_7_1_policy_refusal_is_trouble():
    assert classify(550, "5.7.1 Client host rejected: listed on a blocklist", PROBE) is Kind.TROUBLE


@pytest.mark.parametrize("text", [
    f"5.1.0 <{PROBE}>: Sender address rejected: User unknown in local recipient table",
    "5.1.7 Bad sender mailbox address syntax",
    "5.1.8 <postmaster+backscatter@vm>: Sender address rejected: Domain not found",
])
def test_sender_refusal_enhanced_code_is_trouble(text):
    assert classify(550, text, PROBE) is Kind.TROUBLE


def test_qmail_relay_refusal_with_trailing_5_7_1_is_trouble():
    text = "sorry, that domain isn't in my list of allowed rcpthosts. (#5.7.1)"
    assert classify(553, text, PROBE) is Kind.TROUBLE


@pytest.mark.parametrize("code, text", [
    (550, "Relaying denied"),
    (553, "we do not relay for you"),
    (550, "Sender verify failed"),
    (550, "SENDER not allowed"),
    (550, f"<{PROBE}> is not welcome here"),
    (550, f"<{PROBE.upper()}> is not welcome here"),
])
def test_550_553_without_code_blaming_relay_sender_or_probe_is_trouble(code, text):
    assert classify(code, text, PROBE) is Kind.TROUBLE


def test_551_without_enhanced_code_is_trouble():
    assert classify(551, "User not local; please try <x@elsewhere.example>", PROBE) is Kind.TROUBLE


@pytest.mark.parametrize("code, text", [
    (554, "5.7.1 Service unavailable; client host blocked"),
    (554, "Transaction failed"),
    (552, "5.2.2 Mailbox full"),
    (450, "4.2.0 Greylisted, try again later"),
    (451, "4.3.0 Temporary lookup failure"),
    (452, "4.5.3 Too many recipients"),
    (421, "4.4.2 Closing connection"),
    (-1, "garbage"),
    (0, ""),
])
def test_other_replies_are_trouble(code, text):
    assert classify(code, text, PROBE) is Kind.TROUBLE


def test_empty_probe_sender_does_not_make_every_550_trouble():
    # With BackMailFrom: <> the probe sender is "": "" is in every text, but must not count.
    assert classify(550, "No such user here", "") is Kind.INVALID


@pytest.mark.parametrize("text, code", [
    ("5.1.1 User unknown", "5.1.1"),
    ("5.1.10 null MX", "5.1.10"),
    ("sorry, no mailbox here by that name. (#5.1.1)", "5.1.1"),
    ("No such user here", ""),
    ("", ""),
])
def test_enhanced_code_extraction(text, code):
    assert enhanced_code(text) == code
