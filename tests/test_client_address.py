"""Client addresses behind trusted reverse proxies (whepfan/http/clientaddr.py).

The header parsers on RFC 7239's own examples and on Hypothesis-generated headers (what a
proxy writes parses back to what it meant; no input raises); the right-to-left walk
(nginx's real_ip_recursive); spoofing (a client behind a trusted proxy, or a client
that is not one, cannot choose its address, whatever it writes); and, through the real
aiohttp application, the POST rate limit and the pending cap keyed by the forwarded
address, with malformed headers answered as from the proxy, never 5xx.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _signalling import SDP
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_router import WHEP_OFFER, Harness, connect_viewer

from whepfan.cli import build_parser, settings_from_args
from whepfan.http import HttpOptions, create_app
from whepfan.http.clientaddr import (
    Client,
    ForwardedHeader,
    TrustedProxies,
    parse_forwarded_for,
    parse_networks,
    parse_node,
    parse_x_forwarded_for,
)
from whepfan.http.pending import PendingLimit
from whepfan.http.ratelimit import RateLimit
from whepfan.settings import Settings, SettingsError

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def _proxies(
    *cidrs: str, header: ForwardedHeader = ForwardedHeader.X_FORWARDED_FOR
) -> TrustedProxies:
    return TrustedProxies(networks=parse_networks(cidrs), header=header)


# ---------------------------------------------------------------- nodes and parsers


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("192.0.2.43", V4("192.0.2.43")),
        ("192.0.2.43:47011", V4("192.0.2.43")),
        ("192.0.2.43:_port9", V4("192.0.2.43")),  # RFC 7239 §6.3 obfuscated port
        ("[2001:db8:cafe::17]", V6("2001:db8:cafe::17")),
        ("[2001:db8:cafe::17]:4711", V6("2001:db8:cafe::17")),
        ("2001:db8:cafe::17", V6("2001:db8:cafe::17")),  # bare, as X-Forwarded-For has it
        ("::ffff:192.0.2.1", V4("192.0.2.1")),  # IPv4-mapped: the IPv4 address
        ("unknown", None),  # RFC 7239 §6.2
        ("_gazonk", None),  # §6.3 obfuscated node
        ("[192.0.2.43]", None),  # brackets are for IPv6
        ("2001:db8::1:80", V6("2001:db8::1:80")),  # a bare IPv6 address has no port
        ("[2001:db8::1", None),
        ("[2001:db8::1]80", None),
        ("192.0.2.43:65536", None),
        ("192.0.2.43:", None),
        ("fe80::1%eth0", None),  # a zone means nothing beyond the host that wrote it
        ("example.com", None),
        ("", None),
    ],
)
def test_nodes(text: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> None:
    assert parse_node(text) == address


def test_rfc_7239_examples() -> None:
    # §4 and §7.1: the forms a Forwarded field takes.
    assert parse_forwarded_for('for="_gazonk"') == [None]
    assert parse_forwarded_for('For="[2001:db8:cafe::17]:4711"') == [V6("2001:db8:cafe::17")]
    assert parse_forwarded_for("for=192.0.2.60;proto=http;by=203.0.113.43") == [V4("192.0.2.60")]
    assert parse_forwarded_for("for=192.0.2.43, for=198.51.100.17") == [
        V4("192.0.2.43"),
        V4("198.51.100.17"),
    ]
    # §7.4: for=unknown, and an element that names no client at all.
    assert parse_forwarded_for("for=unknown, proto=https, for=192.0.2.1") == [
        None,
        None,
        V4("192.0.2.1"),
    ]


def test_forwarded_details() -> None:
    # Quoted-pairs, spaces around separators, empty elements and pairs.
    assert parse_forwarded_for('for="\\[2001:db8::1\\]:80" ; proto=https ,, ;for=192.0.2.9') == [
        V6("2001:db8::1"),
        V4("192.0.2.9"),
    ]
    # A parameter twice in one element (§4 MUST NOT): that element names nobody.
    assert parse_forwarded_for("for=192.0.2.1;for=192.0.2.2, for=192.0.2.3") == [
        None,
        V4("192.0.2.3"),
    ]
    assert parse_forwarded_for("") == []
    for malformed in (
        'for="192.0.2.1',  # unterminated quoted-string
        "for",
        "=192.0.2.1",
        "for=192.0.2.1 x",
        "for = 192.0.2.1",
        "for=[2001:db8::1]",  # unquoted brackets are not a token
        'for="192.0.2.1\x01"',
        'for="\\',
    ):
        assert parse_forwarded_for(malformed) is None, malformed


def test_x_forwarded_for_details() -> None:
    assert parse_x_forwarded_for("203.0.113.7, 10.0.0.2") == [V4("203.0.113.7"), V4("10.0.0.2")]
    assert parse_x_forwarded_for(" 2001:db8::1 ,[2001:db8::2]:443,, unknown,x") == [
        V6("2001:db8::1"),
        V6("2001:db8::2"),
        None,
        None,
    ]
    assert parse_x_forwarded_for("") == []


def test_networks() -> None:
    assert parse_networks(["10.0.0.0/8", "192.0.2.1", " 2001:db8::/32 "]) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.1/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    for bad in ("10.0.0.1/8", "nginx", "10.0.0.0/33"):
        with pytest.raises(ValueError, match="not an address or a CIDR"):
            parse_networks([bad])


# ---------------------------------------------------------------- the walk


def test_without_a_trusted_peer_the_headers_are_ignored() -> None:
    """The spoofing case: a client that is not a trusted proxy names anyone it likes."""
    proxies = _proxies("10.0.0.0/8")
    spoofed = ["198.51.100.1"]
    assert proxies.client("203.0.113.9", spoofed) == Client("203.0.113.9")
    assert TrustedProxies().client("10.0.0.1", spoofed) == Client("10.0.0.1")  # none trusted
    assert proxies.client(None, spoofed) == Client(None)  # a Unix socket


def test_the_walk_skips_trusted_hops_from_the_right() -> None:
    proxies = _proxies("10.0.0.0/8", "2001:db8:ffff::/48")
    # The client's own entry (198.51.100.1) is left of the first untrusted one: unread.
    chain = ["198.51.100.1, 203.0.113.7, 10.0.0.3"]
    assert proxies.client("10.0.0.2", chain) == Client("203.0.113.7", forwarded=True)
    # Several fields are one list, in order (RFC 9110 §5.3).
    split = ["198.51.100.1", "203.0.113.7", "10.0.0.3"]
    assert proxies.client("10.0.0.2", split) == Client("203.0.113.7", forwarded=True)
    # Every hop trusted: the leftmost is the client (an internal one).
    assert proxies.client("10.0.0.2", ["10.1.1.1, 10.0.0.3"]) == Client("10.1.1.1", True)
    # IPv4-mapped peers are compared as IPv4; IPv6 clients come out canonical.
    assert proxies.client("::ffff:10.0.0.2", ["2001:DB8::0:1"]) == Client("2001:db8::1", True)
    assert proxies.client("2001:db8:ffff::1", ["192.0.2.5"]) == Client("192.0.2.5", True)


def test_an_entry_that_is_not_an_address_ends_the_walk_at_the_proxy_that_wrote_it() -> None:
    proxies = _proxies("10.0.0.0/8")
    assert proxies.client("10.0.0.2", ["198.51.100.1, unknown, 10.0.0.3"]) == Client(
        "10.0.0.3", forwarded=True
    )
    assert proxies.client("10.0.0.2", ["garbage"]) == Client("10.0.0.2", forwarded=True)
    assert proxies.client("10.0.0.2", [""]) == Client("10.0.0.2", forwarded=True)


def test_forwarded_is_read_only_when_configured_and_a_malformed_one_is_the_peer() -> None:
    proxies = _proxies("10.0.0.0/8", header=ForwardedHeader.FORWARDED)
    element = 'for="[2001:db8::7]:4711";proto=https, for=10.0.0.3'
    assert proxies.client("10.0.0.2", [element]) == Client("2001:db8::7", forwarded=True)
    assert proxies.client("10.0.0.2", ['for="broken']) == Client("10.0.0.2", forwarded=True)
    assert proxies.client("10.0.0.2", ['for="_hidden"']) == Client("10.0.0.2", forwarded=True)


def test_forwarded_clients_are_never_exempt_as_loopback() -> None:
    assert Client("127.0.0.1").key(exempt_loopback=True) is None
    assert Client("127.0.0.1", forwarded=True).key(exempt_loopback=True) == "127.0.0.1"
    assert Client("2001:db8:1:2::9", True).key(exempt_loopback=True) == "2001:db8:1:2::/64"


# ---------------------------------------------------------------- Hypothesis

_ipv4 = st.ip_addresses(v=4)


def _not_mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return isinstance(address, V6) and address.ipv4_mapped is None  # those read as IPv4


_ipv6: st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address] = st.ip_addresses(
    v=6
).filter(_not_mapped)
_port = st.one_of(
    st.none(), st.integers(0, 65535).map(str), st.from_regex(r"_[a-z0-9._-]{1,8}", fullmatch=True)
)
_obfuscated = st.from_regex(r"_[A-Za-z0-9._-]{1,12}", fullmatch=True)


@st.composite
def _forwarded_node(
    draw: st.DrawFn,
) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """(the for= value as a proxy writes it, the address it means or None)."""
    kind = draw(st.sampled_from(["v4", "v6", "unknown", "obfuscated"]))
    port = draw(_port)
    suffix = f":{port}" if port is not None else ""
    if kind == "v4":
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = draw(_ipv4)
        text = f"{address}{suffix}"
    elif kind == "v6":
        address = draw(_ipv6)
        text = f"[{address}]{suffix}"
    else:
        text = "unknown" if kind == "unknown" else draw(_obfuscated)
        return _quote_if_needed(text + suffix, draw), None
    return _quote_if_needed(text, draw), address


def _quote_if_needed(text: str, draw: st.DrawFn) -> str:
    """RFC 7239 §6: a value with ':' or '[' is not a token and must be quoted; any value
    may be, with quoted-pairs wherever a writer likes."""
    token = all(char.isalnum() or char in "!#$%&'*+-.^_`|~" for char in text)
    if token and not draw(st.booleans()):
        return text
    escaped = "".join(
        f"\\{char}" if draw(st.booleans()) or char in '"\\' else char for char in text
    )
    return f'"{escaped}"'


_ows = st.sampled_from(["", " ", "  ", "\t"])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_forwarded_node(), st.booleans(), st.booleans(), _ows, _ows), max_size=8))
def test_forwarded_parses_back_to_what_each_hop_meant(
    hops: list[tuple[tuple[str, object], bool, bool, str, str]],
) -> None:
    elements: list[str] = []
    expected: list[object] = []
    for (value, address), upper, extra, before, after in hops:
        name = "For" if upper else "for"
        pairs = [f"{name}={value}"]
        if extra:
            pairs.insert(0, "proto=https")
            pairs.append('by="[2001:db8::1]"')
        elements.append(before + f"{after};{before}".join(pairs) + after)
        expected.append(address)
    assert parse_forwarded_for(",".join(elements)) == expected


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(_ipv4, _ipv6),
            _port.filter(lambda p: p is None or not p.startswith("_")),
            _ows,
            _ows,
        ),
        max_size=8,
    )
)
def test_x_forwarded_for_parses_back(hops: list[tuple[object, str | None, str, str]]) -> None:
    entries = []
    for address, port, before, after in hops:
        text = str(address)
        if port is not None:
            text = f"[{text}]:{port}" if isinstance(address, V6) else f"{text}:{port}"
        entries.append(before + text + after)
    assert parse_x_forwarded_for(",".join(entries)) == [address for address, *_ in hops]


@settings(max_examples=1000, deadline=None)
@given(st.text(), st.sampled_from(list(ForwardedHeader)))
def test_no_header_value_raises_and_the_client_is_an_address_it_or_the_peer_names(
    value: str, header: ForwardedHeader
) -> None:
    parse_forwarded_for(value)
    parse_x_forwarded_for(value)
    proxies = _proxies("0.0.0.0/0", "::/0", header=header)  # everyone trusted: worst case
    client = proxies.client("10.0.0.2", [value])
    assert client.forwarded
    hops = (
        parse_forwarded_for(value)
        if header is ForwardedHeader.FORWARDED
        else parse_x_forwarded_for(value)
    )
    named = {str(hop) for hop in hops or [] if hop is not None}
    assert client.address in named | {"10.0.0.2"}


@settings(max_examples=1000, deadline=None)
@given(st.text(), st.one_of(_ipv4, _ipv6), st.sampled_from(list(ForwardedHeader)))
def test_a_client_behind_a_trusted_proxy_cannot_choose_its_address(
    written: str, real: ipaddress.IPv4Address | ipaddress.IPv6Address, header: ForwardedHeader
) -> None:
    """Whatever the client puts in the header, the proxy appends the address it saw: the
    client is that address, or (a Forwarded field the client broke, e.g. with an open
    quote) the proxy itself, never anything the client wrote."""
    assume(not (real.version == 4 and real in ipaddress.ip_network("10.0.0.0/8")))
    proxies = _proxies("10.0.0.0/8", header=header)
    if header is ForwardedHeader.FORWARDED:
        appended = f'for="[{real}]"' if real.version == 6 else f"for={real}"
    else:
        appended = str(real)
    client = proxies.client("10.0.0.2", [written, appended])
    if header is ForwardedHeader.X_FORWARDED_FOR:
        assert client == Client(str(real), forwarded=True)
    else:
        assert client in (Client(str(real), forwarded=True), Client("10.0.0.2", forwarded=True))


# ---------------------------------------------------------------- settings and CLI


def test_settings_cli_and_environment() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--trusted-proxy",
            "::1",
            "--forwarded-header",
            "forwarded",
        ]
    )
    settings = settings_from_args(args, {})
    assert settings.trusted_proxies == ("10.0.0.0/8", "::1")
    options = settings.http_options().trusted_proxies
    assert options == TrustedProxies(
        networks=parse_networks(["10.0.0.0/8", "::1"]), header=ForwardedHeader.FORWARDED
    )
    environ = {
        "WHEPFAN_TRUSTED_PROXY": "127.0.0.1, 192.0.2.0/24",
        "WHEPFAN_FORWARDED_HEADER": "Forwarded",
    }
    from_env = Settings.resolve(cli={}, environ=environ)
    assert from_env.trusted_proxies == ("127.0.0.1", "192.0.2.0/24")
    assert from_env.http_options().trusted_proxies.header is ForwardedHeader.FORWARDED
    assert Settings().http_options().trusted_proxies == TrustedProxies()  # none by default
    with pytest.raises(
        SettingsError, match=re.escape("WHEPFAN_TRUSTED_PROXY=10.0.0.1/8: '10.0.0.1/8' is not")
    ):
        Settings.resolve(cli={}, environ={"WHEPFAN_TRUSTED_PROXY": "10.0.0.1/8"})
    with pytest.raises(SettingsError, match="--forwarded-header x-real-ip: is one of"):
        Settings.resolve(cli={"forwarded_header": "x-real-ip"}, environ={})


def test_toml_takes_the_plural(tmp_path: Path) -> None:
    path = tmp_path / "whepfan.toml"
    path.write_text('trusted_proxies = ["10.0.0.0/8"]\nforwarded_header = "forwarded"\n')
    settings = Settings.resolve(cli={}, environ={}, config_path=path)
    assert settings.trusted_proxies == ("10.0.0.0/8",)


# ---------------------------------------------------------------- through the application


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    connect_viewer(h, 0.0, publisher=True)
    yield h
    h.close()


def _app(harness: Harness, **options: Any) -> TestClient[web.Request, web.Application]:
    app = create_app(router=harness.router, clock=lambda: 0.0, options=HttpOptions(**options))
    return TestClient(TestServer(app))


async def test_the_rate_limit_keys_on_the_client_a_trusted_proxy_names(harness: Harness) -> None:
    """The test client is on loopback; as a trusted proxy its X-Forwarded-For counts,
    each forwarded client has its own bucket, and none is exempt as loopback."""
    limit = RateLimit(rate=0.001, burst=1)  # loopback exempt, as by default
    async with _app(
        harness, post_rate_limit=limit, trusted_proxies=_proxies("127.0.0.1")
    ) as client:

        async def post(forwarded_for: str | None) -> int:
            headers = {**SDP, **({"X-Forwarded-For": forwarded_for} if forwarded_for else {})}
            response = await client.post("/whep/live", data=WHEP_OFFER, headers=headers)
            return response.status

        assert await post("203.0.113.7") == 201
        assert await post("203.0.113.7") == 429
        assert await post("198.51.100.1, 203.0.113.7") == 429  # its own prefix changes nothing
        assert await post("203.0.113.8") == 201  # another client
        assert await post("2001:db8:1:2::1") == 201
        assert await post("2001:db8:1:2::2") == 429  # the same /64
        # Malformed: the client is the proxy, one bucket for all such, not exempt; never 5xx.
        assert await post("not-an-address") == 201
        assert await post("also garbage") == 429
        # The proxy itself, with no header: loopback, exempt as before.
        assert [await post(None) for _ in range(3)] == [201, 201, 201]


async def test_a_client_that_is_not_a_trusted_proxy_cannot_spoof_the_header(
    harness: Harness,
) -> None:
    limit = RateLimit(rate=0.001, burst=1, exempt_loopback=False)
    async with _app(
        harness, post_rate_limit=limit, trusted_proxies=_proxies("10.0.0.0/8")
    ) as client:
        statuses = [
            (
                await client.post(
                    "/whep/live",
                    data=WHEP_OFFER,
                    headers={**SDP, "X-Forwarded-For": f"203.0.113.{n}"},
                )
            ).status
            for n in range(3)
        ]
        assert statuses == [201, 429, 429]  # all the peer's, whatever they claim


async def test_the_pending_cap_keys_on_the_forwarded_client_too(harness: Harness) -> None:
    proxies = _proxies("127.0.0.1", header=ForwardedHeader.FORWARDED)
    async with _app(
        harness, pending_limit=PendingLimit(max_per_client=1), trusted_proxies=proxies
    ) as client:

        async def post(forwarded: str) -> int:
            headers = {**SDP, "Forwarded": forwarded}
            return (await client.post("/whep/live", data=WHEP_OFFER, headers=headers)).status

        assert await post('for="[2001:db8::5]:1234"') == 201
        assert await post('for="[2001:db8::6]"') == 429  # same /64, still connecting
        assert await post("for=192.0.2.1") == 201
        # A Forwarded field the client broke: the proxy's bucket, not exempt, not a 500.
        assert await post('for="192.0.2.9') == 201
        assert await post("for=;") == 429
        # X-Forwarded-For is not what this proxy writes: a client's copy is ignored.
        headers = {**SDP, "X-Forwarded-For": "198.51.100.3"}
        for _ in range(2):  # the proxy's own request then: loopback, exempt
            response = await client.post("/whep/live", data=WHEP_OFFER, headers=headers)
            assert response.status == 201
