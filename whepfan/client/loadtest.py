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

Per viewer the run records the server's answer (201/409/503/...; a refusal with the
problem detail the server gave, RFC 9457 §3.1), the latencies POST -> 201, -> ICE
connected, -> DTLS done, -> first RTP, -> first keyframe, the receive counters (packets,
bytes, sequence-gap loss, duplicates, jitter, decrypt failures) and its stalls: silences
longer than ``stall_gap`` while it should have been receiving (``stalls.py``), including
one that lasts until the end of the run. Viewers that fail are reported with the reason,
never dropped from the results. A run in which the server refuses every viewer stops as
soon as that is clear instead of ramping and waiting out its duration.

With ``server_metrics`` the run also scrapes the server's Prometheus ``/metrics`` once a
second, for the report's server CPU and receive-delay charts against viewers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from whepfan import _fastpath
from whepfan.client import charts
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
from whepfan.client.report import (
    LoadTestReport,
    Sample,
    ServerSample,
    render_html,
    render_text,
    summarize,
)
from whepfan.client.signalling import delete_session, local_address_towards, post_offer
from whepfan.client.stalls import StallWatch, check_interval
from whepfan.errors import ParseError, WhepfanError
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.protocol.negotiation import remote_transport
from whepfan.protocol.sdp import SessionDescription

log = logging.getLogger("whepfan.loadtest")

EXIT_USAGE = 2  # as the CLI's: --html without matplotlib
EXIT_SOME_VIEWERS_FAILED = 3  # a viewer failed, got no media or stalled
EXIT_EVERY_VIEWER_REFUSED = 4  # every viewer refused or unanswered; the run stopped early
SAMPLE_INTERVAL = 1.0
DEFAULT_STALL_GAP = 2.0
# Shorter gaps would be noise: a polled socket is read up to MAX_POLL_INTERVAL late, and
# a check looks every check_interval(gap).
MIN_STALL_GAP = 0.5
# Refused this many times in a row, with nobody connected or still setting up, the run
# gives up: the endpoint refuses everyone (no publisher, wrong token, draining, full).
GIVE_UP_AFTER_REFUSALS = 10
SCRAPE_TIMEOUT = 5.0
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
    # A viewer silent for longer than this while it should be receiving has stalled.
    stall_gap: float = DEFAULT_STALL_GAP
    # The server's Prometheus endpoint to scrape during the run, and its bearer token.
    server_metrics: str | None = None
    server_metrics_token: str | None = None

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
        if self.stall_gap < MIN_STALL_GAP:
            raise ValueError(f"--stall-gap must be at least {MIN_STALL_GAP:g} s")


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
    last_rtp: float | None = None
    receiving_seconds: float = 0.0
    bitrate: float = 0.0  # bits/s over the time it received
    stalls: int = 0  # silences longer than the stall gap (stalls.py)
    longest_gap: float = 0.0  # seconds: the longest silence once its media path was ready
    stalled_at_end: bool = False  # still silent when the run ended
    endpoint: str | None = None  # where the POST was answered (after any 307s)
    redirects: int = 0
    counters: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unanswered(result: ViewerResult) -> bool:
    """Its POST got no HTTP answer (the server down or unreachable)."""
    return (
        result.outcome == "failed"
        and result.status is None
        and bool(result.error and result.error.startswith("POST failed"))
    )


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
        self.watch: StallWatch | None = None

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
                test.note_refusal()  # no answer at all: as good as a refusal for the stop
                return
            self.result.status = answer.status
            self.result.endpoint = answer.endpoint
            self.result.redirects = answer.redirects
            if answer.status != 201 or answer.answer is None:
                self.result.outcome = "rejected"
                self.result.error = problem_summary(
                    answer.status, answer.detail, retry_after=answer.retry_after
                )
                test.note_refusal()
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
                # Say what was tried (candidates, checks, ICE/DTLS states), as publish does.
                tried = f": {self.transport.diagnosis()}" if self.transport is not None else ""
                self._fail(f"not connected within {options.setup_timeout:g} s{tried}")
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

    def counters_now(self) -> dict[str, Any]:
        if self.slot is not None:
            return self.test.receiver.viewer_stats(self.slot)
        return self.final_counters or {}

    def check_stall(self, now: float) -> None:
        if self.watch is not None:
            self.watch.observe(now, self.counters_now().get("last_rtp_at"))

    def finish_stall_watch(self, end: float) -> None:
        """The run's last check: an open silence counts up to ``end``."""
        watch = self.watch
        if watch is None:
            return
        watch.finish(end, self.counters_now().get("last_rtp_at"))
        self.result.stalls = watch.stalls
        self.result.longest_gap = watch.longest_gap
        self.result.stalled_at_end = watch.stalled

    def _finish_counters(self, counters: dict[str, Any]) -> None:
        result = self.result
        result.counters = {key: value for key, value in counters.items() if not key.endswith("_at")}
        first, last = counters.get("first_rtp_at"), counters.get("last_rtp_at")
        if last is not None:
            result.last_rtp = last - self.posted_at
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
                # From here media can flow: silence counts (before the first RTP too).
                self.watch = StallWatch(gap=self.test.options.stall_gap, ready_at=now)
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
        # UDP_GRO where the kernel offers it: a server's GSO run to a viewer is one read
        # here, so one load machine drives more viewers (counts stay per datagram).
        self.receiver = _fastpath.Receiver(
            max_viewers=options.viewers, verify_every=options.verify_every, gro=True
        )
        self.local_host = local_address_towards(options.url)
        self.family = socket.AF_INET6 if ":" in self.local_host else socket.AF_INET
        self.by_slot: dict[int, _Viewer] = {}
        self.viewers: list[_Viewer] = []
        self.samples: list[Sample] = []
        self.server_samples: list[ServerSample] = []
        self.scrape_errors = Counter[str]()
        self.started_at = 0.0
        self.cpu_at_start = 0.0
        self.everyone_refused = asyncio.Event()
        self.http: aiohttp.ClientSession

    def _readable(self) -> None:
        self._dispatch(self.receiver.drain())

    def _dispatch(self, control: list[tuple[int, bytes, tuple[str, int]]]) -> None:
        for slot, data, addr in control:
            viewer = self.by_slot.get(slot)
            if viewer is not None:
                viewer.receive(data, addr)

    def note_refusal(self) -> None:
        """A viewer was refused, or its POST got no answer at all (connection refused, no
        route, TLS): if every viewer so far was, and enough of them to rule out a moment's
        trouble, the run stops (``everyone_refused``) instead of waiting out its duration."""
        enough = min(self.options.viewers, GIVE_UP_AFTER_REFUSALS)
        if len(self.viewers) >= enough and all(
            viewer.result.outcome == "rejected" or _unanswered(viewer.result)
            for viewer in self.viewers
        ):
            self.everyone_refused.set()

    async def _every(self, interval: float, action: Callable[[], None]) -> None:
        """``action`` on a fixed cadence (a late round does not shift the ones after it,
        so a slow moment is caught up, not accumulated)."""
        due = self.loop.time()
        while True:
            due += interval
            delay = due - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                due = self.loop.time()
            action()

    def _poll(self) -> None:
        self._dispatch(self.receiver.poll())

    def _check_stalls(self) -> None:
        # Whatever is already queued first: had this process been late (a busy machine,
        # a long sweep), its own lateness must not read as the server's silence.
        self._readable()
        if self.options.poll_interval > 0:
            self._poll()
        now = time.monotonic()
        for viewer in self.viewers:
            viewer.check_stall(now)

    def _connected(self) -> int:
        return sum(1 for viewer in self.viewers if viewer.result.outcome == "connected")

    def _sample(self) -> Sample:
        connected = failed = rejected = stalled = 0
        total_bytes = packets = lost = expected = 0
        for viewer in self.viewers:
            outcome = viewer.result.outcome
            if outcome == "connected":
                connected += 1
            elif outcome == "failed":
                failed += 1
            elif outcome == "rejected":
                rejected += 1
            if viewer.watch is not None and viewer.watch.stalled:
                stalled += 1
            counters = viewer.counters_now()
            total_bytes += int(counters.get("bytes") or 0)
            packets += int(counters.get("packets") or 0)
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
            packets=packets,
            stalled=stalled,
        )

    async def _scrape_server(self) -> None:
        """One scrape of ``--server-metrics``; a failure is counted by reason, never
        fatal (the server under load may well answer slowly)."""
        url = self.options.server_metrics
        assert url is not None
        token = self.options.server_metrics_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with self.http.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
            ) as response:
                text = await response.text(errors="replace")
                if response.status != 200:
                    self.scrape_errors[problem_summary(response.status, text[:300])] += 1
                    return
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.scrape_errors[type(exc).__name__] += 1
            return
        try:
            metrics = server_metrics_from_text(text)
        except ValueError as exc:
            self.scrape_errors[f"unreadable metrics: {exc}"] += 1
            return
        self.server_samples.append(
            ServerSample(
                time=time.monotonic() - self.started_at, viewers=self._connected(), **metrics
            )
        )

    async def _scrape_server_regularly(self) -> None:
        due = self.loop.time()
        while True:
            await self._scrape_server()
            due += SAMPLE_INTERVAL
            await asyncio.sleep(max(0.0, due - self.loop.time()))

    async def _start_viewers(self, tasks: list[asyncio.Task[None]], stop: asyncio.Event) -> None:
        options = self.options
        for index in range(options.viewers):
            due = self.started_at + index / options.ramp
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.everyone_refused.is_set():
                return
            viewer = _Viewer(self, index)
            self.viewers.append(viewer)
            tasks.append(self.loop.create_task(viewer.run(stop)))

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
        previous: Sample | None = None

        def sample() -> None:
            nonlocal previous
            current = self._sample()
            self.samples.append(current)
            if progress is not None:
                progress(current, previous)
            previous = current

        background = [
            self.loop.create_task(self._every(SAMPLE_INTERVAL, sample)),
            self.loop.create_task(
                self._every(check_interval(options.stall_gap), self._check_stalls)
            ),
        ]
        if options.poll_interval > 0:
            background.append(self.loop.create_task(self._every(options.poll_interval, self._poll)))
        if options.server_metrics:
            background.append(self.loop.create_task(self._scrape_server_regularly()))
        measured_until: float | None = None
        try:
            await self._start_viewers(tasks, stop)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.everyone_refused.wait(), options.duration)
            # The last look, before anything is torn down: what is still unread in the
            # polled sockets first, then every open silence ends here.
            self._readable()
            if options.poll_interval > 0:
                self._poll()
            end = time.monotonic()
            for viewer in self.viewers:
                viewer.finish_stall_watch(end)
            measured_until = end - self.started_at
            sample()
            if options.server_metrics:
                await self._scrape_server()
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.loop.remove_reader(self.receiver.fileno())
            await self.http.close()
        wall = time.monotonic() - self.started_at
        cpu = _cpu_seconds() - self.cpu_at_start
        stopped_early = ""
        if self.everyone_refused.is_set():
            results = [viewer.result for viewer in self.viewers]
            if all(_unanswered(result) for result in results):
                why = f"no viewer reached the server ({results[0].error})"
            else:
                why = "the server refused every viewer"
            stopped_early = f"{why}: stopped after {len(self.viewers)} of {options.viewers}"
        return summarize(
            url=options.url,
            options=_without_credentials(options),
            viewers=[viewer.result for viewer in self.viewers],
            samples=self.samples,
            wall_seconds=wall,
            cpu_seconds=cpu,
            server_samples=self.server_samples,
            stall_gap=options.stall_gap,
            measured_until=measured_until,
            stopped_early=stopped_early,
            server_metrics_errors=dict(self.scrape_errors),
        )


def problem_summary(status: int, body: str, *, retry_after: str | None = None) -> str:
    """ "HTTP 409 Conflict: stream 'live' is not live (Retry-After 5)": an error answer's
    status with the problem details' ``title`` and ``detail`` (RFC 9457 §3.1.3, §3.1.4)
    when the body is one, else its text, so that the summary says why, not only that."""
    title, detail = "", ""
    body = body.strip()
    try:
        problem = orjson.loads(body) if body.startswith("{") else None
    except orjson.JSONDecodeError:
        problem = None  # cut short (signalling keeps the first 300 characters) or not JSON
    if isinstance(problem, dict):
        title = str(problem.get("title") or "")
        detail = str(problem.get("detail") or "")
    elif body and not body.startswith("<"):  # an HTML error page says nothing useful here
        detail = " ".join(body.split())[:200]
    if not title:
        with contextlib.suppress(ValueError):
            title = HTTPStatus(status).phrase
    summary = f"HTTP {status}" + (f" {title}" if title else "")
    if detail and detail != title:
        summary += f": {detail}"
    if retry_after:
        summary += f" (Retry-After {retry_after})"
    return summary


def _without_credentials(options: LoadTestOptions) -> dict[str, Any]:
    """The options as the report shows them: a report is shared, its tokens are not."""
    shown = asdict(options)
    for name in ("token", "server_metrics_token"):
        if shown[name] is not None:
            shown[name] = "(set)"
    return shown


def server_metrics_from_text(text: str) -> dict[str, float | None]:
    """The figures the report plots, from a Prometheus text exposition: the server's CPU
    seconds (``process_cpu_seconds_total``, summed over whatever labels split it), the
    worst worker's receive delay and the server's own viewer count. None for a metric
    the server does not export; ValueError for text the parser cannot read."""
    cpu: float | None = None
    delay: float | None = None
    viewers: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "process_cpu_seconds_total":
                cpu = (cpu or 0.0) + sample.value
            elif sample.name == "whepfan_worker_receive_delay_seconds":
                delay = sample.value if delay is None else max(delay, sample.value)
            elif sample.name == "whepfan_viewers":
                viewers = (viewers or 0.0) + sample.value
    return {"cpu_seconds": cpu, "receive_delay": delay, "server_viewers": viewers}


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
            f"loss {loss:.3f}% | harness CPU {cpu:.0f}% | stalled {sample.stalled}"
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
    if html_path is not None:
        try:
            charts.require_matplotlib()
        except charts.MatplotlibMissing as exc:
            print(f"whepfan loadtest: {exc}", file=sys.stderr)
            return EXIT_USAGE

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
    if report.summary["stopped_early"]:
        return EXIT_EVERY_VIEWER_REFUSED
    return 0 if report.passed else EXIT_SOME_VIEWERS_FAILED
