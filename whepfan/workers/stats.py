"""Worker and server stats bodies: what each worker reports once a second, what the
metrics and status endpoints read, and the observer that samples a router for them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from whepfan.media.health import RECEIVE_DELAY_WARNING, LatencyHistogram, ReceiveDelay
from whepfan.media.router import Router
from whepfan.media.session import SessionKind

if TYPE_CHECKING:
    from whepfan.workers.capacity import CapacityLedger, WorkerLoad


@dataclass(slots=True, kw_only=True)
class WorkerStats:
    """One worker's cumulative counters, as the metrics endpoint reads them."""

    worker: int
    pid: int
    alive: bool = True
    viewers: int = 0
    publishers: int = 0
    router: dict[str, int] = field(default_factory=dict)  # Router.counters
    fanout: dict[str, int] = field(default_factory=dict)  # Fanout.stats()
    setup_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    receive_delay: float = 0.0  # seconds: ReceiveDelay.seconds of the worker's socket
    behind: bool = False  # ReceiveDelay.sustained over RECEIVE_DELAY_WARNING

    def to_json(self) -> dict[str, object]:
        return {
            "receive_delay": self.receive_delay,
            "behind": self.behind,
            "worker": self.worker,
            "pid": self.pid,
            "viewers": self.viewers,
            "publishers": self.publishers,
            "router": self.router,
            "fanout": self.fanout,
            "setup_latency": self.setup_latency.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> WorkerStats:
        def counters(name: str) -> dict[str, int]:
            value = data.get(name)
            if not isinstance(value, dict):
                raise ValueError(f"{name} is not a mapping")
            return {str(k): int(v) for k, v in value.items() if isinstance(v, int)}

        def integer(name: str) -> int:
            value = data.get(name)
            if not isinstance(value, int):
                raise ValueError(f"{name} is not an integer")
            return value

        latency = data.get("setup_latency")
        if not isinstance(latency, dict):
            raise ValueError("worker stats without a latency histogram")
        delay = data.get("receive_delay", 0.0)
        if not isinstance(delay, int | float) or isinstance(delay, bool):
            raise ValueError("receive_delay is not a number")
        behind = data.get("behind", False)
        if not isinstance(behind, bool):
            raise ValueError("behind is not a boolean")
        return cls(
            receive_delay=float(delay),
            behind=behind,
            worker=integer("worker"),
            pid=integer("pid"),
            viewers=integer("viewers"),
            publishers=integer("publishers"),
            router=counters("router"),
            fanout=counters("fanout"),
            setup_latency=LatencyHistogram.from_json(latency),
        )


@dataclass(slots=True, kw_only=True)
class ServerStats:
    """Everything ``GET /metrics`` shows: each live worker's counters (a replaced worker
    starts from zero; Prometheus' rate() treats that as the counter reset it is) and the
    admission ledger."""

    workers: list[WorkerStats]
    loads: list[WorkerLoad]
    egress_bit_budget: float | None
    refusals: dict[str, int]
    admissions: dict[str, int]
    worker_restarts: int = 0
    draining: bool = False
    # Viewers admitted and not connected yet, and their cap (None: unbounded).
    pending_viewers: int = 0
    max_pending_viewers: int | None = None


def server_stats(
    ledger: CapacityLedger, workers: list[WorkerStats], *, restarts: int
) -> ServerStats:
    return ServerStats(
        workers=workers,
        loads=[ledger.load(worker) for worker in ledger.workers],
        egress_bit_budget=ledger.policy.egress_bit_budget,
        refusals=dict(ledger.refusals),
        admissions=dict(ledger.admissions),
        worker_restarts=restarts,
        draining=ledger.draining,
        pending_viewers=ledger.pending,
        max_pending_viewers=ledger.policy.max_pending,
    )


class RouterMonitor:
    """Observes one router from outside: sessions that ended on their own (consent loss,
    DTLS failure), setup latency of sessions that connected, and the counters."""

    def __init__(self, router: Router, *, worker: int) -> None:
        self.router = router
        self.worker = worker
        self.setup_latency = LatencyHistogram()
        # The worker's socket's (MediaWorker.receive_delay); a fresh one until it is set.
        self.receive_delay = ReceiveDelay()
        self._known: dict[str, tuple[str, str]] = {}
        self._observed: set[str] = set()
        # Sessions seen keyed since take_connected() last ran (admission: pending ->
        # connected, capacity.CapacityLedger.connected).
        self._connected: list[str] = []

    def sample(self) -> list[tuple[str, str, str]]:
        """Observe newly keyed sessions; return (id, kind, stream) of ended ones."""
        sessions = self.router.sessions
        ended = [
            (session_id, kind, stream)
            for session_id, (kind, stream) in self._known.items()
            if session_id not in sessions
        ]
        for session_id, _, _ in ended:
            del self._known[session_id]
            self._observed.discard(session_id)
        for session in sessions.values():
            if session.id not in self._known:
                self._known[session.id] = (session.kind.value, session.stream)
            if session.connected_at is not None and session.id not in self._observed:
                self._observed.add(session.id)
                self._connected.append(session.id)
                self.setup_latency.observe(max(0.0, session.connected_at - session.created_at))
        return ended

    def take_connected(self) -> list[str]:
        """Ids of the sessions ``sample`` saw keyed since the last call."""
        connected, self._connected = self._connected, []
        return connected

    def stats(self) -> WorkerStats:
        publishers = sum(
            1 for s in self.router.sessions.values() if s.kind is SessionKind.PUBLISHER
        )
        return WorkerStats(
            worker=self.worker,
            pid=os.getpid(),
            viewers=len(self.router.sessions) - publishers,
            publishers=publishers,
            router=dict(self.router.counters),
            fanout=self.router.fanout.stats(),
            setup_latency=self.setup_latency,
            receive_delay=self.receive_delay.seconds(),
            behind=self.receive_delay.sustained(RECEIVE_DELAY_WARNING) is not None,
        )
