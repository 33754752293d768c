"""Stream status for dashboards and the ``/`` page::

    GET /api/streams            {"streams": [summary, ...], "viewers": N, "egress_bitrate": b/s}
    GET /api/streams/{stream}   one stream's summary, or 404

A summary: ``name``, ``live`` (a publisher session exists), ``active`` (its media is
keyed), ``publisher`` (``{"state", "connected_for"}`` or null), ``codecs``, ``tracks``
(kind, codec, clock rate, packets, octets, bitrate), ``layers`` (the last "layers" event,
keyed by m-line index as in the SSE extension), ``viewers`` (sessions) and
``connected_viewers`` (receiving media), ``ingress_bitrate`` and ``egress_bitrate``.

How the bitrates are measured
-----------------------------
Once a second the sampler reads ever-growing byte counters and keeps the rate over the
last interval (:class:`RateMeter`): per track the router's ingested RTP *payload*
octets, and for the whole worker the compiled Fanout's ``bytes_sent`` (SRTP datagrams
as handed to the kernel). A stream's ``egress_bitrate`` is each track's payload bitrate
times the connected viewers subscribed to that track: per-viewer counters would cost a
call per viewer per sample, and every subscriber gets the same packets. It therefore
leaves out RTP/SRTP header overhead, retransmissions and RTCP, which the top-level
``egress_bitrate`` (from Fanout deltas) includes. Session ids are never shown: a
session URL is the capability to end that session (WHEP draft-03 §5).
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import orjson
from aiohttp import web

from whepfan.errors import NotFound
from whepfan.http.auth import AccessControl
from whepfan.http.events import EventHub
from whepfan.http.tokens import Role

SAMPLE_INTERVAL = 1.0
FANOUT_KEY = "fanout"
JSON_HEADERS = {"Cache-Control": "no-store"}


class TrackStatusView(Protocol):
    @property
    def fanout_id(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def codec_name(self) -> str: ...
    @property
    def clock_rate(self) -> int: ...
    @property
    def packets(self) -> int: ...
    @property
    def octets(self) -> int: ...


class PublisherStatusView(Protocol):
    @property
    def state(self) -> enum.Enum: ...
    @property
    def connected_at(self) -> float | None: ...


class ViewerStatusView(Protocol):
    @property
    def fanout_slot(self) -> int | None: ...
    @property
    def track_by_ssrc(self) -> Mapping[int, int]: ...


class StreamStatusView(Protocol):
    @property
    def live(self) -> bool: ...
    @property
    def active(self) -> bool: ...
    @property
    def publisher(self) -> PublisherStatusView | None: ...
    # kind -> its track, or (simulcast) its tracks, one per encoding
    @property
    def tracks(self) -> Mapping[str, TrackStatusView | Sequence[TrackStatusView]]: ...
    @property
    def viewers(self) -> Mapping[str, ViewerStatusView]: ...


@runtime_checkable
class CountedViewersView(Protocol):
    """A stream whose viewers live elsewhere (worker processes, whepfan/workers/pool.py): it
    counts them itself instead of exposing each viewer's fanout slot and tracks."""

    def subscriptions(self) -> tuple[int, Mapping[int, int]]:
        """(viewers receiving media, subscribers per track ``fanout_id``)."""
        ...


class FanoutStatsView(Protocol):
    def stats(self) -> dict[str, int]: ...


@runtime_checkable
class StatusRouter(Protocol):
    """What the status API reads from ``whepfan.media.router.Router``."""

    @property
    def streams(self) -> Mapping[str, StreamStatusView]: ...
    @property
    def fanout(self) -> FanoutStatsView: ...


@dataclass(eq=False)
class RateMeter:
    """Bits per second of ever-growing byte counters over the last sampling interval,
    sans-IO: ``sample(key, total, now)`` once per interval, ``rate(key)`` any time."""

    _last: dict[Hashable, tuple[float, int]] = field(default_factory=dict)
    _rates: dict[Hashable, float] = field(default_factory=dict)

    def sample(self, key: Hashable, total_bytes: int, now: float) -> None:
        previous = self._last.get(key)
        self._last[key] = (now, total_bytes)
        if previous is None:
            return
        then, before = previous
        if now <= then:
            return
        if total_bytes < before:
            self._rates.pop(key, None)  # a counter that went back is a new source
            return
        self._rates[key] = (total_bytes - before) * 8 / (now - then)

    def rate(self, key: Hashable) -> float | None:
        """None until two samples exist."""
        return self._rates.get(key)

    def retain(self, keys: set[Hashable]) -> None:
        """Forget the counters of sources that are gone."""
        for key in [k for k in self._last if k not in keys]:
            del self._last[key]
            self._rates.pop(key, None)


class StreamStatus:
    """The two resources and the once-a-second sampler behind their bitrates."""

    def __init__(
        self,
        *,
        router: StatusRouter,
        clock: Callable[[], float],
        hub: EventHub | None = None,
        access: AccessControl | None = None,
        sample_interval: float = SAMPLE_INTERVAL,
    ) -> None:
        self.router = router
        self.clock = clock
        self.hub = hub
        # The listing shows who publishes what: it needs a view credential when viewing
        # does, and shows a scoped one only the streams it covers.
        self.access = access or AccessControl()
        self.sample_interval = sample_interval
        self.meter = RateMeter()
        self._timer: asyncio.TimerHandle | None = None

    def add_routes(self, app: web.Application, *, stream_pattern: str) -> None:
        app[STREAM_STATUS_KEY] = self
        app.router.add_get("/api/streams", self.stream_list)
        app.router.add_get(f"/api/streams/{{stream:{stream_pattern}}}", self.stream_detail)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)

    async def _on_startup(self, app: web.Application) -> None:
        self._tick()

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self.sample(self.clock())
        self._timer = asyncio.get_running_loop().call_later(self.sample_interval, self._tick)

    def sample(self, now: float) -> None:
        """Read every byte counter once (O(streams * tracks), no per-viewer work)."""
        keys: set[Hashable] = {FANOUT_KEY}
        self.meter.sample(FANOUT_KEY, self.router.fanout.stats()["bytes_sent"], now)
        for name, stream in self.router.streams.items():
            for track in stream_tracks(stream):
                key = (name, track.fanout_id)
                keys.add(key)
                self.meter.sample(key, track.octets, now)
        self.meter.retain(keys)

    # ------------------------------------------------------------------ resources

    async def stream_list(self, request: web.Request) -> web.Response:
        grant = self.access.authorize(request.headers.get("Authorization"), Role.VIEW, None)
        now = self.clock()
        streams = self.router.streams
        names = sorted(name for name in streams if grant is None or grant.streams.covers(name))
        every_stream = grant is None or grant.streams.every_stream
        body = {
            "streams": [self.summary(name, streams[name], now) for name in names],
            "viewers": sum(len(streams[name].viewers) for name in names),
            # The server's whole egress is not a scoped credential's business.
            "egress_bitrate": _bits(self.meter.rate(FANOUT_KEY)) if every_stream else None,
        }
        return web.json_response(body, dumps=_dumps, headers=JSON_HEADERS)

    async def stream_detail(self, request: web.Request) -> web.Response:
        name = request.match_info["stream"]
        self.access.authorize(request.headers.get("Authorization"), Role.VIEW, name)
        stream = self.router.streams.get(name)
        if stream is None:
            raise NotFound(f"no stream {name!r}")
        body = self.summary(name, stream, self.clock())
        return web.json_response(body, dumps=_dumps, headers=JSON_HEADERS)

    def summary(self, name: str, stream: StreamStatusView, now: float) -> dict[str, object]:
        # Subscribers per fanout track, counted over the viewers receiving media.
        subscribers: Counter[int] = Counter()
        connected = 0
        if isinstance(stream, CountedViewersView):
            connected, counts = stream.subscriptions()
            subscribers.update(counts)
        else:
            for viewer in stream.viewers.values():
                if viewer.fanout_slot is not None:
                    connected += 1
                    subscribers.update(set(viewer.track_by_ssrc.values()))
        tracks = []
        ingress = egress = 0.0
        for track in stream_tracks(stream):
            bitrate = self.meter.rate((name, track.fanout_id))
            if bitrate is not None:
                ingress += bitrate
                egress += bitrate * subscribers[track.fanout_id]
            tracks.append(
                {
                    "kind": track.kind,
                    "codec": track.codec_name,
                    "clock_rate": track.clock_rate,
                    "packets": track.packets,
                    "octets": track.octets,
                    "bitrate": _bits(bitrate),
                    "viewers": subscribers[track.fanout_id],
                }
            )
        publisher = stream.publisher
        layers = self.hub.layers(name) if self.hub is not None else None
        return {
            "name": name,
            "live": stream.live,
            "active": stream.active,
            "publisher": None
            if publisher is None
            else {
                "state": publisher.state.value,
                "connected_for": None
                if publisher.connected_at is None
                else round(now - publisher.connected_at, 3),
            },
            "codecs": sorted(
                {f"{track.kind}/{track.codec_name}" for track in stream_tracks(stream)}
            ),
            "tracks": tracks,
            "layers": layers or {},
            "viewers": len(stream.viewers),
            "connected_viewers": connected,
            "ingress_bitrate": round(ingress),
            "egress_bitrate": round(egress),
        }


def stream_tracks(stream: StreamStatusView) -> Iterator[TrackStatusView]:
    """Every ingested track: one per kind, or one per simulcast encoding of a kind."""
    for entry in stream.tracks.values():
        if isinstance(entry, Sequence):
            yield from entry
        else:
            yield entry


def _bits(rate: float | None) -> int | None:
    return None if rate is None else round(rate)


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


STREAM_STATUS_KEY: web.AppKey[StreamStatus] = web.AppKey("stream_status")
