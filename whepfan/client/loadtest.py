"""``whepfan loadtest``: N real WHEP viewers against one endpoint, measured one by one.

Each viewer is a real WebRTC session: its own UDP socket, an HTTP POST with a recvonly
offer, full ICE as the controlling agent (so full-ICE servers work as well as ICE-lite
ones), a DTLS handshake in the role the answer gives, and SRTP. The media path never
reaches Python: every socket belongs to the compiled ``Receiver``, which counts and (all
or a sample of) decrypts RTP and hands back only STUN and DTLS. While a viewer sets up,
its socket is watched (epoll: every datagram wakes us, so join latencies are exact); once
connected it is polled every ``poll_interval`` seconds instead, so that the server under
test does not pay for waking the load generator on every datagram it sends, a cost of
loopback that no real viewer imposes (see ``_receiver.pxi``). Arrival times are the
kernel's receive timestamps either way.

Per viewer the run records the server's answer (201/409/503/...), the latencies POST ->
201, -> ICE connected, -> DTLS done, -> first RTP, -> first keyframe, and the receive
counters (packets, bytes, sequence-gap loss, duplicates, jitter, decrypt failures).
Viewers that fail are reported with the reason, never dropped from the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from whepfan import _fastpath
from whepfan.client.peer import (
    ClientTransport,
    IceSelected,
    LocalParameters,
    TransportConnected,
    TransportFailed,
    host_candidate,
    new_ice_credentials,
    viewer_offer,
)
from whepfan.client.report import LoadTestReport, Sample, render_html, render_text, summarize
from whepfan.client.signalling import delete_session, local_address_towards, post_offer
from whepfan.errors import ParseError, WhepfanError
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.protocol.negotiation import remote_transport
from whepfan.protocol.sdp import SessionDescription

log = logging.getLogger("whepfan.loadtest")

EXIT_SOME_VIEWERS_FAILED = 3
SAMPLE_INTERVAL = 1.0
DEFAULT_POLL_INTERVAL = 0.010
# A socket holds about SOCKET_BUFFER_BYTES between sweeps: at 1.5 Mbit/s, 10 ms is
# ~2 KB, a 720p keyframe burst ~60 KB. Longer intervals would need bigger buffers.
MAX_POLL_INTERVAL = 0.1
SOCKET_BUFFER_BYTES = 1 << 20
_VIDEO_KINDS = {"vp8": "vp8", "h264": "h264"}


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadTestOptions:
    url: str  # the WHEP endpoint
    viewers: int
    ramp: float = 50.0  # viewers started per second
    duration: float = 10.0  # seconds every viewer stays after the last one started
    token: str | None = None
    verify_every: int = 1
    setup_timeout: float = 10.0
    # Seconds between sweeps of connected viewers' sockets; 0 keeps every socket watched
    # (each datagram wakes the load generator, and the server pays for the wake-up).
    poll_interval: float = DEFAULT_POLL_INTERVAL
    audio: bool = True
    video: bool = True

    def __post_init__(self) -> None:
        if self.viewers < 1:
            raise ValueError("--viewers must be at least 1")
        if self.ramp <= 0 or self.duration <= 0 or self.setup_timeout <= 0:
            raise ValueError("ramp, duration and setup timeout must be positive")
        if not 0 <= self.poll_interval <= MAX_POLL_INTERVAL:
            raise ValueError(f"--poll-ms must be 0..{MAX_POLL_INTERVAL * 1000:g}")
        if self.verify_every < 1:
            raise ValueError("--verify-every must be at least 1")
        if not self.audio and not self.video:
            raise ValueError("viewers need audio or video")


@dataclass
class ViewerResult:
    """One viewer's record; times in seconds, latencies measured from its POST."""

    index: int
    outcome: str = "pending"  # connected | rejected | failed
    status: int | None = None  # HTTP status of the POST
    error: str | None = None
    started_at: float = 0.0  # POST time, seconds since the test started
    answered: float | None = None  # POST -> 201
    ice_connected: float | None = None
    dtls_connected: float | None = None
    first_rtp: float | None = None
    first_keyframe: float | None = None
    receiving_seconds: float = 0.0
    bitrate: float = 0.0  # bits/s over the time it received
    counters: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Viewer:
    def __init__(self, test: LoadTest, index: int) -> None:
        self.test = test
        self.result = ViewerResult(index=index)
        self.socket: socket.socket | None = None
        self.slot: int | None = None
        self.transport: ClientTransport | None = None
        self.location: str | None = None
        self.posted_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.keyed: asyncio.Future[None] = test.loop.create_future()
        self.final_counters: dict[str, Any] | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        test = self.test
        options = test.options
        try:
            self.socket = socket.socket(test.family, socket.SOCK_DGRAM)
            self.socket.bind((test.local_host, 0))
            self.socket.setblocking(False)
            _enlarge_receive_buffer(self.socket)
            self.slot = test.receiver.add_viewer(self.socket.fileno())
            test.by_slot[self.slot] = self
            ufrag, pwd = new_ice_credentials()
            local = LocalParameters(
                ice_ufrag=ufrag,
                ice_pwd=pwd,
                fingerprints=test.certificate.fingerprints,
                candidate=host_candidate(test.local_host, self.socket.getsockname()[1]),
            )
            offer = viewer_offer(local, audio=options.audio, video=options.video)
            self.posted_at = time.monotonic()
            self.result.started_at = self.posted_at - test.started_at
            try:
                answer = await post_offer(test.http, options.url, offer, token=options.token)
            except (aiohttp.ClientError, OSError) as exc:
                self._fail(f"POST failed: {exc}")
                return
            self.result.status = answer.status
            if answer.status != 201 or answer.answer is None:
                self.result.outcome = "rejected"
                self.result.error = f"HTTP {answer.status}" + (
                    f" (Retry-After {answer.retry_after})" if answer.retry_after else ""
                )
                return
            self.result.answered = time.monotonic() - self.posted_at
            self.location = answer.location
            try:
                self._start_transport(answer.answer, ufrag, pwd)
            except (ParseError, WhepfanError, ValueError) as exc:
                self._fail(f"unusable answer: {exc}")
                return
            remaining = options.setup_timeout - (time.monotonic() - self.posted_at)
            try:
                await asyncio.wait_for(asyncio.shield(self.keyed), max(remaining, 0.01))
            except TimeoutError:
                self._fail(f"not connected within {options.setup_timeout:g} s")
                return
            except ConnectionError as exc:
                self._fail(str(exc))
                return
            self.result.outcome = "connected"
            await stop.wait()
        finally:
            await self._close()

    def _start_transport(self, answer_text: str, ufrag: str, pwd: str) -> None:
        answer = SessionDescription.parse(answer_text)
        remote = remote_transport(answer)
        receiver, slot = self.test.receiver, self.slot
        assert slot is not None
        for section in answer.media:
            if section.rejected:
                continue
            for codec in section.codecs:
                if not codec.has_rtpmap:
                    continue
                name = codec.name.lower()
                if section.kind == "audio":
                    kind = "audio"
                elif section.kind == "video" and name not in ("rtx", "red", "ulpfec"):
                    kind = _VIDEO_KINDS.get(name, "video")
                else:
                    continue
                receiver.set_payload_type(
                    slot, codec.payload_type, kind=kind, clock_rate=codec.clock_rate or 90000
                )
        self.transport = ClientTransport(
            certificate=self.test.certificate,
            local_ufrag=ufrag,
            local_pwd=pwd,
            remote=remote,
            # RFC 8842 §5.5 / RFC 4145 §4: an answer without a=setup is active.
            dtls_role="client" if remote.setup == "passive" else "server",
        )
        self.transport.start(self.test.loop.time())
        self._after_io()

    async def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()
            self._send_pending()
        if self.slot is not None:
            self.final_counters = self.test.receiver.viewer_stats(self.slot)
            self._finish_counters(self.final_counters)
            self.test.receiver.remove_viewer(self.slot)
            self.test.by_slot.pop(self.slot, None)
            self.slot = None
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        if self.location is not None:
            await delete_session(self.test.http, self.location, token=self.test.options.token)
            self.location = None
        if self.result.outcome == "pending":
            self.result.outcome = "failed"
            self.result.error = self.result.error or "cancelled"

    def _finish_counters(self, counters: dict[str, Any]) -> None:
        result = self.result
        result.counters = {key: value for key, value in counters.items() if not key.endswith("_at")}
        first, last = counters.get("first_rtp_at"), counters.get("last_rtp_at")
        if first is not None:
            result.first_rtp = first - self.posted_at
            if last is not None and last > first:
                result.receiving_seconds = last - first
                result.bitrate = counters["bytes"] * 8 / result.receiving_seconds
        keyframe = counters.get("first_keyframe_at")
        if keyframe is not None:
            result.first_keyframe = keyframe - self.posted_at

    def _fail(self, reason: str) -> None:
        if self.result.outcome in ("pending", "connected"):
            if self.result.outcome == "connected":
                reason = f"disconnected: {reason}"
            self.result.outcome = "failed"
            self.result.error = reason

    # -- I/O ---------------------------------------------------------------------------

    def receive(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.receive(data, addr, self.test.loop.time())
            self._after_io()

    def _send_pending(self) -> None:
        if self.transport is None or self.socket is None:
            return
        for datagram, address in self.transport.datagrams_to_send():
            try:
                self.socket.sendto(datagram, address[:2])
            except OSError as exc:  # ICMP unreachable from an earlier datagram, full buffer
                log.debug("viewer %d: send failed: %s", self.result.index, exc)

    def _after_io(self) -> None:
        transport = self.transport
        if transport is None:
            return
        self._send_pending()
        now = time.monotonic()
        while (event := transport.next_event()) is not None:
            if isinstance(event, IceSelected):
                self.result.ice_connected = now - self.posted_at
            elif isinstance(event, TransportConnected):
                self.result.dtls_connected = now - self.posted_at
                keys = event.keys
                assert self.slot is not None
                self.test.receiver.set_keys(
                    self.slot, profile=keys.profile, key=keys.remote_key, salt=keys.remote_salt
                )
                if self.test.options.poll_interval > 0:
                    self.test.receiver.set_polled(self.slot, True)
                if not self.keyed.done():
                    self.keyed.set_result(None)
            elif isinstance(event, TransportFailed):
                if not self.keyed.done():
                    self.keyed.set_exception(ConnectionError(event.reason))
                else:
                    self._fail(event.reason)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        deadline = transport.get_timer()
        if deadline is not None:
            self.timer = self.test.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.transport.handle_timer(self.test.loop.time())
            self._after_io()


class LoadTest:
    """One run: ``report = await LoadTest(options).run()``."""

    def __init__(
        self, options: LoadTestOptions, *, certificate: DtlsCertificate | None = None
    ) -> None:
        self.options = options
        self.certificate = certificate or DtlsCertificate.generate()
        self.loop = asyncio.get_running_loop()
        self.receiver = _fastpath.Receiver(
            max_viewers=options.viewers, verify_every=options.verify_every
        )
        self.local_host = local_address_towards(options.url)
        self.family = socket.AF_INET6 if ":" in self.local_host else socket.AF_INET
        self.by_slot: dict[int, _Viewer] = {}
        self.viewers: list[_Viewer] = []
        self.samples: list[Sample] = []
        self.started_at = 0.0
        self.cpu_at_start = 0.0
        self.http: aiohttp.ClientSession

    def _readable(self) -> None:
        self._dispatch(self.receiver.drain())

    def _dispatch(self, control: list[tuple[int, bytes, tuple[str, int]]]) -> None:
        for slot, data, addr in control:
            viewer = self.by_slot.get(slot)
            if viewer is not None:
                viewer.receive(data, addr)

    async def _poll_connected(self, interval: float) -> None:
        """Sweeps the polled sockets on a fixed cadence (a late sweep does not shift the
        ones after it, so a slow moment is caught up, not accumulated)."""
        due = self.loop.time()
        while True:
            due += interval
            delay = due - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                due = self.loop.time()
            self._dispatch(self.receiver.poll())

    def _sample(self) -> Sample:
        connected = failed = rejected = 0
        total_bytes = lost = expected = 0
        for viewer in self.viewers:
            outcome = viewer.result.outcome
            if outcome == "connected":
                connected += 1
            elif outcome == "failed":
                failed += 1
            elif outcome == "rejected":
                rejected += 1
            counters = (
                self.receiver.viewer_stats(viewer.slot)
                if viewer.slot is not None
                else viewer.final_counters or {}
            )
            total_bytes += int(counters.get("bytes") or 0)
            lost += int(counters.get("lost") or 0)
            expected += int(counters.get("expected") or 0)
        return Sample(
            time=time.monotonic() - self.started_at,
            started=len(self.viewers),
            connected=connected,
            failed=failed,
            rejected=rejected,
            bytes=total_bytes,
            lost=lost,
            expected=expected,
            cpu=_cpu_seconds() - self.cpu_at_start,
        )

    async def run(
        self, progress: Callable[[Sample, Sample | None], None] | None = None
    ) -> LoadTestReport:
        options = self.options
        self.cpu_at_start = _cpu_seconds()
        self.started_at = time.monotonic()
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        self.loop.add_reader(self.receiver.fileno(), self._readable)
        connector = aiohttp.TCPConnector(limit=256)
        self.http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=options.setup_timeout)
        )

        async def sampler() -> None:
            previous: Sample | None = None
            while True:
                await asyncio.sleep(SAMPLE_INTERVAL)
                sample = self._sample()
                self.samples.append(sample)
                if progress is not None:
                    progress(sample, previous)
                previous = sample

        sampling = self.loop.create_task(sampler())
        polling = (
            self.loop.create_task(self._poll_connected(options.poll_interval))
            if options.poll_interval > 0
            else None
        )
        try:
            for index in range(options.viewers):
                due = self.started_at + index / options.ramp
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                viewer = _Viewer(self, index)
                self.viewers.append(viewer)
                tasks.append(self.loop.create_task(viewer.run(stop)))
            await asyncio.sleep(options.duration)
            self.samples.append(self._sample())
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in (sampling, polling):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self.loop.remove_reader(self.receiver.fileno())
            await self.http.close()
        wall = time.monotonic() - self.started_at
        cpu = _cpu_seconds() - self.cpu_at_start
        return summarize(
            url=options.url,
            options=asdict(options),
            viewers=[viewer.result for viewer in self.viewers],
            samples=self.samples,
            wall_seconds=wall,
            cpu_seconds=cpu,
        )


def _enlarge_receive_buffer(sock: socket.socket) -> None:
    """Room for a keyframe burst plus a late sweep. SO_RCVBUF is capped at
    net.core.rmem_max; SO_RCVBUFFORCE (CAP_NET_ADMIN) is not, so try it first."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    if force is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
            return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)


def _cpu_seconds() -> float:
    """This process's CPU time: the harness reports its own cost (issue 7)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _progress_printer(stream: Any) -> Callable[[Sample, Sample | None], None]:
    def show(sample: Sample, previous: Sample | None) -> None:
        interval = sample.time - (previous.time if previous else 0.0)
        delivered = sample.bytes - (previous.bytes if previous else 0)
        mbps = delivered * 8 / interval / 1e6 if interval > 0 else 0.0
        loss = 100.0 * sample.lost / sample.expected if sample.expected else 0.0
        spent = sample.cpu - (previous.cpu if previous else 0.0)
        cpu = 100.0 * spent / interval if interval > 0 else 0.0
        line = (
            f"[{sample.time:6.1f}s] viewers {sample.connected}/{sample.started} connected, "
            f"{sample.failed} failed, {sample.rejected} rejected | {mbps:8.2f} Mbit/s | "
            f"loss {loss:.3f}% | harness CPU {cpu:.0f}%"
        )
        if stream.isatty():
            stream.write("\r" + line)
        else:
            stream.write(line + "\n")
        stream.flush()

    return show


def run_from_command_line(
    options: LoadTestOptions,
    *,
    json_path: Path | None = None,
    html_path: Path | None = None,
    progress: bool = True,
) -> int:
    """``whepfan loadtest``: run, print the summary, write the reports; exit status."""

    async def main() -> LoadTestReport:
        test = LoadTest(options)
        return await test.run(_progress_printer(sys.stderr) if progress else None)

    try:
        import uvloop

        report = uvloop.run(main())
    except KeyboardInterrupt:
        return 130
    if progress and sys.stderr.isatty():
        sys.stderr.write("\n")
    print(render_text(report))
    if json_path is not None:
        json_path.write_text(report.to_json())
    if html_path is not None:
        html_path.write_text(render_html(report))
    return 0 if report.all_viewers_received_media else EXIT_SOME_VIEWERS_FAILED
