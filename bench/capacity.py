"""Capacity benchmark (issue 8): whepfan against the naive aiortc SFU, and the join storm.

Contenders, measured the same way in the same run: ``whepfan serve`` with 1 and with 2
workers, and ``bench/naive_sfu.py`` (aiortc, one ``RTCPeerConnection`` per viewer fed
through ``MediaRelay``). Each is fed by the same ``whepfan publish`` (720p VP8 at
1.5 Mbit/s + Opus) and loaded by ``whepfan loadtest`` with the same growing viewer
counts and the same hold. Per step, over the steady window (every viewer started, then
a settling second, to the end of the hold):

- loss: sequence gaps over packets expected, from the load generator's receive counters;
- per-viewer media rate; a transcoding SFU that falls behind drops whole frames, which
  leaves no sequence gap, so "holding" also needs the rate within 10 % of the best the
  same contender delivered at any step;
- the server's CPU (user + system of the server and every descendant, from /proc) per
  delivered packet, and its cores busy; the load generator's cores busy beside it, since
  on this machine it shares the cores with the server.

"Viewers per core" is a step's viewers divided by the server's cores busy, at the
largest step that holds (< 0.5 % loss, every viewer connected and receiving, full rate).

Cores: with ``--pin`` (the default on a machine with 2 or more CPUs) a one-process server
(whepfan with 1 worker, the naive SFU) and the loopback limit run on CPU 0, the publisher
and the load generator on the others, so the server's core is its own and the figures
are not bent by the encoder or the load generator competing for it. A multi-worker
whepfan needs every CPU, so it and its load share them unpinned.

The load generator polls connected viewers' sockets (``whepfan loadtest --poll-ms``)
rather than being woken per datagram: on loopback the sender pays for that wake-up, a
cost no viewer across a network imposes (see whepfan/_receiver.pxi).

UDP GSO (issue 17): every whepfan worker count runs once per ``--gso`` mode (default
``on,off``, as "whepfan N w GSO on" / "... off"), so viewers per core and CPU µs per
delivered packet with and without GSO come from the same run.

The join storm: N viewers (``--storm``, default 1,000) arrive within ``--storm-window``
seconds against whepfan; time to first frame is POST -> first VP8 keyframe packet as the
load generator's receiver sees it (first RTP is reported beside it), and the viewers
that never got one are counted as failed.

    python bench/capacity.py                     # the full run (~15-20 min)
    python bench/capacity.py --smoke             # tiny, under a minute
    python bench/capacity.py --viewers 1,50 --hold 8 --workers 1 --storm 0
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any

# bench/ holds scripts: run from a checkout without installing (the server, publisher and
# load generator subprocesses get the same path through PYTHONPATH, set in main() only: a
# test that imports this module must not hand the checkout to every later subprocess).
BENCH = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(BENCH)
if REPOSITORY not in sys.path:
    sys.path.insert(0, REPOSITORY)
from whepfan.workers.calibrate import calibrate  # noqa: E402

if BENCH not in sys.path:  # the helper beside this file, after everything else
    sys.path.append(BENCH)
from _cpu import process_cpu_seconds, stat_cpu_seconds  # noqa: E402

TOKEN = "bench-capacity"
LOSS_LIMIT_PERCENT = 0.5
FULL_RATE_FRACTION = 0.9  # of the contender's best per-viewer rate
SETTLE_SECONDS = 1.0  # after the last viewer started, before the window opens
CPU_SAMPLE_INTERVAL = 0.25
# A step this bad shows the contender is past its limit: larger steps are not run.
OVERLOAD_LOSS_PERCENT = 5.0
OVERLOAD_RATE_FRACTION = 0.5
TARGET_RATIO_TO_NAIVE = 50.0
TARGET_VIEWERS_PER_CORE = 1500
TARGET_FRACTION_OF_LIMIT = 0.7
# The packet rate behind the viewers-per-core target: docs/performance.md's arithmetic
# (a 720p30 stream at 1.5 Mbps was estimated at ~150-170 packets/s with audio; 320k
# packets/s per core ~ 2,000 viewers). Our stream is measured, and printed beside it.
TARGET_PACKETS_PER_VIEWER = 160
NAIVE = "naive aiortc"
SERVER_CPUS: set[int] | None = None  # set by --pin: the server's core
LOAD_CPUS: set[int] | None = None  # the publisher's and load generator's cores


def _pinned(cpus: set[int] | None) -> Any:
    """A ``preexec_fn`` that confines the child (and what it forks) to ``cpus``."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


# --- processes and their CPU -----------------------------------------------------------


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            # The command name (field 2) may hold spaces and parentheses: split after it.
            return handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant (worker processes, whatever thread forked them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


class TreeCpu:
    """CPU seconds a process tree has used so far, never decreasing.

    Summing the live tree alone drops a descendant's seconds the moment it exits (they
    reach the parent's cutime only when it is reaped, and not at all for a grandchild
    reparented to init), so a window read off two samples could come out negative. Each
    process seen keeps its last figure, keyed by (pid, start time) so a reused pid is a
    new process."""

    def __init__(self, root: int) -> None:
        self.root = root
        self._last: dict[tuple[int, int], float] = {}

    def sample(self) -> float:
        for pid in process_tree(self.root):
            fields = _stat_fields(pid)
            if fields is not None:
                # proc(5): utime, stime are fields 14, 15; starttime is field 22.
                key = (pid, int(fields[19]))
                seconds = process_cpu_seconds(pid)
                self._last[key] = stat_cpu_seconds(fields) if seconds is None else seconds
        return sum(self._last.values())


class CpuSampler:
    """Samples (monotonic time, CPU seconds of each process tree in ``roots``) on a
    thread, so a window chosen afterwards from the load generator's timeline can be read
    off."""

    def __init__(self, *roots: int) -> None:
        self.samples: list[tuple[float, ...]] = []
        self._trees = [TreeCpu(root) for root in roots]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            cpu = [tree.sample() for tree in self._trees]
            self.samples.append((time.monotonic(), *cpu))
            if self._stop.wait(CPU_SAMPLE_INTERVAL):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, moment: float) -> tuple[float, ...]:
        """CPU seconds of each root's tree at ``moment``, linearly interpolated."""
        return interpolate(self.samples, moment)


def interpolate(samples: Sequence[tuple[float, ...]], moment: float) -> tuple[float, ...]:
    """``samples`` are (time, value, ...) in time order; values at ``moment``, held
    constant outside the sampled span."""
    if not samples:
        raise ValueError("no CPU samples")
    if moment <= samples[0][0]:
        return samples[0][1:]
    for before, after in itertools.pairwise(samples):
        if before[0] <= moment <= after[0]:
            span = after[0] - before[0]
            share = (moment - before[0]) / span if span > 0 else 0.0
            return tuple(a + (b - a) * share for a, b in zip(before[1:], after[1:], strict=True))
    return samples[-1][1:]


# --- the servers and the publisher -----------------------------------------------------


def _wait_http(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not start")


class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    publisher: subprocess.Popen[bytes] | None = None  # set while the stream is published
    pinned = False  # on SERVER_CPUS, its publisher and load on LOAD_CPUS

    def close(self) -> None:
        self.process.terminate()  # whepfan: SIGTERM drains (no viewers left), then exits
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class WhepfanServer(Server):
    def __init__(self, workers: int, gso: str = "auto") -> None:
        self.workers = workers
        # --gso on/off (issue 17): a viewer's run of a burst in one UDP GSO entry, or not.
        self.gso = gso
        # Names fit the tables' 19-character contender column.
        if gso == "auto":
            self.name = f"whepfan {workers} worker{'s' if workers > 1 else ''}"
        else:
            self.name = f"whepfan {workers} w GSO {gso}"
        self.pinned = SERVER_CPUS is not None and workers == 1
        http_port = _free_port(socket.SOCK_STREAM)
        udp_port = _free_port(socket.SOCK_DGRAM)
        self.url = f"http://127.0.0.1:{http_port}"
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "whepfan.cli", "serve",
                # A wildcard UDP bind, as by default: replies leave from the address reached.
                "--http", f"127.0.0.1:{http_port}", "--udp", f"0.0.0.0:{udp_port}",
                "--public-ip", "127.0.0.1", "--publish-token", TOKEN,
                "--workers", str(workers), "--log-level", "warning",
                # The raw capacity is what is measured: the default budget ("auto", 0.7 of
                # the limit) would refuse viewers first; the report prints where.
                "--worker-packet-budget", "none",
                "--gso", gso,
            ],
            preexec_fn=_pinned(SERVER_CPUS if workers == 1 else None),
        )  # fmt: skip
        _wait_http(self.url + "/metrics", self.process, self.name)


class NaiveServer(Server):
    def __init__(self, video_bitrate: int) -> None:
        self.name = NAIVE
        self.pinned = SERVER_CPUS is not None
        http_port = _free_port(socket.SOCK_STREAM)
        self.url = f"http://127.0.0.1:{http_port}"
        self.process = subprocess.Popen(
            [
                sys.executable, os.path.join(BENCH, "naive_sfu.py"),
                "--http", f"127.0.0.1:{http_port}", "--video-bitrate", str(video_bitrate),
            ],
            stdout=subprocess.DEVNULL,
            preexec_fn=_pinned(SERVER_CPUS),
        )  # fmt: skip
        _wait_http(self.url + "/status", self.process, self.name)


@dataclass(frozen=True)
class Stream:
    size: str = "1280x720"
    bitrate: int = 1_500_000

    def publish(self, server: Server) -> subprocess.Popen[bytes]:
        pinned = server.pinned
        return subprocess.Popen(
            [
                sys.executable, "-m", "whepfan.cli", "publish", "--token", TOKEN,
                "--bitrate", str(self.bitrate), "--size", self.size, "--log-level", "warning",
                f"{server.url}/whip/live",
            ],
            preexec_fn=_pinned(LOAD_CPUS if pinned else None),
        )  # fmt: skip


@contextlib.contextmanager
def deployment(server: Server, stream: Stream) -> Iterator[Server]:
    """``server`` with the stream published to it; both stopped on the way out."""
    publisher: subprocess.Popen[bytes] | None = None
    try:
        publisher = server.publisher = stream.publish(server)
        time.sleep(3)  # WHIP, ICE, DTLS and the first keyframe
        if publisher.poll() is not None:
            raise RuntimeError(f"publisher to {server.name} exited: {publisher.returncode}")
        yield server
    finally:
        if publisher is not None:
            publisher.terminate()
            try:
                publisher.wait(10)
            except subprocess.TimeoutExpired:
                publisher.kill()
        server.close()


# --- one load step ---------------------------------------------------------------------

PROGRESS = re.compile(r"^\[\s*([\d.]+)s\] viewers (\d+)/(\d+) connected")


@dataclass
class Step:
    contender: str
    viewers: int
    connected: int
    received_media: int
    failed: int
    loss_percent: float  # over the steady window
    packets: int  # delivered in the window (bytes x packets/byte of the whole run)
    window_seconds: float
    server_cpu: float  # CPU seconds in the window, server and its workers
    loadgen_cpu: float
    kbps_per_viewer: float
    # The publisher encodes live and skips frames when starved of CPU: a rate drop with
    # no loss at a large step is the source slowing down on a shared machine.
    publisher_cpu: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def cpu_us_per_packet(self) -> float:
        return self.server_cpu / self.packets * 1e6 if self.packets else float("nan")

    @property
    def server_cores(self) -> float:
        return self.server_cpu / self.window_seconds if self.window_seconds else float("nan")

    @property
    def loadgen_cores(self) -> float:
        return self.loadgen_cpu / self.window_seconds if self.window_seconds else float("nan")

    @property
    def publisher_cores(self) -> float:
        return self.publisher_cpu / self.window_seconds if self.window_seconds else float("nan")

    @property
    def packets_per_viewer_second(self) -> float:
        if not self.window_seconds or not self.connected:
            return float("nan")
        return self.packets / self.window_seconds / self.connected

    @property
    def viewers_per_core(self) -> float:
        return self.connected / self.server_cores if self.server_cores > 0 else float("nan")

    @property
    def complete(self) -> bool:
        return self.connected == self.received_media == self.viewers

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "cpu_us_per_packet": self.cpu_us_per_packet,
            "server_cores": self.server_cores,
            "loadgen_cores": self.loadgen_cores,
            "publisher_cores": self.publisher_cores,
            "viewers_per_core": self.viewers_per_core,
            "packets_per_viewer_second": self.packets_per_viewer_second,
        }


def steady_window(timeline: Sequence[dict[str, Any]], viewers: int) -> tuple[int, int]:
    """Indexes (first, last) of the load generator's cumulative samples bounding the
    steady part of a step: from ``SETTLE_SECONDS`` after every viewer had started to the
    last sample, taken at the end of the hold. Short runs fall back to the whole run."""
    last = len(timeline) - 1
    everyone = next((i for i, s in enumerate(timeline) if s["started"] >= viewers), None)
    if everyone is not None:
        opens = timeline[everyone]["time"] + SETTLE_SECONDS
        first = next((i for i, s in enumerate(timeline) if s["time"] >= opens), last)
        if last - first >= 2:
            return first, last
    return 0, last


class LoadRun:
    """One ``whepfan loadtest`` subprocess, with its progress lines timestamped on our
    clock (they map its timeline onto the CPU samples) and its JSON report."""

    def __init__(
        self,
        url: str,
        viewers: int,
        *,
        ramp: float,
        hold: float,
        timeout: float,
        poll_ms: float,
        pinned: bool,
    ):
        descriptor, self._report = tempfile.mkstemp(suffix=".json", prefix="capacity-")
        os.close(descriptor)
        self.clock_pairs: list[tuple[float, float]] = []  # (our monotonic, its seconds)
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "whepfan.cli", "loadtest", "--viewers", str(viewers),
                "--ramp", f"{ramp:g}", "--duration", f"{hold:g}", "--verify-every", "50",
                "--setup-timeout", f"{timeout:g}", "--poll-ms", f"{poll_ms:g}",
                "--json", self._report, f"{url}/whep/live",
            ],
            preexec_fn=_pinned(LOAD_CPUS if pinned else None),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.process.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stderr,))
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            match = PROGRESS.match(line)
            if match:
                self.clock_pairs.append((time.monotonic(), float(match[1])))

    def wait(self) -> dict[str, Any]:
        self.process.wait()
        self._reader.join()
        try:
            with open(self._report) as handle:
                return dict(json.load(handle))
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"loadtest wrote no report (status {self.process.returncode})"
            ) from exc
        finally:
            os.unlink(self._report)

    def our_clock(self, its_seconds: float) -> float:
        """Its timeline's seconds on our monotonic clock: each progress line is written
        right after the sample it shows, so the smallest offset is the closest."""
        if not self.clock_pairs:
            raise RuntimeError("loadtest printed no progress")
        return its_seconds + min(ours - its for ours, its in self.clock_pairs)


def run_step(server: Server, viewers: int, *, ramp: float, hold: float, poll_ms: float) -> Step:
    if server.publisher is None:
        raise RuntimeError(f"nothing is published to {server.name}")
    run = LoadRun(
        server.url,
        viewers,
        ramp=ramp,
        hold=hold,
        timeout=20.0,
        poll_ms=poll_ms,
        pinned=server.pinned,
    )
    sampler = CpuSampler(server.process.pid, run.process.pid, server.publisher.pid)
    try:
        report = run.wait()
    finally:
        sampler.stop()
    summary, timeline = report["summary"], report["timeline"]
    first, last = steady_window(timeline, viewers)
    opened, closed = timeline[first], timeline[last]
    server_a, loadgen_a, publisher_a = sampler.at(run.our_clock(opened["time"]))
    server_b, loadgen_b, publisher_b = sampler.at(run.our_clock(closed["time"]))
    window = closed["time"] - opened["time"]
    delivered_bytes = closed["bytes"] - opened["bytes"]
    expected = closed["expected"] - opened["expected"]
    totals = summary["totals"]
    packets_per_byte = totals["packets"] / totals["bytes"] if totals.get("bytes") else 0.0
    connected = summary["connected"]
    return Step(
        contender=server.name,
        viewers=viewers,
        connected=connected,
        received_media=summary["received_media"],
        failed=summary["failed"] + summary["rejected"],
        loss_percent=100.0 * (closed["lost"] - opened["lost"]) / expected if expected else 0.0,
        packets=round(delivered_bytes * packets_per_byte),
        window_seconds=window,
        server_cpu=server_b - server_a,
        loadgen_cpu=loadgen_b - loadgen_a,
        publisher_cpu=publisher_b - publisher_a,
        kbps_per_viewer=delivered_bytes * 8 / window / connected / 1000
        if window > 0 and connected
        else 0.0,
        errors=dict(summary.get("errors") or {}),
    )


def overloaded(step: Step, first: Step) -> bool:
    """Past the limit beyond doubt: larger steps would only take time."""
    return (
        not step.complete
        or step.loss_percent >= OVERLOAD_LOSS_PERCENT
        or step.kbps_per_viewer < OVERLOAD_RATE_FRACTION * first.kbps_per_viewer
    )


def holding(steps: Sequence[Step]) -> list[Step]:
    """Steps of one contender that hold: every viewer connected and receiving, loss under
    the limit, and the per-viewer rate within ``FULL_RATE_FRACTION`` of its best."""
    best = max((s.kbps_per_viewer for s in steps), default=0.0)
    return [
        s
        for s in steps
        if s.complete
        and s.loss_percent < LOSS_LIMIT_PERCENT
        and s.kbps_per_viewer >= FULL_RATE_FRACTION * best
    ]


# --- the join storm --------------------------------------------------------------------


@dataclass
class Storm:
    contender: str
    viewers: int
    window_seconds: float
    connected: int
    failed: int  # no keyframe: rejected, not connected, or connected without a frame
    first_frame_p50_ms: float | None
    first_frame_p99_ms: float | None
    first_rtp_p50_ms: float | None
    first_rtp_p99_ms: float | None
    all_media_after_s: float | None  # first POST -> last viewer's first keyframe
    errors: dict[str, int] = field(default_factory=dict)


def run_storm(server: Server, viewers: int, *, window: float, hold: float, poll_ms: float) -> Storm:
    run = LoadRun(
        server.url,
        viewers,
        ramp=viewers / window,
        hold=hold,
        timeout=30.0,
        poll_ms=poll_ms,
        pinned=server.pinned,
    )
    report = run.wait()
    summary, latency = report["summary"], report["summary"]["latency_ms"]
    framed = [v for v in report["viewers"] if v["first_keyframe"] is not None]
    return Storm(
        contender=server.name,
        viewers=viewers,
        window_seconds=window,
        connected=summary["connected"],
        failed=viewers - len(framed),
        first_frame_p50_ms=latency["first_keyframe"]["p50"],
        first_frame_p99_ms=latency["first_keyframe"]["p99"],
        first_rtp_p50_ms=latency["first_rtp"]["p50"],
        first_rtp_p99_ms=latency["first_rtp"]["p99"],
        all_media_after_s=max(
            (v["started_at"] + v["first_keyframe"] for v in framed), default=None
        ),
        errors=dict(summary.get("errors") or {}),
    )


# --- reporting -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


STEP_HEADER = (
    f"{'contender':<19}{'viewers':>8}{'conn':>6}{'loss %':>8}{'kbit/s/v':>10}"
    f"{'pkt/s/v':>8}{'packets':>10}{'µs/pkt':>8}{'srv cores':>10}{'gen cores':>10}"
    f"{'pub cores':>10}{'viewers/core':>13}"
)


def step_line(step: Step) -> str:
    return (
        f"{step.contender:<19}{step.viewers:>8}{step.connected:>6}{step.loss_percent:>8.3f}"
        f"{step.kbps_per_viewer:>10.0f}{step.packets_per_viewer_second:>8.0f}"
        f"{step.packets:>10}{step.cpu_us_per_packet:>8.2f}"
        f"{step.server_cores:>10.2f}{step.loadgen_cores:>10.2f}{step.publisher_cores:>10.2f}"
        f"{step.viewers_per_core:>13.1f}"
    )


SUMMARY_HEADER = (
    f"{'contender':<19}{'holding':>8}{'µs/pkt':>8}{'viewers/core':>13}{'kbit/s/v':>10}"
    f"{'srv cores':>10}{'gen cores':>10}{'÷limit':>8}{'÷naive':>8}"
)


def summarize(steps: Sequence[Step], limit_us_per_packet: float) -> list[dict[str, Any]]:
    """One row per contender, at its largest holding step; ratios against the naive SFU
    are of viewers per core, against the limit of packets per CPU second."""
    rows: list[dict[str, Any]] = []
    for contender in dict.fromkeys(s.contender for s in steps):
        held = holding([s for s in steps if s.contender == contender])
        best = max(held, key=lambda s: s.viewers, default=None)
        rows.append(
            {
                "contender": contender,
                "holding": best.viewers if best else 0,
                "cpu_us_per_packet": best.cpu_us_per_packet if best else None,
                # nan when the window saw no CPU tick (an idle server at 1-2 viewers).
                "viewers_per_core": best.viewers_per_core
                if best and math.isfinite(best.viewers_per_core)
                else None,
                "packets_per_viewer_second": best.packets_per_viewer_second if best else None,
                # The same cost per packet at the target's assumed packet rate.
                "viewers_per_core_at_target_rate": 1e6
                / best.cpu_us_per_packet
                / TARGET_PACKETS_PER_VIEWER
                if best and best.cpu_us_per_packet > 0
                else None,
                "kbps_per_viewer": best.kbps_per_viewer if best else None,
                "server_cores": best.server_cores if best else None,
                "loadgen_cores": best.loadgen_cores if best else None,
                "fraction_of_limit": limit_us_per_packet / best.cpu_us_per_packet
                if best and best.cpu_us_per_packet > 0  # zero ticks: not measurable
                else None,
            }
        )
    naive = next((r for r in rows if r["contender"] == NAIVE), None)
    for row in rows:
        row["ratio_to_naive"] = (
            row["viewers_per_core"] / naive["viewers_per_core"]
            if naive and naive["viewers_per_core"] and row["viewers_per_core"]
            else None
        )
    return rows


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def summary_line(row: dict[str, Any]) -> str:
    return (
        f"{row['contender']:<19}{row['holding']:>8}{_cell(row['cpu_us_per_packet'], 8, 2)}"
        f"{_cell(row['viewers_per_core'], 13, 1)}{_cell(row['kbps_per_viewer'], 10, 0)}"
        f"{_cell(row['server_cores'], 10, 2)}{_cell(row['loadgen_cores'], 10, 2)}"
        f"{_cell(row['fraction_of_limit'], 8, 2)}{_cell(row['ratio_to_naive'], 8, 1)}"
    )


def target_lines(
    rows: Sequence[dict[str, Any]], stream: Stream, limit_us_per_packet: float | None = None
) -> list[str]:
    lines = []
    for row in rows:
        if row["contender"] == NAIVE:
            continue
        if row["viewers_per_core"] is None or row["viewers_per_core_at_target_rate"] is None:
            lines.append(
                f"target, {row['contender']}: not measured (no server CPU time in the window:"
                " its processes were gone or their CPU clocks unreadable)"
            )
            continue
        checks = [
            ("viewers/core", row["viewers_per_core"], TARGET_VIEWERS_PER_CORE, ".0f"),
            ("÷limit", row["fraction_of_limit"], TARGET_FRACTION_OF_LIMIT, ".2f"),
            ("÷naive", row["ratio_to_naive"], TARGET_RATIO_TO_NAIVE, ".1f"),
        ]
        parts = [
            f"{label} {'-' if value is None else format(value, spec)} "
            f"(target >= {format(target, spec)}: "
            f"{'n/a' if value is None else 'met' if value >= target else 'MISSED'})"
            for label, value, target, spec in checks
        ]
        rate = f"{stream.size} at {stream.bitrate // 1000} kbit/s"
        lines.append(f"target, {row['contender']} ({rate}): " + "; ".join(parts))
        lines.append(
            f"  measured stream: {row['packets_per_viewer_second']:.0f} packets/s per viewer; "
            f"at the {TARGET_PACKETS_PER_VIEWER} packets/s the viewers/core target assumes, "
            f"{row['cpu_us_per_packet']:.2f} µs/packet is "
            f"{row['viewers_per_core_at_target_rate']:.0f} viewers per core"
        )
        if limit_us_per_packet:
            rate = row["packets_per_viewer_second"]
            lines.append(
                f"  the loopback limit itself carries {1e6 / limit_us_per_packet / rate:.0f} "
                f"viewers of this stream per core; whepfan's default admission budget "
                f"(0.7 of it) admits {0.7e6 / limit_us_per_packet / rate:.0f} per worker"
            )
    return lines


def storm_line(storm: Storm) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    span = "-" if storm.all_media_after_s is None else f"{storm.all_media_after_s:.1f} s"
    return (
        f"join storm, {storm.contender}: {storm.viewers} viewers within "
        f"{storm.window_seconds:g} s: {storm.connected} connected, {storm.failed} failed; "
        f"POST -> first keyframe p50 {ms(storm.first_frame_p50_ms)} p99 "
        f"{ms(storm.first_frame_p99_ms)} (first RTP p50 {ms(storm.first_rtp_p50_ms)} p99 "
        f"{ms(storm.first_rtp_p99_ms)}); all had media {span} after the first POST"
    )


# --- main ------------------------------------------------------------------------------


def _counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")])
    )
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="whepfan worker counts to run")
    parser.add_argument(
        "--gso",
        default="on,off",
        help="whepfan --gso modes to run side by side, each with every worker count",
    )
    # 2 and 5 place the naive SFU's limit (it transcodes: a core holds a handful).
    parser.add_argument("--viewers", default="1,2,5,10,100,400,800,1000,1100,1200,1400,1600")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds at each step")
    parser.add_argument("--ramp", type=float, default=100.0, help="viewers started per second")
    parser.add_argument("--no-naive", dest="naive", action="store_false")
    parser.add_argument("--storm", type=int, default=1000, help="join storm viewers (0: none)")
    parser.add_argument("--storm-window", type=float, default=10.0)
    parser.add_argument("--storm-hold", type=float, default=5.0)
    parser.add_argument("--storm-workers", type=int, help="default: the largest of --workers")
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--bitrate", type=int, default=1_500_000)
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=10.0,
        help="the load generator's poll interval (0: woken per datagram, as before)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not give a one-process server a core of its own",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (< 60 s)")
    args = parser.parse_args(argv)
    calibration_packets = 200_000
    if args.smoke:
        args.workers, args.viewers, args.hold, args.ramp = "1", "1,2", 4.0, 20.0
        args.gso = "auto"
        args.storm, args.storm_window, args.storm_hold = 6, 1.0, 1.0
        args.size, args.bitrate = "320x240", 300_000
        calibration_packets = 20_000
    stream = Stream(size=args.size, bitrate=args.bitrate)
    worker_counts = _counts(args.workers)
    global SERVER_CPUS, LOAD_CPUS
    available = sorted(os.sched_getaffinity(0))
    if args.pin and len(available) >= 2:
        SERVER_CPUS, LOAD_CPUS = {available[0]}, set(available[1:])

    host = machine()
    print(
        f"machine: {host['cpu']}, {host['cores']} cores, Linux {host['kernel']}, Python "
        f"{host['python']}; load average {host['load_average']:.2f}; {host['date']}",
        flush=True,
    )
    if SERVER_CPUS is not None:
        print(
            f"pinned: a one-process server and the limit on CPU {sorted(SERVER_CPUS)}, "
            f"publisher and load generator on CPUs {sorted(LOAD_CPUS or ())}; "
            f"multi-worker servers unpinned",
            flush=True,
        )
    own_cpus = os.sched_getaffinity(0)
    if SERVER_CPUS is not None:
        os.sched_setaffinity(0, SERVER_CPUS)  # the limit is measured on the server's core
    try:
        limit = calibrate(packets=calibration_packets)
    finally:
        os.sched_setaffinity(0, own_cpus)
    limit_us = limit.cpu_seconds_per_packet * 1e6
    print(
        f"loopback limit (whepfan calibrate): {limit_us:.2f} CPU µs per packet, "
        f"{limit.packets_per_cpu_second:,.0f} packets per CPU second",
        flush=True,
    )
    print(f"stream: {stream.size} VP8 at {stream.bitrate // 1000} kbit/s + Opus", flush=True)

    gso_modes = [mode for mode in args.gso.split(",") if mode]
    if not gso_modes or any(mode not in ("on", "off", "auto") for mode in gso_modes):
        parser.error("--gso is a comma-separated list of on, off, auto")
    servers: list[tuple[str, Any]] = [
        (f"whepfan {w} {mode}", lambda w=w, mode=mode: WhepfanServer(w, mode))
        for w in worker_counts
        for mode in gso_modes
    ]
    if args.naive:
        servers.append((NAIVE, lambda: NaiveServer(stream.bitrate)))
    steps: list[Step] = []
    print(STEP_HEADER, flush=True)
    for _, start in servers:
        with deployment(start(), stream) as server:
            mine: list[Step] = []
            for viewers in _counts(args.viewers):
                try:
                    step = run_step(
                        server, viewers, ramp=args.ramp, hold=args.hold, poll_ms=args.poll_ms
                    )
                except RuntimeError as exc:  # the load generator died: nothing to measure
                    print(f"{server.name}: {viewers} viewers: {exc}; larger steps not run")
                    break
                mine.append(step)
                print(step_line(step), flush=True)
                if overloaded(step, mine[0]):
                    print(f"{server.name}: overloaded at {viewers} viewers, larger steps not run",
                          flush=True)  # fmt: skip
                    break
            steps += mine

    storm: Storm | None = None
    if args.storm > 0:
        workers = args.storm_workers or max(worker_counts, default=1)
        with deployment(WhepfanServer(workers), stream) as server:
            storm = run_storm(
                server,
                args.storm,
                window=args.storm_window,
                hold=args.storm_hold,
                poll_ms=args.poll_ms,
            )

    rows = summarize(steps, limit_us)
    print()
    print(f"largest viewer count holding < {LOSS_LIMIT_PERCENT} % loss at full rate for "
          f"{args.hold:g} s, side by side:")  # fmt: skip
    print(SUMMARY_HEADER)
    for row in rows:
        print(summary_line(row))
    for line in target_lines(rows, stream, limit_us):
        print(line)
    if storm is not None:
        print(storm_line(storm))
        if storm.errors:
            print("storm errors: " + "; ".join(f"{e} x{n}" for e, n in storm.errors.items()))
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "machine": host,
                    "stream": asdict(stream),
                    "hold_seconds": args.hold,
                    "poll_ms": args.poll_ms,
                    "server_cpus": sorted(SERVER_CPUS) if SERVER_CPUS else None,
                    "load_cpus": sorted(LOAD_CPUS) if LOAD_CPUS else None,
                    "limit_us_per_packet": limit_us,
                    "steps": [s.as_dict() for s in steps],
                    "summary": rows,
                    "storm": asdict(storm) if storm else None,
                },
                handle,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
