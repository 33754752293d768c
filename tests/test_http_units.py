"""Unit tests of the HTTP layer's small parts: If-Match, bearer tokens, ice-server Links."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from whepfan.errors import ParseError, PreconditionFailed, PreconditionRequired, Unauthorized
from whepfan.http.auth import presented_token, require_token
from whepfan.http.etag import EntityTag, IfMatch, check_if_match
from whepfan.http.links import IceServer

# ---------------------------------------------------------------------------- If-Match

_etagc = st.text(
    st.characters(codec="latin-1", exclude_characters='"\x7f', min_codepoint=0x21), max_size=20
)


@given(opaque=_etagc, weak=st.booleans())
def test_entity_tag_round_trip(opaque: str, weak: bool) -> None:
    tag = EntityTag(opaque, weak=weak)
    assert EntityTag.parse(str(tag)) == tag


@given(tags=st.lists(st.builds(EntityTag, _etagc, weak=st.booleans()), min_size=1, max_size=4))
def test_if_match_list_round_trip(tags: list[EntityTag]) -> None:
    # A lone "*" is read as the wildcard on purpose (WHEP examples quote the star).
    assume(tags != [EntityTag("*")])
    parsed = IfMatch.parse(", ".join(map(str, tags)))
    assert not parsed.wildcard and list(parsed.tags) == tags


@given(st.text(max_size=60))
def test_if_match_parser_returns_or_raises_parse_error(value: str) -> None:
    with contextlib.suppress(ParseError):
        IfMatch.parse(value)


def test_if_match_strong_comparison_rfc9110_13_1_1() -> None:
    # RFC 9110 §8.8.3.2 comparison table: only strong tags with equal opaque-tags match.
    assert IfMatch.parse('"1"').matches('"1"')
    assert not IfMatch.parse('W/"1"').matches('"1"')
    assert not IfMatch.parse('"2"').matches('"1"')
    assert IfMatch.parse('W/"1", "1"').matches('"1"')
    assert IfMatch.parse("*").matches('"anything"')
    assert IfMatch.parse('"*"').matches('"anything"')  # WHEP examples quote the star
    assert IfMatch.parse("abc").matches('"abc"')  # clients that drop the quotes


@pytest.mark.parametrize(
    ("if_match", "etag_header", "strict", "outcome"),
    [
        ('"e1"', None, False, None),
        ('"e1"', None, True, None),
        ("*", None, True, None),
        ('"e0"', None, False, PreconditionFailed),
        (None, None, False, None),
        (None, None, True, PreconditionRequired),
        (None, '"e1"', True, None),
        (None, '"e0"', False, PreconditionFailed),
        ('"e1"', '"e0"', False, None),
        ('"unterminated', None, False, PreconditionFailed),
    ],
)
def test_check_if_match_decision_table(
    if_match: str | None, etag_header: str | None, strict: bool, outcome: type[Exception] | None
) -> None:
    def run() -> None:
        check_if_match(if_match=if_match, etag_header=etag_header, current='"e1"', strict=strict)

    if outcome is None:
        run()
    else:
        with pytest.raises(outcome):
            run()


# ---------------------------------------------------------------------------- bearer tokens


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer abc", "abc"),
        ("BEARER   abc ", "abc"),
        ("abc", "abc"),
        ("Basic YWJj", None),
        ("Bearer ", "Bearer"),  # stripped to a bare word: read as a raw token
    ],
)
def test_presented_token(header: str | None, token: str | None) -> None:
    assert presented_token(header) == token


def test_require_token() -> None:
    require_token(None, None)  # open resource
    require_token("t", "Bearer t")
    require_token("t", "t")
    with pytest.raises(Unauthorized):
        require_token("t", None)
    with pytest.raises(Unauthorized):
        require_token("t", "Bearer undefined")


@given(st.one_of(st.none(), st.text(max_size=50)))
def test_require_token_only_ever_raises_unauthorized(header: str | None) -> None:
    with contextlib.suppress(Unauthorized):
        require_token("secret", header)


# ---------------------------------------------------------------------------- ice-server Links


def test_turn_rest_credentials_draft_uberti_behave_turn_rest_2_2() -> None:
    server = IceServer(url="turns:turn.example.net:5349", shared_secret="north", credential_ttl=60)
    username, password = server.credentials(1000.9) or ("", "")
    assert username == "1060:whepfan"
    expected = hmac.new(b"north", b"1060:whepfan", hashlib.sha1).digest()
    assert base64.b64decode(password) == expected


def test_link_value_quotes_credentials() -> None:
    server = IceServer(url="turn:t.example?transport=tcp", username='a"b', credential="c\\d")
    assert server.link_value(0) == (
        '<turn:t.example?transport=tcp>; rel="ice-server"; username="a\\"b"; '
        'credential="c\\\\d"; credential-type="password"'
    )
    assert IceServer(url="stun:s.example").link_value(0) == '<stun:s.example>; rel="ice-server"'


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("stun:stun.example.net", IceServer(url="stun:stun.example.net")),
        (
            "turn:t.example:3478?transport=udp;username=u;credential=p",
            IceServer(url="turn:t.example:3478?transport=udp", username="u", credential="p"),
        ),
        (
            "turns:t.example;secret=s;ttl=300",
            IceServer(url="turns:t.example", shared_secret="s", credential_ttl=300),
        ),
    ],
)
def test_ice_server_spec(spec: str, expected: IceServer) -> None:
    assert IceServer.parse(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "http://example.net",
        "turn:t.example",  # TURN needs credentials
        "stun:s.example;username=u;credential=p",
        "turn:t.example;username=u",
        "turn:t.example;secret=s;username=u;credential=p",
        "turn:t.example;secret=s;ttl=-1",
        "turn:t.example;secret=s;colour=blue",
        "turn:t.example;nonsense",
        "",
    ],
)
def test_bad_ice_server_specs(spec: str) -> None:
    with pytest.raises(ParseError):
        IceServer.parse(spec)


@given(st.text(max_size=80))
def test_ice_server_parser_returns_or_raises_parse_error(spec: str) -> None:
    with contextlib.suppress(ParseError):
        IceServer.parse(spec)
