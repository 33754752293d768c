"""A worker process: its MediaWorker, control channel, relay socket and stats.

Started by the pool (pool.py) with a pickled ``WorkerSpec``, a worker process runs one
``MediaWorker`` (media/transport.py) on UDP port base+index, answers the control
channel's requests through a table of handlers (control.py), relays the streams it
originates to the other workers and mirrors theirs (media/relay.py, relay_peer.py), and
reports stats, ended sessions and stream events once a second or as they happen.

A layer above ``workers/`` runs code here through *extensions* (``WorkerSpec.extensions``:
module-level factories, pickled by reference, run at start): each adds control
operations and a report per stats interval, as cluster/worker_upstreams.py does for the
upstream pulls of an edge, without ``workers/`` importing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from whepfan.config import MediaConfig
from whepfan.errors import ParseError, WhepfanError
from whepfan.media.health import warn_when_behind
from whepfan.media.relay import RelayCopies, RelayFrame, RelayKind
from whepfan.media.router import Router
from whepfan.media.streams import StreamEvent
from whepfan.media.transport import MediaWorker
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.workers import control
from whepfan.workers.capacity import LayerCeilings
from whepfan.workers.relay_peer import RelayPeer, relay_path
from whepfan.workers.stats import RouterMonitor

log = logging.getLogger("whepfan.workers")


class WorkerExtension(Protocol):
    """Code a layer above ``workers/`` runs in each worker process (see the docstring)."""

    def handlers(self) -> dict[str, control.Handler]:
        """Its control operations (names from control.py)."""
        ...

    def report(self) -> dict[str, Any] | None:
        """An event for the main process once per stats interval, or None."""
        ...

    async def aclose(self) -> None: ...


ExtensionFactory = Callable[["WorkerNode"], WorkerExtension]


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpec:
    """Everything a worker process starts from (pickled once at spawn)."""

    index: int
    config: MediaConfig
    key_pem: bytes
    cert_pem: bytes
    relay_dir: str
    workers: int
    stats_interval: float = 1.0
    log_level: str = "info"
    extensions: tuple[ExtensionFactory, ...] = ()


def certificate_pem(certificate: DtlsCertificate) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization

    key = certificate.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key, certificate.certificate.public_bytes(serialization.Encoding.PEM)


def _certificate_from_pem(key_pem: bytes, cert_pem: bytes) -> DtlsCertificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_pem, password=None)
    return DtlsCertificate(
        private_key=key,  # type: ignore[arg-type]
        certificate=x509.load_pem_x509_certificate(cert_pem),
    )


def worker_process_main(spec: WorkerSpec, control_socket: socket.socket) -> None:
    """Entry point of a worker process (multiprocessing spawn target)."""
    logging.basicConfig(
        level=spec.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker{spec.index} %(name)s: %(message)s",
    )
    # Ctrl-C reaches the whole process group; the main process decides how workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import uvloop

    uvloop.run(_run_worker(spec, control_socket))


async def _run_worker(spec: WorkerSpec, control_socket: socket.socket) -> None:
    node = WorkerNode(
        spec=spec,
        certificate=_certificate_from_pem(spec.key_pem, spec.cert_pem),
        control_socket=control_socket,
    )
    await node.media.start()
    await node.run()


class WorkerNode:
    """The worker process around its MediaWorker: control channel, relay socket, stats."""

    def __init__(
        self,
        *,
        spec: WorkerSpec,
        certificate: DtlsCertificate,
        control_socket: socket.socket,
    ) -> None:
        self.spec = spec
        self.control = control_socket
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self.relay = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = relay_path(spec.relay_dir, spec.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.relay.bind(path)
        self.relay.setblocking(False)
        self.media = MediaWorker(config=spec.config, certificate=certificate)
        self.router: Router = self.media.router
        # Bursts wait on the sender's side (RelayPeer): an AF_UNIX datagram queue is
        # bounded by net.unix.max_dgram_qlen datagrams, whatever SO_RCVBUF says.
        self._peers: dict[int, RelayPeer] = {
            index: RelayPeer(
                path=relay_path(spec.relay_dir, index),
                loop=self._loop,
                counters=self.router.counters,
            )
            for index in range(spec.workers)
            if index != spec.index
        }
        self.relays = RelayCopies(
            self.router,
            send_frame=self._relay_out,
            forward_keyframe_request=self._send_keyframe_request,
        )
        # Viewers admitted on a lower layer (the main process's CAP_LAYER): held here
        # because only this worker knows the stream's layers.
        self.layer_ceilings = LayerCeilings()
        self.monitor = RouterMonitor(self.router, worker=spec.index)
        self.monitor.receive_delay = self.media.receive_delay
        self.router.add_listener(self._on_stream_event)
        self._sweep_pending = False
        self._answering: set[asyncio.Task[None]] = set()  # handlers that answer later
        self._handlers: dict[str, control.Handler] = {
            control.PUBLISH: self._publish,
            control.VIEW: self._view,
            control.COUNTER_OFFER: self._counter_offer,
            control.ACCEPT_COUNTER_ANSWER: self._accept_counter_answer,
            control.TRICKLE: self._trickle,
            control.RESTART_ICE: self._restart_ice,
            control.END_SESSION: self._end_session,
            control.SELECT_LAYER: self._select_layer,
            control.CAP_LAYER: self._cap_layer,
            control.LAYER_STATUS: self._layer_status,
            control.ATTACH_RELAY: self._attach_relay,
            control.DETACH_RELAY: self._detach_relay,
            control.SHUTDOWN: self._shutdown,
        }
        self.extensions = [install(self) for install in spec.extensions]
        for extension in self.extensions:
            self._handlers.update(extension.handlers())

    async def run(self) -> None:
        self.control.setblocking(False)
        self._loop.add_reader(self.control.fileno(), self._on_control)
        self._loop.add_reader(self.relay.fileno(), self._on_relay)
        self._send({"event": control.READY, "port": self.media.port, "pid": os.getpid()})
        stats_task = asyncio.ensure_future(self._stats_loop())
        lag_task = asyncio.ensure_future(
            warn_when_behind(self.monitor.receive_delay, worker=self.spec.index)
        )
        try:
            await self._done.wait()
        finally:
            stats_task.cancel()
            lag_task.cancel()
            for task in self._answering:
                task.cancel()
            for extension in self.extensions:
                await extension.aclose()
            self._loop.remove_reader(self.control.fileno())
            self._loop.remove_reader(self.relay.fileno())
            self.media.close()
            self.relay.close()
            for peer in self._peers.values():
                peer.close()

    # control channel ---------------------------------------------------------------------

    def send_event(self, event: dict[str, Any]) -> None:
        """An event to the main process (``{"event": NAME, ...}``, control.py)."""
        self._send(event)

    def _send(self, message: dict[str, Any]) -> None:
        data = orjson.dumps(message)
        try:
            self.control.send(data)
        except BlockingIOError:
            # The main process reads continuously; a full buffer means it is stuck.
            self.control.setblocking(True)
            try:
                self.control.send(data)
            finally:
                self.control.setblocking(False)
        except OSError:
            self._done.set()  # the main process is gone

    def _on_control(self) -> None:
        while True:
            try:
                data = self.control.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._done.set()  # main process gone: nobody to serve
                return
            try:
                message = orjson.loads(data)
            except orjson.JSONDecodeError:
                log.error("unreadable control message dropped")
                continue
            self._handle(message)
            self.media.arm_timer()

    def _handle(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        try:
            result = control.dispatch(self._handlers, message, self._loop.time())
        except Exception as exc:
            reply = self._failure_reply(message, exc)
        else:
            if inspect.isawaitable(result):
                # Answered when it resolves (control.py); the worker serves on meanwhile.
                task = asyncio.ensure_future(self._answer_later(message, result))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)
                return
            reply = {"id": request_id, "result": result}
        if request_id is not None:
            self._send(reply)

    async def _answer_later(self, message: dict[str, Any], pending: Any) -> None:
        try:
            reply = {"id": message.get("id"), "result": await pending}
        except Exception as exc:
            reply = self._failure_reply(message, exc)
        self.media.arm_timer()  # the operation may have scheduled router timers
        if message.get("id") is not None:
            self._send(reply)

    @staticmethod
    def _failure_reply(message: dict[str, Any], exc: Exception) -> dict[str, Any]:
        if isinstance(exc, WhepfanError):
            return control.error_reply(message.get("id"), exc)
        log.error("control operation %r failed", message.get("op"), exc_info=exc)
        return {"id": message.get("id"), "error": {"class": "internal", "detail": "worker bug"}}

    # control operations (control.py names them) ------------------------------------------

    def _publish(self, args: dict[str, Any], now: float) -> Any:
        publisher, answer = self.relays.publish(args["stream"], args["offer"], now)
        return {
            "session": control.session_json(publisher),
            "answer": answer,
            "canonical_offer": self.relays.canonical_offers.get(args["stream"], args["offer"]),
        }

    def _view(self, args: dict[str, Any], now: float) -> Any:
        viewer, answer = self.router.view(args["stream"], args["offer"], now)
        return {"session": control.session_json(viewer), "answer": answer}

    def _counter_offer(self, args: dict[str, Any], now: float) -> Any:
        viewer, offer = self.router.counter_offer(args["stream"], now)
        return {"session": control.session_json(viewer), "answer": offer}

    def _accept_counter_answer(self, args: dict[str, Any], now: float) -> Any:
        self.router.accept_counter_answer(args["session"], args["answer"], now)
        return {"session": control.session_json(self.router.get_session(args["session"]))}

    def _trickle(self, args: dict[str, Any], now: float) -> Any:
        fragment = control.fragment_from_json(args["fragment"])
        self.router.trickle(args["session"], fragment, now)
        return {"session": control.session_json(self.router.get_session(args["session"]))}

    def _restart_ice(self, args: dict[str, Any], now: float) -> Any:
        fragment = control.fragment_from_json(args["fragment"])
        answer = self.router.restart_ice(args["session"], fragment, now)
        session = self.router.get_session(args["session"])
        return {"session": control.session_json(session), "answer": answer}

    def _end_session(self, args: dict[str, Any], now: float) -> Any:
        self.layer_ceilings.forget(args["session"])
        return {"ended": self.router.end_session(args["session"], now, args["reason"])}

    def _select_layer(self, args: dict[str, Any], now: float) -> Any:
        request = control.layer_request_from_json(args["request"])
        session = self.router.get_session(args["session"])
        request = self.layer_ceilings.held(
            session.id, request, self.router.streams.get(session.stream)
        )
        return self.router.select_layer(session.id, request, now)

    def _cap_layer(self, args: dict[str, Any], now: float) -> Any:
        """The viewer was admitted ``from_top`` layers below the top (the one rule of
        capacity.LayerCeilings, as in-process). Returns the ceiling, or None."""
        session = self.router.get_session(args["session"])
        stream = self.router.streams.get(session.stream)
        if stream is None:
            return None
        return self.layer_ceilings.cap(self.router, session.id, stream, int(args["from_top"]), now)

    def _layer_status(self, args: dict[str, Any], now: float) -> Any:
        return self.router.layer_status(args["session"], now)

    def _attach_relay(self, args: dict[str, Any], now: float) -> Any:
        self.relays.attach_relay(args["stream"], args["offer"], args["origin"], now)
        return None

    def _detach_relay(self, args: dict[str, Any], now: float) -> Any:
        self.relays.detach_relay(args["stream"], now)
        return None

    def _shutdown(self, args: dict[str, Any], now: float) -> Any:
        self._done.set()
        return None

    # stats and ended sessions --------------------------------------------------------------

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.spec.stats_interval)
            self._sweep()
            self._send(
                {
                    "event": control.STATS,
                    "stats": self.monitor.stats().to_json(),
                    "streams": self.relays.origin_stream_counters(),
                    "status": self.relays.stream_status(self._loop.time()),
                    # Keyed since the last report: no longer pending for admission.
                    "connected": self.monitor.take_connected(),
                }
            )
            for extension in self.extensions:
                report = extension.report()
                if report is not None:
                    self._send(report)

    def _sweep(self) -> None:
        self._sweep_pending = False
        ended = self.monitor.sample()
        for session_id, _, _ in ended:
            self.layer_ceilings.forget(session_id)
        if ended:
            self._send({"event": control.ENDED, "sessions": ended})

    def _on_stream_event(self, event: StreamEvent) -> None:
        if (
            event.type in ("active", "inactive", "layers")
            and event.stream not in self.relays.relayed
        ):
            # "layers" (EXT §4.3.3) only from the origin: it measures the publisher's
            # encodings; relay copies measure the same packets again.
            self._send(
                {
                    "event": control.STREAM,
                    "stream": event.stream,
                    "type": event.type,
                    "data": event.data,
                }
            )
        # Every viewer leave emits viewercount: settle ended sessions soon, once per batch.
        if not self._sweep_pending:
            self._sweep_pending = True
            self._loop.call_soon(self._sweep)

    # relay ----------------------------------------------------------------------------------

    def _relay_out(self, frame: bytes) -> None:
        for peer in self._peers.values():
            peer.send(frame)

    def _send_keyframe_request(self, origin: int, stream: str) -> None:
        peer = self._peers.get(origin)
        if peer is not None:
            peer.send(bytes(RelayFrame(kind=RelayKind.KEYFRAME_REQUEST, stream=stream)))

    def _on_relay(self) -> None:
        now = self._loop.time()
        if self.media.gso:
            self.router.begin_burst()  # what the relay delivered together (media/burst.py)
        for _ in range(256):  # bounded, so control messages interleave under load
            try:
                data = self.relay.recv(65536)
            except BlockingIOError:
                break
            try:
                frame = RelayFrame.parse(data)
            except ParseError:
                self.router.counters["drop_relay_malformed"] += 1
                continue
            if frame.kind is RelayKind.KEYFRAME_REQUEST:
                self.relays.relayed_keyframe_request(frame.stream, now)
            else:
                self.relays.relayed_packet(frame, now)
        self.router.end_burst()
        self.media.arm_timer()
