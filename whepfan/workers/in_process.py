"""--workers 1: the worker's router in this process, behind the capacity ledger.

The HTTP layer calls a ``SessionRouter`` (http/backend.py); with one worker that is
the in-process ``Router`` itself, with admission in between: the capacity ledger picks
whether a viewer fits (and on which layer), and ``LayerCeilings`` holds viewers admitted
on a lower layer under it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from whepfan import _fastpath
from whepfan.config import MediaConfig
from whepfan.errors import ServiceUnavailable
from whepfan.media.health import RECEIVE_DELAY_WARNING
from whepfan.media.layers import LayerRequest
from whepfan.media.router import Router
from whepfan.media.session import MediaSession, SessionKind
from whepfan.media.streams import Stream, StreamListener, stream_tracks
from whepfan.protocol import sdp
from whepfan.workers.capacity import CapacityLedger, LayerCeilings, RateMeter, stream_layers
from whepfan.workers.stats import RouterMonitor, ServerStats, server_stats

# Seconds between two settles of the ledger on refused POSTs (each walks every session).
SETTLE_INTERVAL = 0.25


class InProcessWorkers:
    """``--workers 1``: the in-process router behind the capacity ledger."""

    def __init__(self, *, router: Router, ledger: CapacityLedger) -> None:
        self.router = router
        self.ledger = ledger
        self.monitor = RouterMonitor(router, worker=0)
        self._meters: dict[tuple[str, str], RateMeter] = {}
        self.layer_ceilings = LayerCeilings()  # viewers admitted on a lower layer
        self._settled_at: float | None = None  # when a refusal last settled the ledger

    # SessionRouter ----------------------------------------------------------------------

    @property
    def streams(self) -> Mapping[str, Stream]:
        return self.router.streams

    @property
    def fanout(self) -> _fastpath.Fanout:
        return self.router.fanout

    @property
    def viewer_count(self) -> int:
        return self.router.viewer_count

    @property
    def config(self) -> MediaConfig:
        return self.router.config

    @property
    def lower_layer_admissions(self) -> int:
        return self.layer_ceilings.capped

    def publish(self, stream_name: str, offer_text: str, now: float) -> tuple[Any, str]:
        if self.ledger.draining:
            self.ledger.reserve(stream_name)  # raises: counted as a draining refusal
        return self.router.publish(stream_name, offer_text, now)

    def view(self, stream_name: str, offer_text: str, now: float) -> tuple[Any, str]:
        return self._admit(stream_name, lambda: self.router.view(stream_name, offer_text, now), now)

    def counter_offer(self, stream_name: str, now: float) -> tuple[Any, str]:
        return self._admit(stream_name, lambda: self.router.counter_offer(stream_name, now), now)

    def accept_counter_answer(self, session_id: str, answer_text: str, now: float) -> None:
        self.router.accept_counter_answer(session_id, answer_text, now)

    def trickle(self, session_id: str, fragment: sdp.SdpFragment, now: float) -> None:
        self.router.trickle(session_id, fragment, now)

    def restart_ice(self, session_id: str, fragment: sdp.SdpFragment, now: float) -> str:
        return self.router.restart_ice(session_id, fragment, now)

    def end_session(self, session_id: str, now: float, reason: str = "deleted") -> bool:
        self.ledger.release(session_id)
        self.layer_ceilings.forget(session_id)
        return self.router.end_session(session_id, now, reason)

    def select_layer(self, session_id: str, request: LayerRequest, now: float) -> dict[str, object]:
        """The layer API (EXT §5), within the ceiling of a lower-layer admission."""
        if session_id in self.layer_ceilings:
            session = self.router.get_session(session_id)
            request = self.layer_ceilings.held(
                session_id, request, self.router.streams.get(session.stream)
            )
        return self.router.select_layer(session_id, request, now)

    def layer_status(self, session_id: str, now: float) -> dict[str, object]:
        return self.router.layer_status(session_id, now)

    def get_session(self, session_id: str) -> MediaSession:
        return self.router.get_session(session_id)

    def session_pending(self, session_id: str) -> bool:
        """Answered and not connected yet (http/pending.py): the router's own state, so a
        session that connected or ended a moment ago no longer counts."""
        session = self.router.sessions.get(session_id)
        return session is not None and session.connected_at is None

    def add_listener(self, listener: StreamListener) -> None:
        self.router.add_listener(listener)

    def remove_listener(self, listener: StreamListener) -> None:
        self.router.remove_listener(listener)

    # admission, load, stats ------------------------------------------------------------

    def _admit(
        self, stream_name: str, create: Callable[[], tuple[Any, str]], now: float
    ) -> tuple[Any, str]:
        stream = self.router.streams.get(stream_name)
        if stream is None or not stream.live:
            return create()  # the router answers 409 (WHEP §4.2.8) before any 503
        try:
            admission = self.ledger.reserve(stream_name, count_refusal=False, now=now)
        except ServiceUnavailable:
            # Sessions that ended without a DELETE, or connected since the last tick, may
            # still be on the books as they were: settle once. Settling walks every
            # session, so a flood of refused POSTs settles at most every SETTLE_INTERVAL.
            if self._settled_at is None or not 0 <= now - self._settled_at < SETTLE_INTERVAL:
                self._settled_at = now
                self.tick(None)
            admission = self.ledger.reserve(stream_name, now=now)
        session, answer = create()
        self.ledger.commit(session.id, stream_name, admission, now)
        if admission.layer > 0:
            self.layer_ceilings.cap(self.router, session.id, stream, admission.layer, now)
        return session, answer

    def tick(self, now: float | None) -> None:
        """Once a second: settle ended and connected sessions, observe setup latency,
        measure streams."""
        for session_id, _, _ in self.monitor.sample():
            self.layer_ceilings.forget(session_id)
        for session_id in self.monitor.take_connected():
            self.ledger.connected(session_id)  # pending -> connected
        # A worker whose socket has queued media for a while takes no new viewers.
        self.ledger.set_behind(
            0, self.monitor.receive_delay.sustained(RECEIVE_DELAY_WARNING) is not None
        )
        self.ledger.retain(
            s.id for s in self.router.sessions.values() if s.kind is SessionKind.VIEWER
        )
        if now is None:
            return
        for name, stream in self.router.streams.items():
            counters = [(k, t.kind, t.packets, t.octets) for k, t in stream_tracks(stream)]
            layers = stream_layers(self._meters, name, counters, now)
            if layers:
                self.ledger.set_stream_layers(name, layers)

    def begin_drain(self) -> None:
        self.ledger.draining = True

    def stats(self) -> ServerStats:
        return server_stats(self.ledger, [self.monitor.stats()], restarts=0)

    async def close(self) -> None:
        return None
