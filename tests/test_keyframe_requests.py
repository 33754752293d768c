"""The keyframe-request throttle (media/feedback.py ``KeyframeRequests``) on virtual time.

Like mediasoup's TestKeyFrameRequestManager: no sockets, no clock, a recording upstream,
exact deadlines. The rules (RFC 4585 §6.3.1 PLI; the module docstring says why):
at most one request per layer per interval, throttled requests deferred to the end of the
interval and never dropped, ``force`` bypasses the throttle, and a stream's own
``keyframe_upstream`` (a relay copy's) is used through the same throttle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest

from whepfan.media.feedback import KeyframeRequests
from whepfan.media.streams import Stream, Track
from whepfan.media.timers import TimerKind, Timers
from whepfan.protocol.negotiation import IngestMedia

INTERVAL = 0.5


class RecordingUpstream:
    """An upstream that records each request and may refuse (no publisher connected)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, list[int], float]] = []
        self.reachable = True

    def __call__(self, stream: Stream, tracks: Sequence[Track], now: float) -> bool:
        if not self.reachable:
            return False
        self.requests.append((stream.name, [t.fanout_id for t in tracks], now))
        return True


def _track(fanout_id: int, kind: str = "video") -> Track:
    media = IngestMedia.__new__(IngestMedia)  # the throttle never reads the negotiation
    return Track(
        fanout_id=fanout_id,
        kind=kind,
        ingest=media,
        codec_name="VP8",
        clock_rate=90000,
        encoding_index=fanout_id,
    )


class Clockwork:
    """A throttle on virtual time: ``run_until(t)`` fires every timer due by ``t``."""

    def __init__(self) -> None:
        self.wakes = 0
        self.timers = Timers(wake=self._wake)
        self.counters: Counter[str] = Counter()
        self.upstream = RecordingUpstream()
        self.requests = KeyframeRequests(
            interval=INTERVAL, timers=self.timers, counters=self.counters, upstream=self.upstream
        )
        self.stream = Stream(name="live")
        self.low, self.high = _track(1), _track(2)
        self.stream.tracks = {"video": [self.low, self.high], "audio": [_track(3, "audio")]}

    def _wake(self) -> None:
        self.wakes += 1

    def run_until(self, end: float) -> None:
        """Fire each timer at its own deadline, as the driver would, up to ``end``."""
        while (deadline := self.timers.next_deadline()) is not None and deadline <= end:
            for kind, name in self.timers.due(deadline):
                assert kind is TimerKind.KEYFRAME_RETRY
                stream = self.stream if name == "live" else None
                self.requests.handle_timer(stream, name, deadline)


@pytest.fixture
def clock() -> Clockwork:
    return Clockwork()


def test_the_first_request_goes_at_once_for_every_video_layer(clock: Clockwork) -> None:
    assert clock.requests.request(clock.stream, 1.0)
    assert clock.upstream.requests == [("live", [1, 2], 1.0)]  # audio is never asked
    assert clock.requests.last_request("live") == 1.0
    assert clock.timers.next_deadline() is None


def test_a_request_within_the_interval_is_deferred_to_its_end(clock: Clockwork) -> None:
    clock.requests.request(clock.stream, 1.0)
    assert not clock.requests.request(clock.stream, 1.2)
    assert clock.counters["keyframe_requests_throttled"] == 1
    assert clock.timers.next_deadline() == 1.0 + INTERVAL  # exactly when the interval ends
    clock.run_until(1.0 + INTERVAL - 1e-9)
    assert len(clock.upstream.requests) == 1
    clock.run_until(1.0 + INTERVAL)
    assert clock.upstream.requests[-1] == ("live", [1, 2], 1.0 + INTERVAL)


def test_a_storm_of_requests_costs_one_deferred_request(clock: Clockwork) -> None:
    """A join storm: fifty viewers within one interval make one PLI now, one at its end."""
    now = 1.0
    clock.requests.request(clock.stream, now)
    for step in range(50):
        clock.requests.request(clock.stream, now + step * 0.001)
    clock.run_until(now + 10 * INTERVAL)
    assert [at for _, _, at in clock.upstream.requests] == [now, now + INTERVAL]


def test_layers_are_throttled_apart(clock: Clockwork) -> None:
    """A switch to the high layer right after a request for the low one is not held back."""
    clock.requests.request(clock.stream, 1.0, tracks=[clock.low])
    assert clock.requests.request(clock.stream, 1.1, tracks=[clock.high])
    assert clock.upstream.requests == [("live", [1], 1.0), ("live", [2], 1.1)]
    clock.requests.request(clock.stream, 1.2)  # both within their intervals: deferred
    assert clock.timers.next_deadline() == 1.0 + INTERVAL  # the earliest owed layer's end
    clock.run_until(1.0 + INTERVAL)
    assert clock.upstream.requests[-1] == ("live", [1], 1.0 + INTERVAL)
    clock.run_until(1.1 + INTERVAL)
    assert clock.upstream.requests[-1] == ("live", [2], 1.1 + INTERVAL)


def test_force_bypasses_the_throttle(clock: Clockwork) -> None:
    """A publisher that just connected is asked at once (its first keyframe starts viewers)."""
    clock.requests.request(clock.stream, 1.0)
    assert clock.requests.request(clock.stream, 1.1, force=True)
    assert [at for _, _, at in clock.upstream.requests] == [1.0, 1.1]


def test_no_reachable_upstream_is_not_counted_as_a_request(clock: Clockwork) -> None:
    clock.upstream.reachable = False
    assert not clock.requests.request(clock.stream, 1.0)
    assert clock.requests.requests_made("live") == 0
    clock.upstream.reachable = True
    assert clock.requests.request(clock.stream, 1.1)  # not throttled by the failed one
    assert clock.requests.requests_made("live") == 1


def test_a_layer_gone_before_its_retry_is_not_asked_for(clock: Clockwork) -> None:
    clock.requests.request(clock.stream, 1.0)
    clock.requests.request(clock.stream, 1.1)
    clock.stream.tracks["video"] = [clock.low]  # the publisher returned with one encoding
    clock.run_until(2.0)
    assert clock.upstream.requests[-1] == ("live", [1], 1.0 + INTERVAL)


def test_a_stream_gone_before_its_retry_is_forgotten(clock: Clockwork) -> None:
    clock.requests.request(clock.stream, 1.0)
    clock.requests.request(clock.stream, 1.1)
    clock.requests.forget("live")
    assert clock.timers.next_deadline() is None
    clock.run_until(5.0)
    assert len(clock.upstream.requests) == 1


def test_a_relay_copy_asks_its_own_upstream_through_the_same_throttle(
    clock: Clockwork,
) -> None:
    """The strategy seam: a relay copy's requests go to the origin worker, not to a PLI,
    and are throttled and deferred exactly like the origin's."""
    forwarded: list[float] = []

    def ask_origin(stream: Stream, tracks: Sequence[Track], now: float) -> bool:
        forwarded.append(now)
        return True

    clock.stream.keyframe_upstream = ask_origin
    clock.requests.request(clock.stream, 1.0)
    clock.requests.request(clock.stream, 1.1)
    clock.run_until(3.0)
    assert forwarded == [1.0, 1.0 + INTERVAL]
    assert clock.upstream.requests == []
