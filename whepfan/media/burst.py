"""What one read burst delivered, per track, pushed together at the burst's end.

The transport reads up to RECEIVE_BURST datagrams per wake-up of the worker's socket
(transport.py), and the relay up to 256 frames (workers/node.py). A 720p frame is 6-8
packets sent back to back, so a burst often holds several packets of one track; pushed
together (``Fanout.push_batch``) each viewer's run of them goes out as one UDP GSO entry.

Only what is already here is batched: ``begin()`` at the start of a burst, ``end()`` when
the driver has read everything that was queued, and nothing waits for packets that have
not arrived, so latency at low load is unchanged. Outside a burst (tests, drivers that do
not bracket their reads) every packet is pushed at once, exactly as before. ``flush()``
empties the burst early where order matters: before a track's sender report (its packet
counts must include what was received before it) and before a track is removed.
"""

from __future__ import annotations

from collections.abc import Callable

from whepfan import _fastpath


class FanoutBursts:
    """Packets of a read burst per fan-out track, for ``Fanout.push_batch``."""

    def __init__(
        self, fanout: Callable[[], _fastpath.Fanout], *, flushed: Callable[[], object]
    ) -> None:
        self._fanout = fanout  # the owner's current Fanout (tests may wrap it)
        self._flushed = flushed  # after each flush: switches that completed (layers.py)
        self.collecting = False
        # Fan-out track id -> (packets, keyframe flags), in arrival order; a dict keeps
        # the tracks in the order their first packet arrived.
        self._pending: dict[int, tuple[list[bytes], list[bool]]] = {}
        self._now = 0.0
        self.dropped_removed = 0

    def begin(self) -> None:
        self.collecting = True

    def end(self) -> None:
        self.flush()
        self.collecting = False

    def push(self, track_id: int, packet: bytes, keyframe: bool, now: float) -> bool:
        """Push now (False), or hold for the end of the burst (True)."""
        if not self.collecting:
            self._fanout().push(track_id, packet, keyframe, now)
            return False
        pending = self._pending.get(track_id)
        if pending is None:
            pending = self._pending[track_id] = ([], [])
        pending[0].append(packet)
        pending[1].append(keyframe)
        self._now = now
        return True

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        fanout = self._fanout()
        for track_id, (packets, keyframes) in pending.items():
            try:
                if len(packets) == 1:
                    fanout.push(track_id, packets[0], keyframes[0], self._now)
                else:
                    fanout.push_batch(track_id, packets, keyframes, self._now)
            except KeyError:
                # The track was removed during the burst (its publisher left, the last
                # viewer with it): nobody is left to send these to.
                self.dropped_removed += len(packets)
        self._flushed()
