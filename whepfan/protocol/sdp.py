"""SDP (RFC 8866) as WebRTC uses it, plus trickle-ICE fragments (RFC 8840).

Theory of operation: a session description is a sequence of ``<type>=<value>`` lines. Lines
that WebRTC negotiation depends on are parsed into fields of :class:`SessionDescription` and
:class:`MediaSection`; every other attribute is kept verbatim, in order, in ``attributes``, so
that ``parse(serialize(parse(x))) == parse(x)``. Serialisation writes the known fields in the
order Chromium uses, then the unknown attributes, with ``\\r\\n`` line ends (RFC 8866 §5).

aiortc's SDP module is not used because it drops ``a=rid``, ``a=simulcast`` and
``a=extmap-allow-mixed``, all of which a simulcast publisher needs answered.

Sans-IO: this module only turns text into values and values into text. Any input that does
not parse raises :class:`~whepfan.errors.ParseError` naming the offending line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from whepfan.errors import ParseError

__all__ = [
    "DIRECTIONS",
    "SETUP_ROLES",
    "Candidate",
    "Codec",
    "Connection",
    "Extmap",
    "FragmentMedia",
    "Group",
    "MediaSection",
    "Origin",
    "Rid",
    "SdpFragment",
    "SessionDescription",
    "Simulcast",
    "SimulcastStream",
    "SsrcAttribute",
    "SsrcGroup",
    "parse_sdpfrag",
    "serialize_sdpfrag",
]

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
# RFC 4145 §4 / RFC 8842 §5.1: the DTLS role attribute values.
SETUP_ROLES = ("actpass", "active", "passive", "holdconn")

_DIGITS = re.compile(r"[0-9]+")
# RFC 8866 §9: <type> is exactly one lower-case letter.
_SESSION_TYPES = frozenset("vosiuepcbtrzka")
_MEDIA_TYPES = frozenset("icbka")
# RFC 8851 §10: rid-id = 1*(alpha-numeric / "-" / "_").
_RID_ID = re.compile(r"[A-Za-z0-9_-]+")
# RFC 8866 §5 line order, which serialize() writes: session i u e p, then b, then r z k;
# media i, then b k.
_SESSION_LINE_RANK = {"i": 0, "u": 0, "e": 0, "p": 0, "b": 1, "r": 2, "z": 2, "k": 2}
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")


def _int(text: str, what: str, *, low: int = 0, high: int = 2**64 - 1) -> int:
    """Strict non-negative decimal: ``int()`` would also take ``" 5"``, ``"+5"`` or non-ASCII
    digits, which would not serialise back to the same text."""
    if not _DIGITS.fullmatch(text) or len(text) > 20:
        raise ParseError(f"{what}: {text!r} is not a decimal number")
    value = int(text)
    if not low <= value <= high:
        raise ParseError(f"{what}: {value} outside {low}..{high}")
    return value


def _token(text: str, what: str) -> str:
    if not _TOKEN.fullmatch(text):
        raise ParseError(f"{what}: {text!r} is not a token")
    return text


# --------------------------------------------------------------------------------------------
# Small wire formats (one attribute or line each)
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Origin:
    """``o=`` line (RFC 8866 §5.2)."""

    username: str = "-"
    session_id: int = 0
    session_version: int = 0
    net_type: str = "IN"
    addr_type: str = "IP4"
    address: str = "127.0.0.1"

    @classmethod
    def parse(cls, value: str) -> Origin:
        parts = value.split()
        if len(parts) != 6:
            raise ParseError("o= needs 6 fields")
        return cls(
            username=parts[0],
            session_id=_int(parts[1], "o= sess-id"),
            session_version=_int(parts[2], "o= sess-version"),
            net_type=parts[3],
            addr_type=parts[4],
            address=parts[5],
        )

    def __str__(self) -> str:
        return (
            f"{self.username} {self.session_id} {self.session_version} "
            f"{self.net_type} {self.addr_type} {self.address}"
        )


@dataclass(slots=True, kw_only=True)
class Connection:
    """``c=`` line (RFC 8866 §5.7)."""

    net_type: str = "IN"
    addr_type: str = "IP4"
    address: str = "0.0.0.0"

    @classmethod
    def parse(cls, value: str) -> Connection:
        parts = value.split()
        if len(parts) != 3:
            raise ParseError("c= needs 3 fields")
        return cls(net_type=parts[0], addr_type=parts[1], address=parts[2])

    def __str__(self) -> str:
        return f"{self.net_type} {self.addr_type} {self.address}"


@dataclass(slots=True, kw_only=True)
class Group:
    """``a=group:<semantics> <mid>...`` (RFC 5888 §5; BUNDLE is RFC 9143 §7.1)."""

    semantics: str
    mids: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, value: str) -> Group:
        parts = value.split()
        if not parts:
            raise ParseError("a=group without semantics")
        return cls(semantics=parts[0], mids=parts[1:])

    def __str__(self) -> str:
        return " ".join([self.semantics, *self.mids])


@dataclass(slots=True, kw_only=True)
class Candidate:
    """An ICE candidate, RFC 8839 §5.1 grammar::

        candidate:<foundation> <component> <transport> <priority> <address> <port>
                  typ <type> [raddr <addr>] [rport <port>] *(<ext-name> <ext-value>)

    Component 0 is outside the grammar (1*3DIGIT, RFC 8445 §5.1.1.1 numbers from 1), but some
    trickling clients send it; such candidates parse and are marked not ``usable``.
    """

    foundation: str
    component: int
    transport: str
    priority: int
    address: str
    port: int
    type: str
    related_address: str | None = None
    related_port: int | None = None
    extensions: tuple[tuple[str, str], ...] = ()

    @property
    def usable(self) -> bool:
        """True when ICE can pair it: a real component id (RFC 8445 §5.1.1.1)."""
        return 1 <= self.component <= 256

    @property
    def tcptype(self) -> str | None:
        """RFC 6544 §4.5 ``tcptype`` extension, if present."""
        for name, value in self.extensions:
            if name == "tcptype":
                return value
        return None

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """Parse ``candidate:...`` with or without the ``a=`` / ``candidate:`` prefix."""
        value = text.strip()
        if value.startswith("a="):
            value = value[2:]
        if value.startswith("candidate:"):
            value = value[len("candidate:") :]
        parts = value.split()
        if len(parts) < 8 or parts[6] != "typ":
            raise ParseError("candidate: needs 'foundation comp transport prio addr port typ type'")
        foundation = parts[0]
        if len(foundation) > 64 or not re.fullmatch(r"[A-Za-z0-9+/_.-]+", foundation):
            raise ParseError(f"candidate: bad foundation {foundation!r}")
        candidate = cls(
            foundation=foundation,
            component=_int(parts[1], "candidate component", high=256),
            transport=_token(parts[2], "candidate transport"),
            priority=_int(parts[3], "candidate priority", high=2**32 - 1),
            address=parts[4],
            port=_int(parts[5], "candidate port", high=65535),
            type=_token(parts[7], "candidate type"),
        )
        rest = parts[8:]
        if len(rest) % 2:
            raise ParseError("candidate: extension without value")
        extensions: list[tuple[str, str]] = []
        for index in range(0, len(rest), 2):
            name, ext_value = rest[index], rest[index + 1]
            if name == "raddr" and candidate.related_address is None and not extensions:
                candidate.related_address = ext_value
            elif name == "rport" and candidate.related_port is None and not extensions:
                candidate.related_port = _int(ext_value, "candidate rport", high=65535)
            else:
                extensions.append((name, ext_value))
        candidate.extensions = tuple(extensions)
        return candidate

    def __str__(self) -> str:
        """The attribute value, without the ``candidate:`` prefix."""
        parts = [
            self.foundation,
            str(self.component),
            self.transport,
            str(self.priority),
            self.address,
            str(self.port),
            "typ",
            self.type,
        ]
        if self.related_address is not None:
            parts += ["raddr", self.related_address]
        if self.related_port is not None:
            parts += ["rport", str(self.related_port)]
        for name, value in self.extensions:
            parts += [name, value]
        return " ".join(parts)


@dataclass(slots=True, kw_only=True)
class Codec:
    """One payload type: ``a=rtpmap`` (RFC 8866 §6.6), ``a=fmtp`` (§6.15) and its
    ``a=rtcp-fb`` lines (RFC 4585 §4.2).

    ``fmtp`` keeps the parameters in order as (key, value); a parameter without ``=``
    (``a=fmtp:63 111/111`` for RED, RFC 2198) is stored with an empty value.
    """

    payload_type: int
    name: str = ""
    clock_rate: int = 0
    channels: int | None = None
    fmtp: list[tuple[str, str]] = field(default_factory=list)
    rtcp_fb: list[str] = field(default_factory=list)

    @property
    def has_rtpmap(self) -> bool:
        return bool(self.name)

    def parameter(self, key: str) -> str | None:
        """fmtp parameter by name (names are case-insensitive, RFC 8866 §6.15)."""
        lowered = key.lower()
        for name, value in self.fmtp:
            if name.lower() == lowered:
                return value
        return None

    def set_rtpmap(self, value: str) -> None:
        # <encoding name>/<clock rate>[/<encoding parameters>]
        parts = value.split("/")
        if len(parts) not in (2, 3) or not parts[0] or " " in parts[0]:
            raise ParseError("rtpmap needs name/clock[/channels]")
        self.name = parts[0]
        self.clock_rate = _int(parts[1], "rtpmap clock rate", low=1, high=2**32 - 1)
        self.channels = None
        if len(parts) == 3:
            self.channels = _int(parts[2], "rtpmap channels", low=1, high=255)

    @staticmethod
    def parse_fmtp(value: str) -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = []
        for piece in value.split(";"):
            piece = piece.strip()
            if not piece:
                continue
            key, sep, param_value = piece.partition("=")
            key, param_value = key.strip(), param_value.strip() if sep else ""
            if not key and not param_value:
                continue  # a bare "=": nothing to keep (it would serialise as nothing)
            params.append((key, param_value))
        return params

    @property
    def rtpmap_value(self) -> str:
        text = f"{self.name}/{self.clock_rate}"
        return f"{text}/{self.channels}" if self.channels is not None else text

    @property
    def fmtp_value(self) -> str:
        return ";".join(f"{key}={value}" if value else key for key, value in self.fmtp)


@dataclass(slots=True, kw_only=True)
class Extmap:
    """``a=extmap:<id>[/<direction>] <uri> [<attributes>]`` (RFC 8285 §5)."""

    id: int
    uri: str
    direction: str | None = None
    attributes: str = ""

    @classmethod
    def parse(cls, value: str) -> Extmap:
        parts = value.split(None, 2)
        if len(parts) < 2:
            raise ParseError("extmap needs id and URI")
        ident, _, direction = parts[0].partition("/")
        # RFC 8285 §5: 1-14 one-byte, 1-255 two-byte form, 4096-4351 only during negotiation.
        ext_id = _int(ident, "extmap id", low=1, high=4351)
        if 255 < ext_id < 4096:
            raise ParseError(f"extmap id {ext_id} is reserved")
        if direction and direction not in DIRECTIONS:
            raise ParseError(f"extmap direction {direction!r}")
        return cls(
            id=ext_id,
            uri=parts[1],
            direction=direction or None,
            attributes=parts[2].strip() if len(parts) == 3 else "",
        )

    def __str__(self) -> str:
        text = f"{self.id}/{self.direction}" if self.direction else str(self.id)
        text += f" {self.uri}"
        return f"{text} {self.attributes}" if self.attributes else text


@dataclass(slots=True, kw_only=True)
class SsrcAttribute:
    """``a=ssrc:<ssrc> <attribute>[:<value>]`` (RFC 5576 §4.1)."""

    ssrc: int
    attribute: str
    value: str | None = None

    @classmethod
    def parse(cls, text: str) -> SsrcAttribute:
        ssrc_text, _, rest = text.partition(" ")
        ssrc = _int(ssrc_text, "ssrc", high=2**32 - 1)
        rest = rest.strip()
        if not rest:
            raise ParseError("a=ssrc without attribute")
        name, sep, value = rest.partition(":")
        return cls(ssrc=ssrc, attribute=name, value=value if sep else None)

    def __str__(self) -> str:
        if self.value is None:
            return f"{self.ssrc} {self.attribute}"
        return f"{self.ssrc} {self.attribute}:{self.value}"


@dataclass(slots=True, kw_only=True)
class SsrcGroup:
    """``a=ssrc-group:<semantics> <ssrc>...`` (RFC 5576 §4.2; FID RFC 5888/4588, SIM)."""

    semantics: str
    ssrcs: list[int] = field(default_factory=list)

    @classmethod
    def parse(cls, value: str) -> SsrcGroup:
        parts = value.split()
        if not parts:
            raise ParseError("ssrc-group without semantics")
        return cls(
            semantics=_token(parts[0], "ssrc-group semantics"),
            ssrcs=[_int(p, "ssrc-group ssrc", high=2**32 - 1) for p in parts[1:]],
        )

    def __str__(self) -> str:
        return " ".join([self.semantics, *map(str, self.ssrcs)])


@dataclass(slots=True, kw_only=True)
class Rid:
    """``a=rid:<id> <send|recv> [pt=<fmt>,...;][<key>=<value>;...]`` (RFC 8851 §10)."""

    id: str
    direction: str
    payload_types: list[int] = field(default_factory=list)
    restrictions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, value: str) -> Rid:
        parts = value.split(None, 2)
        if len(parts) < 2:
            raise ParseError("rid needs id and direction")
        if not _RID_ID.fullmatch(parts[0]):
            raise ParseError(f"rid id {parts[0]!r}")
        if parts[1] not in ("send", "recv"):
            raise ParseError(f"rid direction {parts[1]!r}")
        rid = cls(id=parts[0], direction=parts[1])
        if len(parts) == 3:
            for piece in parts[2].split(";"):
                piece = piece.strip()
                if not piece:
                    continue
                key, sep, param_value = piece.partition("=")
                # RFC 8851 §10's grammar has no space around "="; strip it so what we
                # serialise parses back the same (found by the sdp fuzz target).
                key, param_value = key.strip(), param_value.strip()
                if not key and not param_value:
                    continue  # a bare "=": nothing to keep (it would serialise as nothing)
                if key == "pt" and sep and not rid.payload_types and not rid.restrictions:
                    rid.payload_types = [
                        _int(pt, "rid pt", high=127) for pt in param_value.split(",")
                    ]
                else:
                    rid.restrictions.append((key, param_value if sep else ""))
        return rid

    def __str__(self) -> str:
        params = []
        if self.payload_types:
            params.append("pt=" + ",".join(map(str, self.payload_types)))
        params += [f"{k}={v}" if v else k for k, v in self.restrictions]
        text = f"{self.id} {self.direction}"
        return f"{text} {';'.join(params)}" if params else text


@dataclass(frozen=True, slots=True)
class SimulcastStream:
    """One rid in an ``a=simulcast`` list; ``~`` marks it paused (RFC 8853 §5.1)."""

    rid: str
    paused: bool = False

    def __str__(self) -> str:
        return f"~{self.rid}" if self.paused else self.rid


SimulcastList = list[list[SimulcastStream]]


def _parse_simulcast_list(text: str) -> SimulcastList:
    # sc-str-list = sc-alt-list *(";" sc-alt-list); sc-alt-list = sc-id *("," sc-id)
    streams: SimulcastList = []
    for alternatives in text.split(";"):
        choice = []
        for rid_text in alternatives.split(","):
            paused = rid_text.startswith("~")
            rid = rid_text[1:] if paused else rid_text
            if not _RID_ID.fullmatch(rid):
                raise ParseError(f"simulcast rid {rid_text!r}")
            choice.append(SimulcastStream(rid, paused))
        streams.append(choice)
    return streams


def _format_simulcast_list(streams: SimulcastList) -> str:
    return ";".join(",".join(map(str, choice)) for choice in streams)


@dataclass(slots=True, kw_only=True)
class Simulcast:
    """``a=simulcast:[send <list>] [recv <list>]`` (RFC 8853 §5.1).

    Each list holds the simulcast streams in priority order; each stream is a list of
    alternative rids (``a,b``) of which the sender uses one.
    """

    send: SimulcastList = field(default_factory=list)
    recv: SimulcastList = field(default_factory=list)

    @classmethod
    def parse(cls, value: str) -> Simulcast:
        parts = value.split()
        if len(parts) not in (2, 4):
            raise ParseError("simulcast needs 'send|recv <list>' once or twice")
        simulcast = cls()
        seen: set[str] = set()
        for index in range(0, len(parts), 2):
            direction, streams = parts[index], parts[index + 1]
            if direction not in ("send", "recv") or direction in seen:
                raise ParseError(f"simulcast direction {direction!r}")
            seen.add(direction)
            setattr(simulcast, direction, _parse_simulcast_list(streams))
        return simulcast

    def __str__(self) -> str:
        parts = []
        if self.send:
            parts.append(f"send {_format_simulcast_list(self.send)}")
        if self.recv:
            parts.append(f"recv {_format_simulcast_list(self.recv)}")
        return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Media sections and the session
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class MediaSection:
    """One ``m=`` section and its attributes (RFC 8866 §5.14)."""

    kind: str
    port: int = 9
    port_count: int | None = None
    proto: str = "UDP/TLS/RTP/SAVPF"
    formats: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # i=/b=/k= lines, verbatim ("b=AS:500")
    connection: Connection | None = None
    direction: str | None = None
    mid: str | None = None
    msid: str | None = None
    ice_ufrag: str | None = None
    ice_pwd: str | None = None
    ice_options: list[str] = field(default_factory=list)
    fingerprints: list[tuple[str, str]] = field(default_factory=list)
    setup: str | None = None
    rtcp_mux: bool = False
    rtcp_mux_only: bool = False
    rtcp_rsize: bool = False
    bundle_only: bool = False
    candidates: list[Candidate] = field(default_factory=list)
    end_of_candidates: bool = False
    codecs: list[Codec] = field(default_factory=list)
    rtcp_fb_all: list[str] = field(default_factory=list)  # a=rtcp-fb:* (RFC 4585 §4.2)
    extmaps: list[Extmap] = field(default_factory=list)
    ssrcs: list[SsrcAttribute] = field(default_factory=list)
    ssrc_groups: list[SsrcGroup] = field(default_factory=list)
    rids: list[Rid] = field(default_factory=list)
    simulcast: Simulcast | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def rejected(self) -> bool:
        """Port 0 without bundle-only: the offerer or answerer disabled it (RFC 3264 §6;
        a bundle-only section has port 0 but is live, RFC 9143 §6)."""
        return self.port == 0 and not self.bundle_only

    @property
    def payload_types(self) -> list[int]:
        return [int(f) for f in self.formats if _DIGITS.fullmatch(f) and int(f) < 128]

    def codec(self, payload_type: int) -> Codec | None:
        for codec in self.codecs:
            if codec.payload_type == payload_type:
                return codec
        return None

    def codecs_in_format_order(self) -> list[Codec]:
        """Codecs in m= line order, which is the offerer's preference (RFC 3264 §5.1)."""
        found = (self.codec(pt) for pt in self.payload_types)
        return [codec for codec in found if codec is not None and codec.has_rtpmap]

    def extmap_id(self, uri: str) -> int | None:
        for extmap in self.extmaps:
            if extmap.uri == uri:
                return extmap.id
        return None

    def attribute(self, name: str) -> str | None:
        """First unknown attribute of this name (value, or "" for a flag)."""
        for attr_name, value in self.attributes:
            if attr_name == name:
                return value or ""
        return None

    def _codec_entry(self, payload_type: int) -> Codec:
        codec = self.codec(payload_type)
        if codec is None:
            codec = Codec(payload_type=payload_type)
            self.codecs.append(codec)
        return codec

    def _add_attribute(self, name: str, value: str | None) -> None:
        if name == "mid" and value is not None and self.mid is None:
            self.mid = value
        elif name in DIRECTIONS and value is None and self.direction is None:
            self.direction = name
        elif name == "msid" and value is not None and self.msid is None:
            self.msid = value
        elif name == "ice-ufrag" and value is not None and self.ice_ufrag is None:
            self.ice_ufrag = value
        elif name == "ice-pwd" and value is not None and self.ice_pwd is None:
            self.ice_pwd = value
        elif name == "ice-options" and value is not None:
            self.ice_options.extend(value.split())
        elif name == "fingerprint" and value is not None:
            self.fingerprints.append(_parse_fingerprint(value))
        elif name == "setup" and value is not None and self.setup is None:
            self.setup = _parse_setup(value)
        elif name in _MEDIA_FLAGS and value is None:
            setattr(self, _MEDIA_FLAGS[name], True)
        elif name == "candidate" and value is not None:
            self.candidates.append(Candidate.parse(value))
        elif name == "rtpmap" and value is not None:
            pt_text, _, rest = value.partition(" ")
            codec = self._codec_entry(_int(pt_text, "rtpmap payload type", high=127))
            if codec.has_rtpmap:
                raise ParseError(f"second rtpmap for payload type {codec.payload_type}")
            codec.set_rtpmap(rest.strip())
        elif name == "fmtp" and value is not None:
            pt_text, _, rest = value.partition(" ")
            payload_type = _int(pt_text, "fmtp payload type", high=127)
            params = Codec.parse_fmtp(rest)
            if params:  # an empty a=fmtp says nothing (RFC 8866 §6.15)
                self._codec_entry(payload_type).fmtp.extend(params)
        elif name == "rtcp-fb" and value is not None:
            pt_text, _, rest = value.partition(" ")
            feedback = " ".join(rest.split())
            if not feedback:
                raise ParseError("rtcp-fb without feedback type")
            if pt_text == "*":
                self.rtcp_fb_all.append(feedback)
            else:
                codec = self._codec_entry(_int(pt_text, "rtcp-fb payload type", high=127))
                codec.rtcp_fb.append(feedback)
        elif name == "extmap" and value is not None:
            self.extmaps.append(Extmap.parse(value))
        elif name == "ssrc" and value is not None:
            self.ssrcs.append(SsrcAttribute.parse(value))
        elif name == "ssrc-group" and value is not None:
            self.ssrc_groups.append(SsrcGroup.parse(value))
        elif name == "rid" and value is not None:
            self.rids.append(Rid.parse(value))
        elif name == "simulcast" and value is not None:
            # RFC 8853 §5.1 describes one a=simulcast per media description: a second one
            # makes the answer ambiguous (and, kept verbatim, would not serialise in place).
            if self.simulcast is not None:
                raise ParseError("second a=simulcast in a media section")
            self.simulcast = Simulcast.parse(value)
        else:
            self.attributes.append((name, value))

    def _serialize(self) -> Iterator[str]:
        port = f"{self.port}/{self.port_count}" if self.port_count is not None else str(self.port)
        yield " ".join(["m=" + self.kind, port, self.proto, *self.formats])
        # RFC 8866 §5: i= then c= then b= and k=.
        yield from (line for line in self.lines if line[0] == "i")
        if self.connection is not None:
            yield f"c={self.connection}"
        yield from (line for line in self.lines if line[0] != "i")
        for candidate in self.candidates:
            yield f"a=candidate:{candidate}"
        yield from _transport_lines(
            self.ice_ufrag, self.ice_pwd, self.ice_options, self.fingerprints, self.setup
        )
        if self.mid is not None:
            yield f"a=mid:{self.mid}"
        for extmap in self.extmaps:
            yield f"a=extmap:{extmap}"
        if self.direction is not None:
            yield f"a={self.direction}"
        if self.msid is not None:
            yield f"a=msid:{self.msid}"
        for flag, attribute_name in _MEDIA_FLAGS.items():
            if flag != "end-of-candidates" and getattr(self, attribute_name):
                yield f"a={flag}"
        yield from _attribute_lines(self.attributes)
        for codec in self.codecs:
            if codec.has_rtpmap:
                yield f"a=rtpmap:{codec.payload_type} {codec.rtpmap_value}"
            for feedback in codec.rtcp_fb:
                yield f"a=rtcp-fb:{codec.payload_type} {feedback}"
            if codec.fmtp:
                yield f"a=fmtp:{codec.payload_type} {codec.fmtp_value}"
        for feedback in self.rtcp_fb_all:
            yield f"a=rtcp-fb:* {feedback}"
        for group in self.ssrc_groups:
            yield f"a=ssrc-group:{group}"
        for ssrc in self.ssrcs:
            yield f"a=ssrc:{ssrc}"
        for rid in self.rids:
            yield f"a=rid:{rid}"
        if self.simulcast is not None:
            yield f"a=simulcast:{self.simulcast}"
        if self.end_of_candidates:
            yield "a=end-of-candidates"


_MEDIA_FLAGS = {
    "rtcp-mux": "rtcp_mux",
    "rtcp-mux-only": "rtcp_mux_only",
    "rtcp-rsize": "rtcp_rsize",
    "bundle-only": "bundle_only",
    "end-of-candidates": "end_of_candidates",
}


def _parse_fingerprint(value: str) -> tuple[str, str]:
    # RFC 8122 §5: hash-func SP fingerprint (upper-case hex pairs separated by colons).
    parts = value.split()
    if len(parts) != 2 or not re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})*", parts[1]):
        raise ParseError("fingerprint needs 'hash-func XX:XX:...'")
    return parts[0].lower(), parts[1].upper()


def _parse_setup(value: str) -> str:
    if value not in SETUP_ROLES:
        raise ParseError(f"setup {value!r} (RFC 4145 §4)")
    return value


def _transport_lines(
    ufrag: str | None,
    pwd: str | None,
    options: list[str],
    fingerprints: list[tuple[str, str]],
    setup: str | None,
) -> Iterator[str]:
    if ufrag is not None:
        yield f"a=ice-ufrag:{ufrag}"
    if pwd is not None:
        yield f"a=ice-pwd:{pwd}"
    if options:
        yield f"a=ice-options:{' '.join(options)}"
    for algorithm, value in fingerprints:
        yield f"a=fingerprint:{algorithm} {value}"
    if setup is not None:
        yield f"a=setup:{setup}"


def _attribute_lines(attributes: Iterable[tuple[str, str | None]]) -> Iterator[str]:
    for name, value in attributes:
        yield f"a={name}" if value is None else f"a={name}:{value}"


def _split_attribute(value: str) -> tuple[str, str | None]:
    """``a=<name>[:<value>]`` (RFC 8866 §5.13); the name is a token."""
    name, sep, attr_value = value.partition(":")
    if not _TOKEN.fullmatch(name):
        raise ParseError(f"attribute name {name!r}")
    return name, attr_value.strip() if sep else None


def _parse_media_line(value: str) -> MediaSection:
    # m=<media> <port>[/<number of ports>] <proto> <fmt> ... (RFC 8866 §5.14)
    parts = value.split()
    if len(parts) < 4:
        raise ParseError("m= needs media, port, proto and at least one format")
    port_text, _, count_text = parts[1].partition("/")
    return MediaSection(
        kind=_token(parts[0], "m= media"),
        port=_int(port_text, "m= port", high=65535),
        port_count=_int(count_text, "m= port count", low=1, high=65535) if count_text else None,
        proto=parts[2],
        formats=[_token(f, "m= format") for f in parts[3:]],
    )


def _lines(text: str | bytes) -> Iterator[tuple[int, str]]:
    """Non-empty lines with their 1-based number; accepts \\n or \\r\\n and trailing blanks."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError("SDP is not UTF-8") from exc
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r \t")
        if line:
            yield number, line


@dataclass(slots=True, kw_only=True)
class SessionDescription:
    """A whole SDP offer or answer."""

    version: int = 0
    origin: Origin = field(default_factory=Origin)
    name: str = "-"
    timing: str = "0 0"
    lines: list[str] = field(default_factory=list)  # other session lines (i=, u=, b=, r=...)
    connection: Connection | None = None
    groups: list[Group] = field(default_factory=list)
    msid_semantic: str | None = None
    extmap_allow_mixed: bool = False
    ice_lite: bool = False
    ice_ufrag: str | None = None
    ice_pwd: str | None = None
    ice_options: list[str] = field(default_factory=list)
    fingerprints: list[tuple[str, str]] = field(default_factory=list)
    setup: str | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    media: list[MediaSection] = field(default_factory=list)

    @property
    def bundle_mids(self) -> list[str]:
        """Mids of the first BUNDLE group (WebRTC uses one, RFC 9143 §7.1)."""
        for group in self.groups:
            if group.semantics == "BUNDLE":
                return list(group.mids)
        return []

    def media_by_mid(self, mid: str) -> MediaSection | None:
        for section in self.media:
            if section.mid == mid:
                return section
        return None

    @classmethod
    def parse(cls, text: str | bytes) -> SessionDescription:
        """Parse an SDP; ParseError names the first line that cannot be read."""
        session = cls()
        seen_version = False
        for number, line in _lines(text):
            try:
                if not seen_version:
                    # RFC 8866 §5.1: the description starts with v=0.
                    if not line.startswith("v="):
                        raise ParseError("SDP must start with v=")
                    session.version = _int(line[2:], "v=", high=0)
                    seen_version = True
                else:
                    session._parse_line(line)
            except ParseError as exc:
                raise ParseError(f"SDP line {number}: {exc.detail}") from None
        if not seen_version:
            raise ParseError("empty SDP")
        # Parsed lines take the order serialize() writes (a stable sort: same-rank lines
        # keep theirs), so an out-of-order offer reads back equal from its serialisation.
        session.lines.sort(key=lambda text: _SESSION_LINE_RANK[text[0]])
        for section in session.media:
            section.lines.sort(key=lambda text: text[0] != "i")
        return session

    def _parse_line(self, line: str) -> None:
        if len(line) < 2 or line[1] != "=":
            raise ParseError("not a '<type>=<value>' line")
        kind, value = line[0], line[2:]
        current = self.media[-1] if self.media else None
        if kind == "m":
            self.media.append(_parse_media_line(value))
        elif current is not None:
            if kind not in _MEDIA_TYPES:
                raise ParseError(f"'{kind}=' is not allowed in a media section")
            if kind == "a":
                current._add_attribute(*_split_attribute(value))
            elif kind == "c":
                if current.connection is not None:
                    raise ParseError("second c= line in a media section")
                current.connection = Connection.parse(value)
            else:
                current.lines.append(line)
        elif kind not in _SESSION_TYPES or kind == "v":
            raise ParseError(f"unexpected '{kind}=' line")
        elif kind == "a":
            self._add_attribute(*_split_attribute(value))
        elif kind == "o":
            self.origin = Origin.parse(value)
        elif kind == "s":
            self.name = value
        elif kind == "t":
            self.timing = " ".join(str(_int(p, "t=")) for p in _exactly(value.split(), 2, "t="))
        elif kind == "c":
            if self.connection is not None:
                raise ParseError("second session-level c= line")
            self.connection = Connection.parse(value)
        else:
            self.lines.append(line)

    def _add_attribute(self, name: str, value: str | None) -> None:
        if name == "group" and value is not None:
            self.groups.append(Group.parse(value))
        elif name == "msid-semantic" and value is not None and self.msid_semantic is None:
            self.msid_semantic = value
        elif name == "extmap-allow-mixed" and value is None:
            self.extmap_allow_mixed = True
        elif name == "ice-lite" and value is None:
            self.ice_lite = True
        elif name == "ice-ufrag" and value is not None and self.ice_ufrag is None:
            self.ice_ufrag = value
        elif name == "ice-pwd" and value is not None and self.ice_pwd is None:
            self.ice_pwd = value
        elif name == "ice-options" and value is not None:
            self.ice_options.extend(value.split())
        elif name == "fingerprint" and value is not None:
            self.fingerprints.append(_parse_fingerprint(value))
        elif name == "setup" and value is not None and self.setup is None:
            self.setup = _parse_setup(value)
        else:
            self.attributes.append((name, value))

    def serialize(self) -> str:
        return "".join(line + "\r\n" for line in self._serialize())

    __str__ = serialize

    def _serialize(self) -> Iterator[str]:
        yield f"v={self.version}"
        yield f"o={self.origin}"
        yield f"s={self.name}"
        # RFC 8866 §5: i u e p c b come before t=; r z k after it.
        yield from (line for line in self.lines if line[0] in "iuep")
        if self.connection is not None:
            yield f"c={self.connection}"
        yield from (line for line in self.lines if line[0] == "b")
        yield f"t={self.timing}"
        yield from (line for line in self.lines if line[0] in "rzk")
        for group in self.groups:
            yield f"a=group:{group}"
        if self.extmap_allow_mixed:
            yield "a=extmap-allow-mixed"
        if self.msid_semantic is not None:
            yield f"a=msid-semantic: {self.msid_semantic}"
        if self.ice_lite:
            yield "a=ice-lite"
        yield from _transport_lines(
            self.ice_ufrag, self.ice_pwd, self.ice_options, self.fingerprints, self.setup
        )
        yield from _attribute_lines(self.attributes)
        for section in self.media:
            yield from section._serialize()


def _exactly(parts: list[str], count: int, what: str) -> list[str]:
    if len(parts) != count:
        raise ParseError(f"{what} needs {count} fields")
    return parts


# --------------------------------------------------------------------------------------------
# Trickle ICE fragments: application/trickle-ice-sdpfrag (RFC 8840 §4.4, §9)
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class FragmentMedia:
    """One ``m=`` placeholder of a fragment with the ICE lines that follow it."""

    kind: str
    mid: str | None = None
    ice_ufrag: str | None = None
    ice_pwd: str | None = None
    candidates: list[Candidate] = field(default_factory=list)
    end_of_candidates: bool = False


@dataclass(slots=True, kw_only=True)
class SdpFragment:
    """A parsed trickle / ICE-restart PATCH body.

    Clients put ufrag/pwd at session or media level (spec notes §2.2), so ``ufrag``/``pwd``
    give the effective values. Candidates before any ``m=`` line are kept in ``candidates``.
    """

    ice_ufrag: str | None = None
    ice_pwd: str | None = None
    ice_options: list[str] = field(default_factory=list)
    ice_lite: bool = False
    bundle_mids: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    end_of_candidates: bool = False
    media: list[FragmentMedia] = field(default_factory=list)

    @property
    def ufrag(self) -> str | None:
        return self.ice_ufrag or next((m.ice_ufrag for m in self.media if m.ice_ufrag), None)

    @property
    def pwd(self) -> str | None:
        return self.ice_pwd or next((m.ice_pwd for m in self.media if m.ice_pwd), None)

    @property
    def all_candidates(self) -> list[Candidate]:
        return [*self.candidates, *(c for m in self.media for c in m.candidates)]

    @property
    def usable_candidates(self) -> list[Candidate]:
        return [c for c in self.all_candidates if c.usable]

    @property
    def complete(self) -> bool:
        """An ``a=end-of-candidates`` was present anywhere (RFC 8838 §8.2)."""
        return self.end_of_candidates or any(m.end_of_candidates for m in self.media)

    @property
    def mid(self) -> str | None:
        return next((m.mid for m in self.media if m.mid is not None), None)


# Lines an RFC 8840 fragment may carry besides a= and m=; tolerated and ignored.
_FRAGMENT_IGNORED = frozenset("vostc")


def parse_sdpfrag(text: str | bytes) -> SdpFragment:
    """Parse an ``application/trickle-ice-sdpfrag`` body leniently (spec notes §2.2):
    any m= proto/format, any mid (some clients send the m-line index), ufrag/pwd at either
    level, no end-of-candidates. Non-SDP bodies (JSON, HTML, empty) raise ParseError."""
    fragment = SdpFragment()
    saw_line = False
    for number, line in _lines(text):
        saw_line = True
        try:
            _parse_fragment_line(fragment, line)
        except ParseError as exc:
            raise ParseError(f"sdpfrag line {number}: {exc.detail}") from None
    if not saw_line:
        raise ParseError("empty sdpfrag")
    return fragment


def _parse_fragment_line(fragment: SdpFragment, line: str) -> None:
    if len(line) < 2 or line[1] != "=" or not ("a" <= line[0] <= "z"):
        raise ParseError("not a '<type>=<value>' line")
    kind, value = line[0], line[2:]
    current = fragment.media[-1] if fragment.media else None
    if kind == "m":
        parts = value.split()
        if not parts:
            raise ParseError("empty m= line")
        fragment.media.append(FragmentMedia(kind=_token(parts[0], "m= media")))
        return
    if kind in _FRAGMENT_IGNORED:
        return
    if kind != "a":
        raise ParseError(f"'{kind}=' has no place in an sdpfrag")
    name, attr_value = _split_attribute(value)
    if name == "candidate" and attr_value is not None:
        target = current.candidates if current is not None else fragment.candidates
        target.append(Candidate.parse(attr_value))
    elif name == "end-of-candidates":
        if current is not None:
            current.end_of_candidates = True
        else:
            fragment.end_of_candidates = True
    elif name in ("ice-ufrag", "ice-pwd") and attr_value:
        holder: FragmentMedia | SdpFragment = current if current is not None else fragment
        setattr(holder, name.replace("-", "_"), attr_value)
    elif name == "mid" and attr_value is not None and current is not None:
        current.mid = attr_value
    elif name == "ice-options" and attr_value is not None:
        fragment.ice_options.extend(attr_value.split())
    elif name == "ice-lite":
        fragment.ice_lite = True
    elif name == "group" and attr_value is not None:
        group = Group.parse(attr_value)
        if group.semantics == "BUNDLE":
            fragment.bundle_mids = group.mids
    # RFC 8840 §9: other attributes (ice-pacing, rtcp-mux, ...) carry nothing for ICE here.


def serialize_sdpfrag(
    ufrag: str,
    pwd: str,
    candidates: Iterable[Candidate],
    mid: str,
    ice_options: Iterable[str] = (),
    *,
    kind: str = "audio",
    ice_lite: bool = True,
    bundle_mids: Iterable[str] = (),
    end_of_candidates: bool = True,
) -> str:
    """The server's ICE-restart answer body (WHEP §4.4.3, RFC 8840 §4.4): server ICE
    attributes, one placeholder m= line for the bundle-tag mid, every candidate."""
    lines = []
    if ice_lite:
        lines.append("a=ice-lite")
    options = list(ice_options)
    if options:
        lines.append(f"a=ice-options:{' '.join(options)}")
    mids = list(bundle_mids)
    if mids:
        lines.append(f"a=group:BUNDLE {' '.join(mids)}")
    # The m= line is a placeholder (RFC 8840 §4.4): port 9, format 0 carry no meaning.
    lines += [
        f"m={kind} 9 UDP/TLS/RTP/SAVPF 0",
        f"a=mid:{mid}",
        f"a=ice-ufrag:{ufrag}",
        f"a=ice-pwd:{pwd}",
    ]
    lines += [f"a=candidate:{candidate}" for candidate in candidates]
    if end_of_candidates:
        lines.append("a=end-of-candidates")
    return "".join(line + "\r\n" for line in lines)
