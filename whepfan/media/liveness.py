"""Publisher liveness: has a stream's media stopped (a crashed encoder, a dead publisher)?

Why: a publisher that dies without a DELETE or a DTLS close_notify (SIGKILL, a crashed
encoder, a pulled cable) keeps its session until ICE consent expires, 30 s after its
last check (RFC 7675 §5.1). For those 30 s the stream would look live: viewers see
nothing and are not told, and a restarted publisher gets 409. Media says it sooner: a
live encoder sends audio every 20 ms and video every frame.

Theory of operation (sans-IO, every method takes ``now``):

- ``watch(stream, now)`` when a WHIP publisher attaches (router.publish); the media
  clock starts then, so a publisher that never sends a packet stalls too;
- ``packet(stream, now)`` for every SRTP packet the publisher sends (ingest: one
  line); on a stalled stream it resumes it: ``stream.active`` and the "active" event;
- the ``MEDIA_TIMEOUT`` timer of the stream (one per stream, not one per packet: the
  deadline is pushed lazily) fires ``timeout`` after the later of watch and the last
  packet; ``handle_timer`` then marks the stream stalled and, if it was active, clears
  ``stream.active`` and emits "inactive" (WHEP EXT §4.3.1); if a packet came since the
  deadline was set, it re-arms at ``last packet + timeout`` instead;
- ``stalled(stream, now)`` is the publish-time question "may a new WHIP POST replace
  the live publisher?" (router.publish); it reads the clock directly, so it does not
  depend on when the timer ran; ``replaceable_in`` is the Retry-After until then;
- ``forget(stream name)`` when the publisher leaves (router.end_session).

Viewers stay subscribed throughout: a stall is not an end, and when the publisher (or
its replacement) sends again, ingest's rebase keeps their sequence and timestamp lines
continuous (RFC 3550 §5.1), so they resume without renegotiating.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from whepfan.media.streams import Stream, StreamListeners
from whepfan.media.timers import TimerKind, Timers


@dataclass(eq=False, slots=True)
class _Watched:
    """One watched stream's media clock."""

    last_media_at: float  # the last SRTP packet, or the watch start before the first one
    stalled: bool = False


class MediaLiveness:
    """The media clocks of one worker's WHIP publishers (see the module docstring)."""

    def __init__(
        self,
        *,
        timeout: float,
        timers: Timers,
        listeners: StreamListeners,
        counters: Counter[str],
    ) -> None:
        if not timeout > 0:
            raise ValueError("the media timeout must be positive")
        self.timeout = timeout
        self._timers = timers
        self._listeners = listeners
        self._counters = counters
        self._watched: dict[str, _Watched] = {}

    def watch(self, stream: Stream, now: float) -> None:
        """A WHIP publisher attached to ``stream``: its media clock starts now."""
        self._watched[stream.name] = _Watched(last_media_at=now)
        self._timers.schedule((TimerKind.MEDIA_TIMEOUT, stream.name), now + self.timeout)

    def forget(self, stream_name: str) -> None:
        """The publisher left (its session ended): nothing to watch."""
        if self._watched.pop(stream_name, None) is not None:
            self._timers.cancel((TimerKind.MEDIA_TIMEOUT, stream_name))

    def packet(self, stream: Stream, now: float) -> None:
        """An SRTP packet of ``stream``'s publisher (after a successful unprotect)."""
        watched = self._watched.get(stream.name)
        if watched is None:
            return
        watched.last_media_at = now
        if watched.stalled:
            watched.stalled = False
            self._counters["publisher_media_resumed"] += 1
            self._timers.schedule((TimerKind.MEDIA_TIMEOUT, stream.name), now + self.timeout)
            if not stream.active:
                stream.active = True
                self._listeners.emit(stream.name, "active", {})

    def handle_timer(self, stream: Stream | None, name: str, now: float) -> None:
        """The ``MEDIA_TIMEOUT`` timer of stream ``name``."""
        watched = self._watched.get(name)
        if watched is None or stream is None:
            return
        deadline = watched.last_media_at + self.timeout
        if now < deadline:
            # Media came since the timer was set: look again a timeout after the last.
            self._timers.schedule((TimerKind.MEDIA_TIMEOUT, name), deadline)
            return
        if watched.stalled:
            return
        watched.stalled = True
        self._counters["publisher_media_stalled"] += 1
        if stream.active:
            stream.active = False
            self._listeners.emit(name, "inactive", {})

    def stalled(self, stream: Stream, now: float) -> bool:
        """No media from ``stream``'s publisher for ``timeout`` seconds (or it is not
        watched: then nothing vouches for it either)."""
        watched = self._watched.get(stream.name)
        return watched is None or now - watched.last_media_at >= self.timeout

    def replaceable_in(self, stream: Stream, now: float) -> int:
        """Whole seconds until ``stalled`` turns true with no more media (Retry-After,
        RFC 9110 §10.2.3), at least 1."""
        watched = self._watched.get(stream.name)
        if watched is None:
            return 1
        return max(1, math.ceil(watched.last_media_at + self.timeout - now))
