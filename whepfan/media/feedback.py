"""What goes back to the publisher: RR, REMB, throttled PLI (KeyframeRequests).

Keyframe requests (RFC 4585 §6.3.1 PLI) come from many places: a viewer starting, a
viewer's own PLI/FIR, a layer switch waiting for its target's keyframe, a publisher
that just connected. A join storm would turn each into a PLI and make the publisher
send keyframes back to back, so ``KeyframeRequests`` lets at most one request per
layer through per interval (mediasoup's ``KeyFrameRequestManager`` has the same job).
A request that falls inside the interval is deferred, never dropped: a viewer waiting
for a keyframe gets no video until one comes, and browser publishers send none unasked.

Where a request goes once it is let through is the stream's ``KeyframeUpstream``
strategy (streams.py): by default ``PublisherFeedback.request_keyframes`` (SRTCP PLI to
the publisher on this worker); a relay copy forwards to the origin worker instead
(relay.py), through this same throttle.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from whepfan import _fastpath
from whepfan.media.sender import Sender
from whepfan.media.streams import KeyframeUpstream, Stream, Track
from whepfan.media.timers import TimerKind, Timers
from whepfan.protocol import rtcp


@dataclass(eq=False, kw_only=True)
class _StreamRequests:
    """Per-stream memory of the throttle."""

    last_by_track: dict[int, float] = field(default_factory=dict)  # fanout id -> time
    last_request: float = -math.inf
    requests_made: int = 0
    owed: list[Track] = field(default_factory=list)  # throttled, asked again later


class KeyframeRequests:
    """The keyframe-request throttle of one worker (see the module docstring).

    ``request`` lets through the layers whose last request is at least ``interval``
    old (all of them with ``force``), hands them to the stream's upstream, and for
    the others schedules a ``KEYFRAME_RETRY`` timer at the end of their interval;
    ``handle_timer`` asks again for those still owed and still part of the stream.
    """

    def __init__(
        self,
        *,
        interval: float,
        timers: Timers,
        counters: Counter[str],
        upstream: KeyframeUpstream,
    ) -> None:
        self.interval = interval
        self._timers = timers
        self._counters = counters
        self._default_upstream = upstream
        self._streams: dict[str, _StreamRequests] = {}

    def request(
        self,
        stream: Stream,
        now: float,
        *,
        tracks: Sequence[Track] | None = None,
        force: bool = False,
    ) -> bool:
        """Ask for a keyframe of ``tracks`` (default: every video layer). True when a
        request went to an upstream."""
        state = self._streams.setdefault(stream.name, _StreamRequests())
        candidates = [
            track
            for track in (tracks if tracks is not None else stream.tracks.get("video", ()))
            if track.kind == "video"
        ]
        due = [
            track
            for track in candidates
            if force or now - state.last_by_track.get(track.fanout_id, -math.inf) >= self.interval
        ]
        throttled = [track for track in candidates if track not in due]
        if throttled:
            self._counters["keyframe_requests_throttled"] += 1
            state.owed.extend(t for t in throttled if t not in state.owed)
            retry_at = min(state.last_by_track.get(t.fanout_id, -math.inf) for t in throttled)
            self._timers.schedule((TimerKind.KEYFRAME_RETRY, stream.name), retry_at + self.interval)
        if not due:
            return False
        upstream = stream.keyframe_upstream or self._default_upstream
        if not upstream(stream, due, now):
            return False
        for track in due:
            state.last_by_track[track.fanout_id] = now
        state.last_request = now
        state.requests_made += 1
        return True

    def handle_timer(self, stream: Stream | None, name: str, now: float) -> None:
        """The ``KEYFRAME_RETRY`` timer of stream ``name``: ask for what is still owed."""
        state = self._streams.get(name)
        if state is None:
            return
        owed, state.owed = state.owed, []
        if stream is None:
            return
        current = stream.all_tracks()
        live = [track for track in owed if track in current]
        if live:
            self.request(stream, now, tracks=live)

    def last_request(self, stream_name: str) -> float:
        """When a request for ``stream_name`` last went upstream (-inf: never)."""
        state = self._streams.get(stream_name)
        return state.last_request if state is not None else -math.inf

    def requests_made(self, stream_name: str) -> int:
        state = self._streams.get(stream_name)
        return state.requests_made if state is not None else 0

    def forget(self, stream_name: str) -> None:
        """The stream is gone from this worker."""
        self._streams.pop(stream_name, None)
        self._timers.cancel((TimerKind.KEYFRAME_RETRY, stream_name))


class PublisherFeedback:
    """RTCP from this worker to a stream's publisher: periodic RR (RFC 3550 §6.4.2) with
    a REMB cap (draft-alvestrand-rmcat-remb §2), and PLIs (the default keyframe
    upstream). Everything is SRTCP-protected (RFC 3711 §3.4) and sent from the address
    the publisher's checks reached."""

    def __init__(
        self,
        *,
        sender: Sender,
        counters: Counter[str],
        rtcp_ssrc: int,
        max_bitrate: int,
    ) -> None:
        self._sender = sender
        self._counters = counters
        self.rtcp_ssrc = rtcp_ssrc
        self.max_bitrate = max_bitrate

    @staticmethod
    def connected(stream: Stream) -> bool:
        publisher = stream.publisher
        return (
            publisher is not None
            and publisher.address is not None
            and stream.publisher_srtcp_out is not None
        )

    def send(self, stream: Stream, compound: bytes, *, failure: str) -> bool:
        """SRTCP-protect ``compound`` and send it to the stream's publisher; a protect
        failure is counted as ``failure``. The caller has checked ``connected``."""
        publisher = stream.publisher
        assert publisher is not None and publisher.address is not None
        assert stream.publisher_srtcp_out is not None
        try:
            protected = stream.publisher_srtcp_out.protect_rtcp(compound)
        except _fastpath.SrtpError:
            self._counters[failure] += 1
            return False
        self._sender.transmit(protected, publisher.address, publisher.local_address)
        return True

    def report(self, stream: Stream, now: float) -> None:
        """Periodic feedback: RR for loss/jitter and REMB as a cap."""
        if not self.connected(stream):
            return
        blocks = [
            s.report_block(now) for s in stream.ingest_stats.values() if s.base_seq is not None
        ]
        packets: list[rtcp.RtcpPacket] = [
            rtcp.ReceiverReport(ssrc=self.rtcp_ssrc, reports=blocks[:31])
        ]
        media_ssrcs = [ssrc for ssrc, (_, rtx) in stream.ingest_by_ssrc.items() if not rtx]
        if media_ssrcs:
            packets.append(
                rtcp.ReceiverEstimatedMaxBitrate(
                    sender_ssrc=self.rtcp_ssrc, bitrate=self.max_bitrate, ssrcs=media_ssrcs
                )
            )
        compound = b"".join(bytes(p) for p in packets)
        self.send(stream, compound, failure="publisher_feedback_failed")

    def request_keyframes(self, stream: Stream, tracks: Sequence[Track], now: float) -> bool:
        """PLI for each media SSRC of ``tracks`` (the default ``KeyframeUpstream``)."""
        if not self.connected(stream):
            return False
        wanted = {id(track) for track in tracks}
        video_ssrcs = [
            ssrc
            for ssrc, (track, rtx) in stream.ingest_by_ssrc.items()
            if not rtx and id(track) in wanted
        ]
        if not video_ssrcs:
            return False
        compound = b"".join(
            bytes(rtcp.PictureLossIndication(sender_ssrc=self.rtcp_ssrc, media_ssrc=ssrc))
            for ssrc in video_ssrcs
        )
        if self.send(stream, compound, failure="keyframe_request_failed"):
            self._counters["keyframe_requests_sent"] += 1
        return True
