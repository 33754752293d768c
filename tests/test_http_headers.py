"""Header field parsers are linear (whepfan/http/headers.py): the work a parse does is
counted in FieldScanner.steps and asserted against the value's length, never timed. The
client-address headers (Forwarded, X-Forwarded-For: whepfan/http/clientaddr.py) scan the
value by index: the characters they read are counted by the value itself."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import SupportsIndex

import pytest

from whepfan.errors import ParseError, PreconditionFailed
from whepfan.http import clientaddr
from whepfan.http.etag import EntityTag, IfMatch, check_if_match
from whepfan.http.headers import FieldScanner, MediaType, media_type_essence

# The reported If-Match: a good member, then 4,000 x " \t" and a member that never closes.
REPORTED = '"a",' + " \t" * 4000 + '!"'


def steps_of_if_match(value: str) -> int:
    scanner = FieldScanner(value)
    with contextlib.suppress(ParseError):
        IfMatch.scan(scanner)
    return scanner.steps


def steps_of_media_type(value: str) -> int:
    scanner = FieldScanner(value)
    with contextlib.suppress(ParseError):
        MediaType.scan(scanner)
    return scanner.steps


def test_reported_if_match_is_refused_in_linear_work() -> None:
    assert len(REPORTED) > 8000
    with pytest.raises(ParseError):
        IfMatch.parse(REPORTED)
    # Each character is examined a bounded number of times (peek then consume).
    assert steps_of_if_match(REPORTED) <= 3 * len(REPORTED)


ADVERSARIAL_IF_MATCH = [
    lambda n: '"a",' + " \t" * n + '!"',
    lambda n: " " * n + "x",
    lambda n: '"' + "a" * n,  # never closed
    lambda n: ",".join(['W/"x"'] * n),
    lambda n: "W/" * n,
    lambda n: '"a" ' * n,
    lambda n: "," * n + "!",
]


@pytest.mark.parametrize("build", ADVERSARIAL_IF_MATCH)
def test_if_match_work_grows_linearly(build: object) -> None:
    assert callable(build)
    small, large = build(500), build(4000)
    # Eight times the input, at most eight times the work (plus a constant): not n^2.
    assert steps_of_if_match(large) <= 8 * steps_of_if_match(small) + 16
    # And a small constant per character: an empty list member is a handful of peeks.
    assert steps_of_if_match(large) <= 8 * len(large) + 16


ADVERSARIAL_CONTENT_TYPE = [
    lambda n: "application/sdp" + " ;" * n,
    lambda n: "application/sdp;a=" + '"' + "\\a" * n,
    lambda n: "application/sdp;" + "a=b;" * n,
    lambda n: " " * n + "/",
    lambda n: "a/" + "b" * n + "; " + "c" * n + "=",
]


@pytest.mark.parametrize("build", ADVERSARIAL_CONTENT_TYPE)
def test_content_type_work_grows_linearly(build: object) -> None:
    assert callable(build)
    small, large = build(500), build(4000)
    assert steps_of_media_type(large) <= 8 * steps_of_media_type(small) + 16
    assert steps_of_media_type(large) <= 8 * len(large) + 16


def test_if_match_forms_real_clients_send() -> None:
    assert IfMatch.parse("*").wildcard and IfMatch.parse(' "*" ').wildcard
    tags = IfMatch.parse(' W/"w", "a,b" ,, abc ,"" ').tags
    assert tags == (
        EntityTag("w", weak=True),
        EntityTag("a,b"),  # a quoted opaque-tag may hold a comma (RFC 9110 §8.8.3)
        EntityTag("abc"),  # a client that dropped the quotes
        EntityTag(""),
    )
    for bad in ("", " , ", '"a" "b"', '"a', 'W/"a', "a b", '"\x01"'):
        with pytest.raises(ParseError):
            IfMatch.parse(bad)
    assert EntityTag.parse(' W/"x" ') == EntityTag("x", weak=True)
    with pytest.raises(ParseError):
        EntityTag.parse('"x" y')


def test_adversarial_if_match_on_a_patch_is_a_412() -> None:
    with pytest.raises(PreconditionFailed, match="does not parse"):
        check_if_match(if_match=REPORTED, etag_header=None, current='"abc"', strict=False)


def test_media_types() -> None:
    parsed = MediaType.parse('Application/SDP ; Charset="utf-8"; ;x=y')
    assert parsed.essence == "application/sdp"
    assert parsed.parameters == (("charset", "utf-8"), ("x", "y"))
    assert parsed.parameter("CHARSET") == "utf-8"
    quoted = MediaType.parse('application/sdp; valid-until="Thu, 03 Dec 2026 \\"x\\""')
    assert quoted.parameter("valid-until") == 'Thu, 03 Dec 2026 "x"'
    for bad in ("", "application", "/sdp", "application/", "a/b; c", "a/b c", 'a/b;c="x'):
        assert media_type_essence(bad) is None, bad
    assert media_type_essence(None) is None
    assert media_type_essence("application/trickle-ice-sdpfrag") == (
        "application/trickle-ice-sdpfrag"
    )


# ------------------------------------------------------------ Forwarded, X-Forwarded-For


class CountingText(str):
    """A header value that counts the characters a parser reads from it: one per
    ``value[i]``, the length taken per ``value[a:b]``."""

    reads: int

    def __new__(cls, text: str) -> CountingText:
        value = super().__new__(cls, text)
        value.reads = 0
        return value

    def __getitem__(self, key: SupportsIndex | slice) -> str:
        item = super().__getitem__(key)
        self.reads += max(1, len(item))
        return item


@pytest.fixture
def handed_to_parse_node(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The characters handed to the node parser (ip_address and the port rules), in
    total: each hop's text must be parsed once, not once per hop."""
    handed = [0]
    parse_node = clientaddr.parse_node

    def counting(text: str) -> clientaddr.IPAddress | None:
        handed[0] += len(text)
        return parse_node(text)

    monkeypatch.setattr(clientaddr, "parse_node", counting)
    yield handed


ADVERSARIAL_FORWARDED: list[Callable[[int], str]] = [
    lambda n: 'for="' + "\\a" * n,  # a quoted-string that never closes
    lambda n: "for=a;" * n,  # one element, the same parameter again and again
    lambda n: "a=b;" * n + 'for="[' + ":" * n + ']"',
    lambda n: "," * n + "for=x",  # empty elements
    lambda n: " ;" * n + "for=192.0.2.1",
    lambda n: "for=" + "a" * n + " " * n + "!",  # garbage after a long token
    lambda n: 'for="' + "1" * n + '"',  # a long node that is no address
    lambda n: "for=192.0.2.1, " * n,  # many hops
    lambda n: 'for="[2001:db8::1]:_' + "p" * n + '"',  # a long obfuscated port
]


@pytest.mark.parametrize("build", ADVERSARIAL_FORWARDED)
def test_forwarded_work_grows_linearly(
    build: Callable[[int], str], handed_to_parse_node: list[int]
) -> None:
    def work(n: int) -> tuple[int, int, int]:
        value = CountingText(build(n))
        handed_to_parse_node[0] = 0
        clientaddr.parse_forwarded_for(value)
        return len(value), value.reads, handed_to_parse_node[0]

    _, small_reads, _ = work(500)
    length, reads, handed = work(4000)
    assert length >= 4000
    assert reads <= 8 * small_reads + 16
    # A character is read at most three times: scanned, sliced out, lower-cased as a name.
    assert reads <= 3 * length + 16
    assert handed <= length


ADVERSARIAL_X_FORWARDED_FOR: list[Callable[[int], str]] = [
    lambda n: "," * n + "192.0.2.1",
    lambda n: "192.0.2.1, " * n,
    lambda n: " " * n + "1" * n,
    lambda n: "[" + ":" * n,
]


@pytest.mark.parametrize("build", ADVERSARIAL_X_FORWARDED_FOR)
def test_x_forwarded_for_hands_each_hop_to_the_node_parser_once(
    build: Callable[[int], str], handed_to_parse_node: list[int]
) -> None:
    value = build(4000)
    clientaddr.parse_x_forwarded_for(value)
    assert handed_to_parse_node[0] <= len(value)
