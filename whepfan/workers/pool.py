"""--workers N: registry, routing, restarts (the main process's view of N workers).

Theory of operation
-------------------
:class:`WorkerPool` is the HTTP layer's ``SessionRouter`` (http/backend.py) with N
worker processes (node.py), worker i on UDP port base+i. The main process keeps a
registry of sessions and streams, picks a worker per new viewer from the capacity
ledger (least loaded), and forwards each signalling call to the session's worker over
its control channel (control.py). Calls block the HTTP loop for one worker round trip
(an SDP negotiation, about a millisecond); the HTTP handlers call the router
synchronously, which is what keeps a cancelled request from leaving half a session.

The publisher's worker is the stream's origin; every other worker gets a relay copy of
the stream (media/relay.py) when it is published, or when the worker (re)starts.

The layer API (EXT §5) is forwarded to the viewer's worker like any session call; a
viewer admitted on a lower layer has its ceiling kept by its worker (``CAP_LAYER``,
capacity.LayerCeilings). The status API reads the registry plus what each worker's
once-a-second stats message reports: every worker its viewers receiving media per
stream, the origin also the publisher and its tracks; the origin's "layers" events are
forwarded as they happen.

A worker process that exits is seen through its process sentinel: its sessions leave the
registry (their PATCH/DELETE answer 404), event readers of those sessions are told to
reconnect, streams it originated go inactive, and a replacement starts on the same port.

A stream's publisher may also be a *feed* the main process drives itself (an upstream
pull, cluster/pool_backend.py): ``choose_origin`` picks its worker as for a WHIP
publisher, ``request_async`` awaits the worker's answer (control.py: ops whose answer takes
network round trips), and ``attach_feed`` registers it as the stream's origin, so viewers
are admitted on every worker and relay copies follow it; its owner hears when it goes
other than by ``detach_feed`` (its worker exited). Events of such ops reach the
``event_handlers`` their owner registers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import select
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import orjson

from whepfan import errors
from whepfan.config import MediaConfig
from whepfan.errors import NotFound, ServiceUnavailable
from whepfan.media.layers import LayerRequest
from whepfan.media.session import SessionKind, SessionState
from whepfan.media.streams import StreamListener, StreamListeners
from whepfan.protocol import sdp
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.workers import control
from whepfan.workers.capacity import Admission, CapacityLedger, RateMeter, stream_layers
from whepfan.workers.node import (
    ExtensionFactory,
    WorkerSpec,
    certificate_pem,
    worker_process_main,
)
from whepfan.workers.stats import ServerStats, WorkerStats, server_stats

log = logging.getLogger("whepfan.workers")

SessionLostHook = Callable[[list[str]], object]  # return value ignored
FeedLostHook = Callable[[str], object]  # (why) a feed went other than by detach_feed
WorkerEventHandler = Callable[[int, dict[str, Any]], object]  # (worker, event message)


@dataclass(slots=True)
class ProxyIce:
    remote_ufrag: str | None


# eq=False keeps identity hashing and weakref_slot lets the HTTP layer key weak maps by
# session, as it does for the router's own sessions.
@dataclass(slots=True, kw_only=True, eq=False, weakref_slot=True)
class ProxySession:
    """The main process's record of a session living on a worker."""

    id: str
    kind: SessionKind
    stream: str
    etag: str
    ice: ProxyIce
    worker: int
    # Publishers only, for the status API: from the origin worker's stats messages.
    state: SessionState = SessionState.NEW
    connected_at: float | None = None
    # Any kind: reported keyed (ICE + DTLS) by its worker, so no longer pending.
    keyed: bool = False

    def update(self, data: dict[str, Any]) -> None:
        self.etag = data["etag"]
        self.ice.remote_ufrag = data["remote_ufrag"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyTrack:
    """One ingested track as the origin worker last reported it (http/status.py's
    TrackStatusView). ``fanout_id`` numbers the stream's tracks in the origin's order:
    the status API only needs it to tell one track's counters from another's."""

    fanout_id: int
    key: str
    kind: str
    codec_name: str
    clock_rate: int
    packets: int
    octets: int


@dataclass(slots=True, kw_only=True)
class ProxyStream:
    name: str
    origin: int | None = None
    publisher: ProxySession | None = None
    canonical_offer: str | None = None
    active: bool = False
    viewers: dict[str, ProxySession] = field(default_factory=dict)
    # From the workers' stats messages: the origin's tracks, and per worker the viewers
    # receiving media and the subscribers per track key.
    reported_tracks: dict[str, ProxyTrack] = field(default_factory=dict)
    reported_viewers: dict[int, tuple[int, dict[str, int]]] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.publisher is not None

    @property
    def tracks(self) -> Mapping[str, ProxyTrack]:
        return self.reported_tracks if self.live else {}

    def subscriptions(self) -> tuple[int, Mapping[int, int]]:
        """Viewers receiving media on every worker, and subscribers per track
        (``fanout_id``): the workers' counts added up (http/status.py)."""
        connected = 0
        subscribers: dict[int, int] = {}
        for count, by_key in self.reported_viewers.values():
            connected += count
            for key, number in by_key.items():
                track = self.reported_tracks.get(key)
                if track is not None:
                    subscribers[track.fanout_id] = subscribers.get(track.fanout_id, 0) + number
        return connected, subscribers

    def report(self, worker: int, entry: dict[str, Any], now: float) -> None:
        """One worker's ``stream_status`` entry for this stream."""
        self.reported_viewers[worker] = (
            int(entry.get("connected", 0)),
            {str(k): int(v) for k, v in entry.get("subscribers", {}).items()},
        )
        if worker != self.origin:
            return
        publisher = entry.get("publisher")
        if publisher is not None and self.publisher is not None:
            self.publisher.state = SessionState(publisher["state"])
            connected_for = publisher.get("connected_for")
            self.publisher.connected_at = (
                None if connected_for is None else now - float(connected_for)
            )
        rows = entry.get("tracks")
        if rows is not None:
            self.reported_tracks = {
                str(key): ProxyTrack(
                    fanout_id=index,
                    key=str(key),
                    kind=str(kind),
                    codec_name=str(codec),
                    clock_rate=int(clock_rate),
                    packets=int(packets),
                    octets=int(octets),
                )
                for index, (key, kind, codec, clock_rate, packets, octets) in enumerate(rows)
            }


class PoolFanoutStats:
    """The workers' Fanout counters added up (http/status.py's FanoutStatsView). A
    replaced worker starts its counters from zero: totals only ever grow, by each
    worker's increase since its previous report, so rates over them stay right."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self._last: dict[int, tuple[int, dict[str, int]]] = {}  # worker -> (pid, counters)

    def update(self, worker: int, pid: int, counters: Mapping[str, int]) -> None:
        last_pid, last = self._last.get(worker, (pid, {}))
        if last_pid != pid:
            last = {}
        for name, value in counters.items():
            before = last.get(name, 0)
            increase = value - before if value >= before else value
            self.totals[name] = self.totals.get(name, 0) + increase
        self._last[worker] = (pid, dict(counters))

    def stats(self) -> dict[str, int]:
        return {"bytes_sent": 0, **self.totals}


class WorkerGone(Exception):
    """The worker's control channel closed (the process exited)."""


class WorkerHandle:
    """Main side of one worker process: its control socket and sentinel."""

    def __init__(self, *, index: int, process: Any, control: socket.socket) -> None:
        self.index = index
        self.process = process
        self.control = control
        self.control.setblocking(False)
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.stats: WorkerStats | None = None
        self.alive = True
        self._next_id = 0
        # Requests answered later (request_async): id -> the reply message's future.
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}

    @property
    def serving(self) -> bool:
        """Alive and past its start (its ready message came)."""
        return self.alive and self.ready.done() and self.ready.exception() is None

    def send(self, message: dict[str, Any]) -> None:
        data = orjson.dumps(message)
        try:
            self.control.send(data)
        except BlockingIOError:
            _, writable, _ = select.select([], [self.control], [], 5.0)
            if not writable:
                raise ServiceUnavailable("media worker not reading", retry_after=5) from None
            self.control.send(data)
        except OSError:
            raise WorkerGone from None

    def receive(self) -> dict[str, Any] | None:
        """One pending message, or None when there is none right now."""
        try:
            data = self.control.recv(1 << 20)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            raise WorkerGone
        return cast(dict[str, Any], orjson.loads(data))

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id


class WorkerPool:
    """``--workers N``: the SessionRouter of the main process (see the module docstring)."""

    def __init__(
        self,
        *,
        workers: int,
        config: MediaConfig,
        certificate: DtlsCertificate,
        ledger: CapacityLedger,
        request_timeout: float = 5.0,
        stats_interval: float = 1.0,
        log_level: str = "info",
        extensions: Sequence[ExtensionFactory] = (),
    ) -> None:
        if workers < 2:
            raise ValueError("a worker pool has at least two workers")
        self.size = workers
        self.config = config
        self.ledger = ledger
        self.request_timeout = request_timeout
        self.stats_interval = stats_interval
        self.log_level = log_level
        self.extensions = tuple(extensions)  # run in every worker (workers/node.py)
        self.key_pem, self.cert_pem = certificate_pem(certificate)
        self.relay_dir = tempfile.mkdtemp(prefix="whepfan-")
        self.handles: dict[int, WorkerHandle] = {}
        self.ports: dict[int, int] = {}
        self.sessions: dict[str, ProxySession] = {}
        self._streams: dict[str, ProxyStream] = {}
        self._listeners = StreamListeners()
        self._meters: dict[tuple[str, str], RateMeter] = {}
        self._fanout_stats = PoolFanoutStats()
        self.on_sessions_lost: SessionLostHook | None = None
        # Events from workers, by name (control.py): the pool's own, and those beyond them,
        # which their owners register.
        self._own_event_handlers: dict[str, Callable[[WorkerHandle, dict[str, Any]], None]] = {
            control.READY: self._on_ready,
            control.STATS: self._on_stats,
            control.ENDED: self._on_ended,
            control.STREAM: self._on_stream_event,
        }
        self.event_handlers: dict[str, WorkerEventHandler] = {}
        self._feeds: dict[str, FeedLostHook] = {}  # feed publisher session id -> its owner
        self.restarts = 0
        self.lower_layer_admissions = 0
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._context = multiprocessing.get_context("spawn")
        self._restart_tasks: set[asyncio.Task[None]] = set()

    # lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.gather(*(self._spawn(index) for index in range(self.size)))

    async def _spawn(self, index: int) -> None:
        port = self.config.udp_port + index if self.config.udp_port else 0
        spec = WorkerSpec(
            index=index,
            config=replace(self.config, udp_port=port),
            key_pem=self.key_pem,
            cert_pem=self.cert_pem,
            relay_dir=self.relay_dir,
            workers=self.size,
            stats_interval=self.stats_interval,
            log_level=self.log_level,
            extensions=self.extensions,
        )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        process = self._context.Process(
            target=worker_process_main,
            args=(spec, theirs),
            name=f"whepfan-worker-{index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        handle = WorkerHandle(index=index, process=process, control=ours)
        self.handles[index] = handle
        self._loop.add_reader(ours.fileno(), self._on_readable, handle)
        self._loop.add_reader(process.sentinel, self._on_exit, handle)
        try:
            ready = await asyncio.wait_for(asyncio.shield(handle.ready), timeout=60.0)
        except (TimeoutError, WorkerGone):
            log.error("worker %d did not start", index)
            process.kill()
            raise
        self.ports[index] = int(ready["port"])
        self.ledger.add_worker(index)
        # Streams published elsewhere get a relay copy on the (new) worker.
        for stream in self._streams.values():
            if stream.live and stream.origin != index and stream.canonical_offer is not None:
                self._notify(
                    handle,
                    control.ATTACH_RELAY,
                    {
                        "stream": stream.name,
                        "offer": stream.canonical_offer,
                        "origin": stream.origin,
                    },
                )
        log.info("worker %d (pid %d) on udp port %d", index, process.pid, self.ports[index])

    async def close(self, timeout: float = 5.0) -> None:
        self._closing = True
        for task in self._restart_tasks:
            task.cancel()
        for handle in self.handles.values():
            if handle.alive:
                with contextlib.suppress(WorkerGone, ServiceUnavailable):
                    handle.send(control.request(control.SHUTDOWN, {}))
        deadline = self._loop.time() + timeout
        for handle in self.handles.values():
            while handle.process.is_alive() and self._loop.time() < deadline:
                await asyncio.sleep(0.02)
            if handle.process.is_alive():
                handle.process.kill()
            self._forget(handle)
        shutil.rmtree(self.relay_dir, ignore_errors=True)

    def _forget(self, handle: WorkerHandle) -> None:
        handle.alive = False
        replies, handle.replies = handle.replies, {}
        for reply in replies.values():
            if not reply.done():
                reply.set_exception(WorkerGone())
        for fd in (handle.control.fileno(), handle.process.sentinel):
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(fd)
        handle.control.close()

    def kill_worker(self, index: int) -> int:
        """Kill worker ``index`` (tests and operators); returns its pid."""
        process = self.handles[index].process
        process.kill()
        return int(process.pid)

    def _on_exit(self, handle: WorkerHandle) -> None:
        if not handle.alive:
            return
        self._forget(handle)
        if self._closing:
            return
        if not handle.ready.done() or handle.ready.exception() is not None:
            # It died starting: whoever awaits it hears so (no respawn loop on a bug).
            if not handle.ready.done():
                handle.ready.set_exception(WorkerGone())
            return
        handle.process.join(0)
        log.error(
            "worker %d (pid %d) exited with %s",
            handle.index,
            handle.process.pid,
            handle.process.exitcode,
        )
        self._worker_lost(handle.index, f"media worker {handle.index} exited")
        self.restarts += 1
        task = asyncio.ensure_future(self._respawn(handle.index))
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)

    async def _respawn(self, index: int) -> None:
        try:
            await self._spawn(index)
        except Exception:
            log.exception("worker %d could not be replaced", index)

    def _worker_lost(self, index: int, reason: str) -> None:
        self.ledger.remove_worker(index)
        lost = [sid for sid, session in self.sessions.items() if session.worker == index]
        if lost and self.on_sessions_lost is not None:
            # Before unregistering: the event hub must hear of them while they are known.
            self.on_sessions_lost(lost)
        for session_id in lost:
            self._unregister(session_id, reason)
        for stream in list(self._streams.values()):
            stream.reported_viewers.pop(index, None)
            if stream.origin == index:
                stream.origin = None
                stream.canonical_offer = None
                stream.reported_tracks = {}

    # channel ------------------------------------------------------------------------------

    def _on_readable(self, handle: WorkerHandle) -> None:
        while handle.alive:
            try:
                message = handle.receive()
            except WorkerGone:
                self._on_exit(handle)
                return
            if message is None:
                return
            self._on_message(handle, message)

    def _on_message(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event is None:
            # A reply; those outside a request (one that timed out) are dropped here.
            request_id = message.get("id")
            reply = handle.replies.pop(request_id) if request_id in handle.replies else None
            if reply is not None and not reply.done():
                reply.set_result(message)
        elif (own := self._own_event_handlers.get(str(event))) is not None:
            own(handle, message)
        elif (handler := self.event_handlers.get(str(event))) is not None:
            handler(handle.index, message)

    def _on_ready(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        if not handle.ready.done():
            handle.ready.set_result(message)

    def _on_ended(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        for session_id, _, _ in message.get("sessions", []):
            session = self.sessions.get(session_id)
            if session is not None and session.worker == handle.index:
                self._unregister(session_id)

    def _on_stream_event(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        stream = self._streams.get(message["stream"])
        if stream is not None and stream.origin == handle.index:
            type_ = str(message["type"])
            if type_ in ("active", "inactive"):
                stream.active = type_ == "active"
            self._emit(stream.name, type_, message.get("data") or {})

    def _on_stats(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        try:
            stats = WorkerStats.from_json(message["stats"])
        except (KeyError, ValueError):
            log.error("unreadable stats from worker %d", handle.index)
            return
        handle.stats = stats
        self.ledger.set_behind(handle.index, stats.behind)
        for session_id in message.get("connected", []):
            session = self.sessions.get(session_id)
            if session is not None and session.worker == handle.index:
                session.keyed = True
                self.ledger.connected(session_id)  # pending -> connected
        now = self._loop.time()
        self._fanout_stats.update(handle.index, stats.pid, stats.fanout)
        reported = message.get("status", {})
        for name, proxy in self._streams.items():
            entry = reported.get(name)
            if entry is not None:
                proxy.report(handle.index, entry, now)
            else:
                proxy.reported_viewers.pop(handle.index, None)  # none left there
        for name, counters in message.get("streams", {}).items():
            stream = self._streams.get(name)
            if stream is None or stream.origin != handle.index:
                continue
            rows = [(str(k), str(kind), int(p), int(o)) for k, kind, p, o in counters]
            layers = stream_layers(self._meters, name, rows, now)
            if layers:
                self.ledger.set_stream_layers(name, layers)

    def _request(self, index: int, op: str, args: dict[str, Any]) -> Any:
        handle = self.handles.get(index)
        if handle is None or not handle.alive:
            raise ServiceUnavailable("that media worker is restarting", retry_after=2)
        request_id = handle.new_id()
        try:
            handle.send(control.request(op, args, request_id))
            deadline = self._loop.time() + self.request_timeout
            while True:
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    raise ServiceUnavailable("media worker did not answer", retry_after=5)
                readable, _, _ = select.select([handle.control], [], [], remaining)
                if not readable:
                    continue
                message = handle.receive()
                while message is not None:
                    if message.get("id") == request_id:
                        return control.result_of(message)
                    self._on_message(handle, message)
                    message = handle.receive()
        except WorkerGone:
            self._on_exit(handle)
            raise ServiceUnavailable("the media worker stopped", retry_after=2) from None

    async def request_async(
        self, index: int, op: str, args: dict[str, Any], *, timeout: float
    ) -> Any:
        """A request whose handler answers later (control.py): awaited, so the HTTP loop
        serves on meanwhile. Raises what the worker raised, or ServiceUnavailable when
        the worker is gone, exits meanwhile or does not answer within ``timeout``."""
        handle = self.handles.get(index)
        if handle is None or not handle.alive:
            raise ServiceUnavailable("that media worker is restarting", retry_after=2)
        request_id = handle.new_id()
        reply: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        handle.replies[request_id] = reply
        try:
            handle.send(control.request(op, args, request_id))
            async with asyncio.timeout(timeout):
                message = await reply
        except WorkerGone:
            self._on_exit(handle)
            raise ServiceUnavailable("the media worker stopped", retry_after=2) from None
        except TimeoutError:
            raise ServiceUnavailable("media worker did not answer", retry_after=5) from None
        finally:
            handle.replies.pop(request_id, None)
        return control.result_of(message)

    def notify(self, index: int, op: str, args: dict[str, Any]) -> bool:
        """A notification to worker ``index``; False when it is not there to hear it."""
        handle = self.handles.get(index)
        if handle is None or not handle.alive:
            return False
        self._notify(handle, op, args)
        return True

    def _notify(self, handle: WorkerHandle, op: str, args: dict[str, Any]) -> None:
        try:
            handle.send(control.request(op, args))
        except (WorkerGone, ServiceUnavailable):
            log.warning("worker %d missed %s", handle.index, op)

    def _notify_others(self, origin: int | None, op: str, args: dict[str, Any]) -> None:
        for index, handle in self.handles.items():
            if index != origin and handle.alive:
                self._notify(handle, op, args)

    # registry ------------------------------------------------------------------------------

    def _register(self, worker: int, data: dict[str, Any]) -> ProxySession:
        session = ProxySession(
            id=data["id"],
            kind=SessionKind(data["kind"]),
            stream=data["stream"],
            etag=data["etag"],
            ice=ProxyIce(data["remote_ufrag"]),
            worker=worker,
        )
        self.sessions[session.id] = session
        stream = self._streams.setdefault(session.stream, ProxyStream(name=session.stream))
        if session.kind is SessionKind.VIEWER:
            stream.viewers[session.id] = session
            self._emit_viewer_count(stream)
        return session

    def _unregister(self, session_id: str, reason: str = "ended") -> None:
        session = self.sessions.pop(session_id, None)
        feed_lost = self._feeds.pop(session_id, None)
        if feed_lost is not None:
            # After the registry forgot it: its owner may pull again at once.
            self._loop.call_soon(feed_lost, reason)
        if session is None:
            return
        self.ledger.release(session_id)
        stream = self._streams.get(session.stream)
        if stream is None:
            return
        if session.kind is SessionKind.VIEWER:
            if stream.viewers.pop(session_id, None) is not None:
                self._emit_viewer_count(stream)
        elif stream.publisher is session:
            stream.publisher = None
            if stream.active:
                stream.active = False
                self._emit(stream.name, "inactive", {})
            self._notify_others(stream.origin, control.DETACH_RELAY, {"stream": stream.name})
        if not stream.live and not stream.viewers:
            del self._streams[stream.name]

    # SessionRouter ----------------------------------------------------------------------------

    @property
    def streams(self) -> Mapping[str, ProxyStream]:
        return self._streams

    @property
    def viewer_count(self) -> int:
        return sum(len(stream.viewers) for stream in self._streams.values())

    def publish(self, stream_name: str, offer_text: str, now: float) -> tuple[ProxySession, str]:
        if self.ledger.draining:
            self.ledger.reserve(stream_name)  # raises: counted as a draining refusal
        origin = self.choose_origin(stream_name)
        result = self._request(
            origin, control.PUBLISH, {"stream": stream_name, "offer": offer_text}
        )
        session = self._register(origin, result["session"])
        self._became_origin(origin, session, str(result["canonical_offer"]))
        return session, str(result["answer"])

    def choose_origin(self, stream_name: str) -> int:
        """The worker a publisher of ``stream_name`` goes to (a WHIP publisher or a feed).

        A returning publisher goes back to its previous worker (viewers there see one
        continuous sequence line). If that worker died, to the one holding most of the
        stream's viewers: its relay copy becomes the stream (RelayCopies.publish) and
        ingest's rebase continues their lines. A new one: the least loaded."""
        stream = self._streams.get(stream_name)
        origin = stream.origin if stream is not None else None
        if origin is not None and self.handles[origin].alive:
            return origin
        waiting = Counter(v.worker for v in stream.viewers.values()) if stream else Counter()
        origin = min(
            (i for i, h in self.handles.items() if h.serving),
            key=lambda i: (-waiting[i], self.ledger.load(i).packets_per_second, i),
            default=None,
        )
        if origin is None:
            raise ServiceUnavailable("no media worker is running", retry_after=2)
        return origin

    def _became_origin(self, origin: int, session: ProxySession, canonical_offer: str) -> None:
        stream = self._streams[session.stream]
        stream.publisher, stream.origin = session, origin
        stream.canonical_offer = canonical_offer
        self._notify_others(
            origin,
            control.ATTACH_RELAY,
            {"stream": stream.name, "offer": canonical_offer, "origin": origin},
        )

    def attach_feed(
        self,
        worker: int,
        session_data: dict[str, Any],
        canonical_offer: str,
        on_lost: FeedLostHook,
    ) -> ProxySession:
        """A publisher the main process drives (see the module docstring) became its
        stream's origin on ``worker``: registered as a WHIP publisher is. ``on_lost(why)``
        runs soon after it goes other than by ``detach_feed`` (its worker exited)."""
        stream = self._streams.get(str(session_data["stream"]))
        if stream is not None and stream.publisher is not None:
            raise errors.Conflict(f"stream {stream.name!r} already has a publisher")
        session = self._register(worker, session_data)
        self._became_origin(worker, session, canonical_offer)
        self._feeds[session.id] = on_lost
        return session

    def update_feed(self, session_id: str, canonical_offer: str) -> None:
        """The feed's tracks changed (an upstream pull's simulcast layers): the other
        workers' relay copies are made again from its new description, as when a
        publisher returns with other layers (their tracks are kept by position)."""
        session = self.sessions.get(session_id)
        stream = self._streams.get(session.stream) if session is not None else None
        if session is None or stream is None or stream.publisher is not session:
            return
        if stream.canonical_offer != canonical_offer:
            self._became_origin(session.worker, session, canonical_offer)

    def detach_feed(self, session_id: str) -> None:
        """The feed's owner ended it: viewers stay, waiting, as when a publisher leaves."""
        self._feeds.pop(session_id, None)
        self._unregister(session_id)

    def view(self, stream_name: str, offer_text: str, now: float) -> tuple[ProxySession, str]:
        return self._admit(
            stream_name, control.VIEW, {"stream": stream_name, "offer": offer_text}, now
        )

    def counter_offer(self, stream_name: str, now: float) -> tuple[ProxySession, str]:
        return self._admit(stream_name, control.COUNTER_OFFER, {"stream": stream_name}, now)

    def _admit(
        self, stream_name: str, op: str, args: dict[str, Any], now: float
    ) -> tuple[ProxySession, str]:
        stream = self._streams.get(stream_name)
        if stream is None or not stream.live:
            # WHEP draft-03 §4.2.8: 409 + Retry-After when the stream is not live.
            raise errors.Conflict(f"stream {stream_name!r} is not live", retry_after=5)
        # The ledger holds max_viewers and the pending cap (capacity.py) with the budgets.
        admission: Admission = self.ledger.reserve(stream_name, now=now)
        if self.viewer_count >= self.config.max_viewers:  # a ledger without max_viewers
            raise ServiceUnavailable("no viewer capacity left on this server", retry_after=10)
        result = self._request(admission.worker, op, args)
        session = self._register(admission.worker, result["session"])
        self.ledger.commit(session.id, stream_name, admission, now)
        if admission.layer > 0:
            # As in-process: the worker applies capacity.LayerCeilings to its own layers.
            ceiling = self._request(
                session.worker,
                control.CAP_LAYER,
                {"session": session.id, "from_top": admission.layer},
            )
            if ceiling is not None:
                self.lower_layer_admissions += 1
        return session, str(result["answer"])

    def accept_counter_answer(self, session_id: str, answer_text: str, now: float) -> None:
        session = self.get_session(session_id)
        result = self._session_request(
            session, control.ACCEPT_COUNTER_ANSWER, {"session": session_id, "answer": answer_text}
        )
        session.update(result["session"])

    def trickle(self, session_id: str, fragment: sdp.SdpFragment, now: float) -> None:
        session = self.get_session(session_id)
        result = self._session_request(
            session,
            control.TRICKLE,
            {"session": session_id, "fragment": control.fragment_json(fragment)},
        )
        session.update(result["session"])

    def restart_ice(self, session_id: str, fragment: sdp.SdpFragment, now: float) -> str:
        session = self.get_session(session_id)
        result = self._session_request(
            session,
            control.RESTART_ICE,
            {"session": session_id, "fragment": control.fragment_json(fragment)},
        )
        session.update(result["session"])
        return str(result["answer"])

    def end_session(self, session_id: str, now: float, reason: str = "deleted") -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        try:
            ended = self._request(
                session.worker, control.END_SESSION, {"session": session_id, "reason": reason}
            )["ended"]
        except (NotFound, ServiceUnavailable):
            ended = False
        self._unregister(session_id)
        return bool(ended)

    # layer API (EXT §5, http/layers.py) -------------------------------------------------

    def select_layer(self, session_id: str, request: LayerRequest, now: float) -> dict[str, object]:
        """The viewer's worker decides (its router holds the layers and the choice);
        its NotFound/PeerError come back as themselves, so HTTP answers as in-process."""
        session = self.get_session(session_id)
        # Not _session_request: a NotFound here may mean "receives no video" of a session
        # that lives on; one that ended is unregistered by the worker's "ended" report.
        args = {"session": session_id, "request": control.layer_request_json(request)}
        return cast(dict[str, object], self._request(session.worker, control.SELECT_LAYER, args))

    def layer_status(self, session_id: str, now: float) -> dict[str, object]:
        session = self.get_session(session_id)
        result = self._request(session.worker, control.LAYER_STATUS, {"session": session_id})
        return cast(dict[str, object], result)

    @property
    def fanout(self) -> PoolFanoutStats:
        """Every worker's Fanout counters added up (the status API's egress bitrate)."""
        return self._fanout_stats

    def get_session(self, session_id: str) -> ProxySession:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound("no such session")
        return session

    def session_pending(self, session_id: str) -> bool:
        """Answered and not reported keyed by its worker yet (http/pending.py); workers
        report with their once-a-second stats, so a session may count that long more."""
        session = self.sessions.get(session_id)
        return session is not None and not session.keyed

    def _session_request(self, session: ProxySession, op: str, args: dict[str, Any]) -> Any:
        try:
            return self._request(session.worker, op, args)
        except NotFound:
            self._unregister(session.id)  # it ended on the worker before we heard
            raise

    # events ---------------------------------------------------------------------------------

    def add_listener(self, listener: StreamListener) -> None:
        self._listeners.add(listener)

    def remove_listener(self, listener: StreamListener) -> None:
        self._listeners.remove(listener)

    def _emit(self, stream: str, type_: str, data: dict[str, object]) -> None:
        self._listeners.emit(stream, type_, data)

    def _emit_viewer_count(self, stream: ProxyStream) -> None:
        self._emit(stream.name, "viewercount", {"viewercount": len(stream.viewers)})

    # load and stats ----------------------------------------------------------------------------

    def tick(self, now: float | None) -> None:
        """Nothing to poll: workers push stats and ended sessions."""

    def begin_drain(self) -> None:
        self.ledger.draining = True

    def stats(self) -> ServerStats:
        workers = [
            handle.stats
            for handle in self.handles.values()
            if handle.alive and handle.stats is not None
        ]
        return server_stats(self.ledger, workers, restarts=self.restarts)

    def worker_of(self, session_id: str) -> int:
        return self.get_session(session_id).worker
