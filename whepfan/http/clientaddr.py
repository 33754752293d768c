"""Who the client is: the TCP peer, or, behind a trusted reverse proxy, the address the
proxy says it forwarded for.

Behind nginx, HAProxy or a cloud load balancer every TCP peer is the proxy, so per-client
limits (the POST rate limit, ratelimit.py; the pending-session cap, pending.py) would put
every client in one bucket. A proxy names its client in a header it appends to:
``X-Forwarded-For`` (de facto: comma-separated addresses, the client first and each proxy
appending its own peer) or ``Forwarded`` (RFC 7239 §4: one element per hop, its ``for=``
the client that hop saw, §5.2).

Only a TCP peer in ``trusted`` is believed, and only for the entries it and the other
trusted proxies appended: the list is walked from the right (the entry our peer appended)
while the address reached is itself a trusted proxy, and the first one that is not is the
client, as nginx's ``real_ip_recursive on`` does. Everything left of it was written by the
client and is never read, so a client cannot choose its own address. An entry that is not
an address (``unknown``, RFC 7239 §6.2; an obfuscated ``_name``, §6.3; garbage) ends the
walk: the proxy that wrote it did not know its client, so the client is taken to be that
proxy. A ``Forwarded`` field that does not parse as a whole is ignored and the client is
the TCP peer. Nothing here raises on header contents.

One header is read, the configured one (:class:`ForwardedHeader`), never "Forwarded if
present, else X-Forwarded-For": a proxy that writes one passes a client's own copy of the
other through untouched (nginx forwards ``Forwarded`` as the client sent it unless told
otherwise), and reading it would let any client name its address.

A client found through a proxy is never exempt as loopback (:attr:`Client.forwarded`):
the exemption is for tools on this host talking to us directly, and a proxy on this host
is loopback to us while its clients are not; a client that garbles the header is keyed as
the proxy, in one bucket with every other such client, rather than exempted with it.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiohttp import web

from whepfan.http.ratelimit import client_key

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 9110 §5.6.2 tchar, the characters of a token.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# RFC 7239 §6.3 obfuscated node and port characters (after the leading "_").
_OBFUSCATED = frozenset("._-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_OWS = " \t"


class ForwardedHeader(enum.Enum):
    """The header the trusted proxies write their client into."""

    X_FORWARDED_FOR = "x-forwarded-for"
    FORWARDED = "forwarded"


@dataclass(frozen=True, slots=True)
class Client:
    """A request's client: its address as text (None: no peer address, a Unix socket),
    and whether a trusted proxy's header named it (then never exempt as loopback)."""

    address: str | None
    forwarded: bool = False

    def key(self, *, exempt_loopback: bool) -> str | None:
        """The key per-client limits count it under (ratelimit.client_key), or None
        when it is not limited."""
        return client_key(self.address, exempt_loopback=exempt_loopback and not self.forwarded)


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (``10.0.0.0/8``, ``2001:db8::/32``) or single addresses; ValueError naming
    the first that is neither (a network with host bits set, ``10.0.0.1/8``, included:
    it is a typo for one of two networks)."""
    networks: list[IPNetwork] = []
    for value in values:
        text = value.strip()
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError:
            raise ValueError(f"{value!r} is not an address or a CIDR network") from None
    return tuple(networks)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustedProxies:
    """The reverse proxies whose forwarding header is believed (empty: none is)."""

    networks: tuple[IPNetwork, ...] = ()
    header: ForwardedHeader = ForwardedHeader.X_FORWARDED_FOR

    def trusts(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def client(self, peer: str | None, header_values: Sequence[str]) -> Client:
        """The client of a request from TCP ``peer`` carrying ``header_values`` (every
        field of the configured header, in order)."""
        peer_address = _address(peer)
        if peer_address is None or not header_values or not self.trusts(peer_address):
            return Client(peer)
        joined = ",".join(header_values)  # RFC 9110 §5.3: fields combine as one list
        if self.header is ForwardedHeader.FORWARDED:
            hops = parse_forwarded_for(joined)
            if hops is None:
                return Client(str(peer_address), forwarded=True)
        else:
            hops = parse_x_forwarded_for(joined)
        current = peer_address
        for hop in reversed(hops):
            if hop is None:
                break  # the proxy at ``current`` did not know its client
            current = hop
            if not self.trusts(hop):
                break
        return Client(str(current), forwarded=True)

    def of(self, request: web.BaseRequest) -> Client:
        """The client of an aiohttp request."""
        if not self.networks:
            return Client(request.remote)
        return self.client(request.remote, request.headers.getall(self.header.value, []))


def _address(text: str | None) -> IPAddress | None:
    """An address as compared with networks: IPv4-mapped IPv6 as the IPv4 address."""
    if text is None:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_node(text: str) -> IPAddress | None:
    """An RFC 7239 §6 node (``192.0.2.43``, ``192.0.2.43:47011``, ``[2001:db8::1]``,
    ``[2001:db8::1]:4711``, an obfuscated port ``:_p``) as its address; None for
    ``unknown``, an obfuscated node, or anything else. A bare IPv6 address (what
    X-Forwarded-For carries) is accepted too; an address with a zone (``%eth0``) is not:
    a zone means nothing beyond the host that wrote it."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if rest and not (rest.startswith(":") and _is_port(rest[1:])):
            return None
        address = _plain_address(host)
        return address if isinstance(address, ipaddress.IPv6Address) else None
    address = _plain_address(text)
    if address is not None:
        return address
    host, colon, port = text.rpartition(":")
    if not colon or not _is_port(port):
        return None
    address = _plain_address(host)
    return address if isinstance(address, ipaddress.IPv4Address) else None


def _plain_address(text: str) -> IPAddress | None:
    if "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    """RFC 7239 §6: ``node-port = port / obfport`` (1*5DIGIT / "_" 1*(ALPHA/DIGIT/._-))."""
    if text.startswith("_"):
        return len(text) > 1 and all(char in _OBFUSCATED for char in text[1:])
    return 1 <= len(text) <= 5 and text.isascii() and text.isdigit() and int(text) <= 65535


def parse_x_forwarded_for(value: str) -> list[IPAddress | None]:
    """Each comma-separated entry of an X-Forwarded-For value, in order: its address, or
    None where it is not one. Empty entries are no hop (RFC 9110 §5.6.1)."""
    hops: list[IPAddress | None] = []
    for entry in value.split(","):
        text = entry.strip(_OWS)
        if text:
            hops.append(parse_node(text))
    return hops


def parse_forwarded_for(value: str) -> list[IPAddress | None] | None:
    """The ``for=`` of each element of a Forwarded value (RFC 7239 §4), in order: its
    address (:func:`parse_node`), or None where the element has no usable one (no
    ``for``, two of them, ``unknown``, obfuscated). None when the value does not parse
    (an unterminated quoted-string, a pair without ``=``, a character no rule allows).

    One pass over the text. Parameter names are case-insensitive (§4); values are tokens
    or quoted-strings with quoted-pairs (RFC 9110 §5.6.4); whitespace is allowed around
    the ``,`` and ``;`` separators, as the list rule does for commas and as proxies write."""
    hops: list[IPAddress | None] = []
    length = len(value)
    position = 0
    node: str | None = None  # this element's for= value, unquoted
    names: set[str] = set()
    duplicate = False

    def finish() -> None:
        if names:  # an empty element ("a, , b") is no hop
            hops.append(None if duplicate or node is None else parse_node(node))

    while True:
        while position < length and value[position] in _OWS:
            position += 1
        if position == length:
            finish()
            return hops
        char = value[position]
        if char == ",":
            finish()
            node, names, duplicate = None, set(), False
            position += 1
            continue
        if char == ";":
            position += 1
            continue
        start = position
        while position < length and value[position] in _TCHAR:
            position += 1
        name = value[start:position].lower()
        if not name or position == length or value[position] != "=":
            return None
        position += 1
        if position < length and value[position] == '"':
            text, position = _quoted_string(value, position)
            if text is None:
                return None
        else:
            start = position
            while position < length and value[position] in _TCHAR:
                position += 1
            if position == start:
                return None
            text = value[start:position]
        while position < length and value[position] in _OWS:
            position += 1
        if position < length and value[position] not in ",;":
            return None
        if name in names:
            duplicate = True  # §4: a parameter MUST NOT occur twice in one element
        names.add(name)
        if name == "for":
            node = text


def _quoted_string(value: str, position: int) -> tuple[str | None, int]:
    """The unescaped text of the quoted-string opening at ``position``, and the position
    after it; None if it is not terminated or holds a control character."""
    out: list[str] = []
    position += 1
    length = len(value)
    while position < length:
        char = value[position]
        if char == '"':
            return "".join(out), position + 1
        if char == "\\":
            position += 1
            if position == length:
                return None, position
            char = value[position]
        if (ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F:
            return None, position
        out.append(char)
        position += 1
    return None, position
