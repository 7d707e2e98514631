"""address.parse: normalise what is safe, refuse anything that could smuggle a command (weakness 6)."""

from __future__ import annotations

import pytest

from scam_back.address import Address, AddressError, parse


def test_plain_address():
    assert parse("user@example.net") == Address("user", "example.net")


def test_angle_brackets_are_removed():
    assert parse("<user@example.net>") == Address("user", "example.net")


def test_source_route_is_stripped():
    assert parse("<@a.example,@b.example:u@d.example>") == Address("u", "d.example")


def test_domain_is_lower_cased():
    assert parse("user@Example.NET").domain == "example.net"


def test_domain_trailing_dot_is_dropped():
    assert parse("user@example.net.").domain == "example.net"


def test_local_part_case_is_kept():
    assert parse("John.Doe@example.net").local == "John.Doe"


def test_text_is_local_at_domain():
    assert parse("<User@Example.NET.>").text == "User@example.net"


def test_quoted_local_part_with_space_is_accepted():
    assert parse('"john doe"@example.net') == Address('"john doe"', "example.net")


def test_plus_tag_is_kept():
    assert parse("user+tag@example.net").local == "user+tag"


def test_ascii_address_is_not_utf8():
    assert parse("user@example.net").is_utf8 is False


def test_utf8_address_is_accepted_and_flagged():
    address = parse("jörg@exämple.de")
    assert (address.text, address.is_utf8) == ("jörg@exämple.de", True)


def test_address_of_254_octets_is_accepted():
    raw = "a" * 242 + "@example.net"
    assert len(raw) == 254 and parse(raw).text == raw


@pytest.mark.parametrize("raw", [
    "user\r@example.net",
    "user@example.net\r\nRSET",
    "user@example.net\nMAIL FROM:<evil@x>",
    "user\x00@example.net",
    "user@example.net\r",
    "user\t@example.net",
])
def test_control_characters_are_refused(raw):
    with pytest.raises(AddressError):
        parse(raw)


@pytest.mark.parametrize("raw", [
    "a<b@example.net",
    "a>b@example.net",
    "<user@example.net>>",
    "<user@example.net> NOTIFY=NEVER",
    "user@example.net>",
])
def test_unquoted_angle_bracket_inside_is_refused(raw):
    with pytest.raises(AddressError):
        parse(raw)


@pytest.mark.parametrize("raw", [
    '"a>b"@example.net',
    '<"x> NOTIFY=NEVER"@example.net>',
    '"a<b"@example.net',
])
def test_angle_bracket_inside_quotes_is_refused(raw):
    # RCPT TO:<"x> NOTIFY=NEVER"@example.net> reads as a parameter to a naive backend parser.
    with pytest.raises(AddressError):
        parse(raw)


@pytest.mark.parametrize("raw", ["john doe@example.net", "user@exa mple.net"])
def test_unquoted_space_is_refused(raw):
    with pytest.raises(AddressError):
        parse(raw)


def test_over_254_octets_is_refused():
    with pytest.raises(AddressError):
        parse("a" * 243 + "@example.net")


def test_length_limit_counts_octets_not_characters():
    raw = "é" * 122 + "@example.net"          # 134 characters, 256 octets
    with pytest.raises(AddressError):
        parse(raw)


@pytest.mark.parametrize("raw", ["<>", "", "   "])
def test_empty_address_is_refused(raw):
    with pytest.raises(AddressError):
        parse(raw)


def test_empty_domain_is_refused():
    with pytest.raises(AddressError):
        parse("user@")


def test_empty_local_part_is_refused():
    with pytest.raises(AddressError):
        parse("@example.net")


def test_unbalanced_quote_is_refused():
    with pytest.raises(AddressError):
        parse('"john@example.net')


@pytest.mark.parametrize("raw", ["<@x.test:@y.test:user@example.net>", "@x:@example.net"])
def test_routes_joined_by_colons_are_refused(raw):
    """RFC 5321 joins routes with commas; "@b:user" left over is no local part."""
    with pytest.raises(AddressError):
        parse(raw)


def test_parsing_the_text_of_a_parsed_address_gives_it_back_and_case_does_not_matter():
    """The verifier answers an RCPT text equal to a cache key without parsing it, which is only
    right if the normal form is a fixed point of parse (and lower-casing commutes with it)."""
    import random
    pieces = list('aZ09.-_"\\%!@:,[]+=/ ') + ["@x:", "@y,@z:", '"@"', "..", "Example.NET", "."]
    ends = ["@example.net", "@Ex.net.", "", "@", "@[192.0.2.1]", "@x.test..", ">"]
    chooser = random.Random(5321)
    checked = 0
    for _ in range(30_000):
        raw = "".join(chooser.choice(pieces) for _ in range(chooser.randint(1, 10)))
        raw = chooser.choice(["", "<"]) + raw + chooser.choice(ends)
        try:
            text = parse(raw).text
        except AddressError:
            continue
        checked += 1
        assert parse(text).text == text, raw
        assert parse(text.lower()).text.lower() == text.lower(), raw
    assert checked > 1000
