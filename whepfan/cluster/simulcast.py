"""The sans-IO decisions of a simulcast pull: which layers the origin has, which upstream
session carries which layer, and in which order the edge's tracks take them.

An edge pulls a simulcast stream as one WHEP session per layer (upstream.py). Nothing
here touches a socket: the puller feeds in what the origin said (Link headers, the SSE
``layers`` payload) and what it has (its sessions' layers), and does what comes out.

* ``link_targets``: the 201's ``Link`` headers (RFC 8288 §3) by rel. The layer
  extension's rel (``urn:ietf:params:whep:ext:core:layer``, EXT §5) says the origin can
  pin a session to one layer; EXT §5 requires such a server to support the SSE
  extension with ``layers`` advertised, which is how the layers are learnt.
* ``layer_rids``: the layer list of an SSE ``layers`` payload, in every shape deployed
  (EXT/W02 arrays, M02 objects, Millicast's ``medias`` wrapper; spec notes §4.2, §4.4).
* ``SseParser``: the ``text/event-stream`` framing (WHATWG HTML §9.2.6).
* ``plan_layers``: given the wanted layers and the sessions held, which layer the first
  session (the one carrying audio and the event stream) is pinned to, which sessions
  to open and which to end.
* ``track_order``: the encoding order handed to ``Ingest.attach``, which binds encodings
  to the stream's existing tracks by position: each session stays on the track it fed,
  so its viewers' sequence line continues and nobody is rebased needlessly.
* ``pinned_url``: a WHEP endpoint with ``?rid=`` (whepfan, and some other servers, pin
  the new session's layer at creation; others ignore it and get the layer POST).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

LAYER_REL = "urn:ietf:params:whep:ext:core:layer"
EVENTS_REL = "urn:ietf:params:whep:ext:core:server-sent-events"

# RFC 8288 §3: Link = #( "<" URI-Reference ">" *( OWS ";" OWS link-param ) )
_LINK = re.compile(r'<([^>]*)>((?:\s*;\s*[^;,="\s]+\s*(?:=\s*(?:"[^"]*"|[^;,\s]*))?)*)')
_PARAM = re.compile(r'\s*;\s*([^;=\s]+)\s*(?:=\s*(?:"([^"]*)"|([^;,\s]*)))?')


def link_targets(values: Iterable[str], base: str) -> dict[str, str]:
    """rel -> absolute target URL of every link in ``values`` (Link header field values,
    each possibly several comma-separated links; a rel may list several relation types,
    RFC 8288 §3.3). The first link of a rel wins."""
    targets: dict[str, str] = {}
    for value in values:
        for match in _LINK.finditer(value):
            url = urllib.parse.urljoin(base, match.group(1).strip())
            for param in _PARAM.finditer(match.group(2)):
                if param.group(1).lower() != "rel":
                    continue
                for rel in (param.group(2) or param.group(3) or "").split():
                    targets.setdefault(rel, url)
    return targets


def layer_rids(payload: object) -> tuple[str, ...]:
    """The rids of the first video media of an SSE ``layers`` payload, in its order (low
    to high on whepfan), deduplicated; empty for a single layer (no rid, or just one).

    Shapes (spec notes §4.2, §4.4): EXT/W02 ``{"1": [{"rid": ...}, ...]}``; M02
    ``{"1": {"active": [{"id": ...}], "layers": [{"encodingId": ...}]}}``; Millicast
    wraps either in ``{"medias": {...}}``. Every listed layer counts, including one whose
    bitrate is momentarily 0 (W02 calls that inactive): a layer that pauses for a moment
    keeps its session rather than being dropped and pulled again."""
    if not isinstance(payload, dict):
        return ()
    medias = payload.get("medias", payload)
    if not isinstance(medias, dict):
        return ()
    for key in sorted(medias, key=_media_order):
        rids = tuple(dict.fromkeys(_rids_of(medias[key])))
        if rids:
            return rids if len(rids) > 1 else ()
    return ()


def _media_order(key: object) -> tuple[int, str]:
    text = str(key)
    return (int(text), text) if text.isdigit() else (1 << 30, text)


def _rids_of(entry: object) -> Iterator[str]:
    if isinstance(entry, dict):
        for member in ("layers", "active"):
            yield from _rids_of(entry.get(member))
        return
    if not isinstance(entry, list):
        return
    for layer in entry:
        if not isinstance(layer, dict):
            continue
        rid = layer.get("rid", layer.get("encodingId", layer.get("id")))
        if isinstance(rid, str) and rid:
            yield rid


@dataclass(frozen=True, slots=True)
class SseEvent:
    type: str
    data: str


class SseParser:
    """``text/event-stream`` bytes in, events out (WHATWG HTML §9.2.6: lines end in CR,
    LF or CRLF; ``event:`` names the type, default "message"; ``data:`` lines join with
    LF; a blank line dispatches; a line starting with ":" is a comment)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._type = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        events: list[SseEvent] = []
        while True:
            match = re.search(rb"\r\n|\r|\n", self._buffer)
            if match is None:
                return events
            if match.group() == b"\r" and match.end() == len(self._buffer):
                return events  # a CR at the end may be the first half of a CRLF
            line = self._buffer[: match.start()].decode("utf-8", "replace")
            self._buffer = self._buffer[match.end() :]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            if not self._data:
                self._type = ""
                return None
            event = SseEvent(self._type or "message", "\n".join(self._data))
            self._type, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerPlan:
    """What to do so that every wanted layer has exactly one session."""

    primary: str | None  # the layer the first session (audio, events) is pinned to
    open: tuple[str, ...]  # layers that need a session of their own
    close: tuple[str, ...]  # layers whose own session goes (gone upstream, or now primary's)


def plan_layers(primary: str | None, others: Collection[str], wanted: Sequence[str]) -> LayerPlan:
    """``primary``: the layer the first session carries now (None: unpinned); ``others``:
    the layers other sessions carry; ``wanted``: the origin's layers, low to high (empty:
    a single layer, which the first session alone carries).

    The first session keeps its layer while the origin still has it. Otherwise it takes
    the middle layer, where whepfan starts new viewers (LayerPolicy.initial), so the
    viewers an edge had before it knew the layers stay on a middle picture; if another
    session already carries that one, the nearest layer that none carries, so no session
    has to be ended to make room."""
    if not wanted:
        return LayerPlan(primary=None, open=(), close=tuple(others))
    if primary not in wanted:
        middle = (len(wanted) - 1) // 2
        free = [index for index, rid in enumerate(wanted) if rid not in others]
        pick = min(free, key=lambda index: (abs(index - middle), index)) if free else middle
        primary = wanted[pick]
    return LayerPlan(
        primary=primary,
        open=tuple(rid for rid in wanted if rid != primary and rid not in others),
        close=tuple(rid for rid in others if rid not in wanted or rid == primary),
    )


def track_order(fed: Sequence[str | None], wanted: Sequence[str]) -> list[str]:
    """The simulcast layers in the order ``Ingest.attach`` binds them to the stream's
    tracks (a single layer is just ``[None]``).

    ``fed[i]`` is the layer (as named from now on) of the session that fed track ``i``,
    or None when no session goes on feeding it; ``wanted`` the layers, low to high. A
    layer whose session fed a track stays at that track's position; the other layers
    fill the free positions in ``wanted`` order, then follow; positions nobody fills are
    closed up, as ``attach`` cannot skip one."""
    slots: list[str | None] = []
    placed: set[str] = set()
    for rid in fed:
        if rid is not None and rid in wanted and rid not in placed:
            slots.append(rid)
            placed.add(rid)
        else:
            slots.append(None)
    remaining = [rid for rid in wanted if rid not in placed]
    order: list[str] = []
    for rid in slots:
        if rid is not None:
            order.append(rid)
        elif remaining:
            order.append(remaining.pop(0))
    return order + remaining


def pinned_url(endpoint: str, rid: str) -> str:
    """``endpoint`` with its ``rid`` query parameter set (any other parameters kept)."""
    parts = urllib.parse.urlsplit(endpoint)
    query = [
        (name, value)
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if name not in ("rid", "encodingId")
    ]
    query.append(("rid", rid))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
