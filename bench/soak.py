"""Soak (issue 15): many join/leave cycles against a live stream, and what they leave behind.

``whepfan serve`` runs as a process of its own on loopback, fed by ``whepfan publish`` (a
live stream), with ``whepfan loadtest`` holding a few steady viewers on it the whole
time. The soak then runs N cycles, ``--concurrency`` at a time: a WHEP POST of a recvonly
offer (whepfan's own client offer), then its DELETE. Every ``--handshake-every``-th cycle
is a whole viewer instead: whepfan's client stack (the load generator's viewer: ICE,
DTLS, SRTP in) connects, receives media, and leaves with DELETE.

Figures, sampled with the cycles paused (so they measure what stayed, not what is in
flight) after a warm-up and then every tenth of the run:

- RSS and open file descriptors of the server (the process and its workers, /proc);
- sessions: the server's viewer and publisher gauges (/metrics), which must come back
  to the steady viewers and the one publisher;
- event-loop lag: the median round trip of 20 no-op requests (GET on the WHIP endpoint,
  204, RFC 9725 §4.1) on an idle keep-alive connection: everything but the loop's own
  wait is loopback, and a loop that falls behind shows here first;
- the media still flowing: packets/s the server sends to viewers, between samples.

"Flat" means, from the sample after the warm-up to the last one: RSS within
``--rss-tolerance`` (10 %), fds within 8, the same sessions, lag within 2x or 10 ms (the
machine's load moves it by that much).

``--max-seconds S`` bounds the cycles after the warm-up by wall-clock time: when S have
passed, no new cycle starts, the last sample is taken at once and the run reports how
many of the requested cycles it ran and at what rate (a loaded machine's soak that must
fit a time slot). The verdict is the same, over the cycles that ran.

    python bench/soak.py                         # 10^5 cycles (~10-30 min)
    python bench/soak.py --smoke                 # 300 cycles, under a minute
    python bench/soak.py --cycles 20000 --json soak.json
    python bench/soak.py --max-seconds 1800      # 10^5 cycles or 30 min, whichever first
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from whepfan.client.loadtest import LoadTest, LoadTestOptions
from whepfan.client.peer import LocalParameters, host_candidate, new_ice_credentials, viewer_offer
from whepfan.protocol.dtls import DtlsCertificate

STREAM = "soak"
LAG_PROBES = 20


@dataclass(frozen=True, slots=True)
class Sample:
    cycles: int
    at: float  # seconds since the soak started
    rss_bytes: int
    fds: int
    processes: int
    viewers: float
    publishers: float
    lag_seconds: float
    sent_packets_per_second: float | None


@dataclass(slots=True)
class Tally:
    posted: int = 0
    created: int = 0
    deleted: int = 0
    refused: int = 0
    errors: int = 0
    handshakes: int = 0
    handshakes_received_media: int = 0
    handshake_outcomes: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------- the server's figures


def _process_tree(root: int) -> list[int]:
    """``root`` and its descendants (the worker processes of ``--workers N``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may hold spaces.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def _rss_and_fds(root: int) -> tuple[int, int, int]:
    rss = fds = 0
    pids = _process_tree(root)
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
            fds += len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds, len(pids)


def _metrics(text: str) -> dict[str, float]:
    wanted = {"whepfan_viewers", "whepfan_publishers", "whepfan_sent_packets_total"}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


# ---------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Deployment:
    """``whepfan serve``, ``whepfan publish`` and ``whepfan loadtest`` as processes."""

    def __init__(self, workdir: Path, *, workers: int, viewers: int) -> None:
        self.workdir = workdir
        self.token = secrets.token_urlsafe(16)
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.server = self._start(
            "serve",
            "serve",
            "--http",
            self.url.removeprefix("http://"),
            "--udp",
            "127.0.0.1:0",
            "--public-ip",
            "127.0.0.1",
            "--publish-token",
            self.token,
            "--workers",
            str(workers),
            "--worker-packet-budget",
            "none",
            "--log-level",
            "warning",
        )
        self.viewers = viewers

    def _start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "whepfan.cli", *args], stdout=output, stderr=output
            )
        self.processes.append(process)
        return process

    async def start(self, http: aiohttp.ClientSession) -> None:
        await _until_answers(http, f"{self.url}/whip/{STREAM}", self.server)
        self._start(
            "publish",
            "publish",
            f"{self.url}/whip/{STREAM}",
            "--token",
            self.token,
            "--size",
            "320x240",
            "--bitrate",
            "300k",
            "--log-level",
            "warning",
        )
        await self._until_live(http)
        if self.viewers:
            self._start(
                "loadtest",
                "loadtest",
                f"{self.url}/whep/{STREAM}",
                "--viewers",
                str(self.viewers),
                "--duration",
                str(10**6),
                "--quiet",
            )
            await self._until_viewers(http, self.viewers)

    async def _until_live(self, http: aiohttp.ClientSession) -> None:
        for _ in range(600):
            figures = await scrape(http, self.url)
            if figures.get("whepfan_publishers", 0) >= 1:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the publisher did not go live; see publish.log")

    async def _until_viewers(self, http: aiohttp.ClientSession, count: int) -> None:
        for _ in range(600):
            if (await scrape(http, self.url)).get("whepfan_viewers", 0) >= count:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the steady viewers did not connect; see loadtest.log")

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGINT if process is not self.server else signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


async def _until_answers(
    http: aiohttp.ClientSession, url: str, process: subprocess.Popen[bytes]
) -> None:
    for _ in range(1200):
        if process.poll() is not None:
            raise RuntimeError("whepfan serve exited; see serve.log")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(url) as response:
                if response.status < 500:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError("whepfan serve did not answer")


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as response:
        return _metrics(await response.text())


# ---------------------------------------------------------------------- the soak


class Soak:
    def __init__(
        self,
        deployment: Deployment,
        *,
        concurrency: int,
        handshake_every: int,
        max_seconds: float | None = None,
    ) -> None:
        self.deployment = deployment
        self.concurrency = concurrency
        self.handshake_every = handshake_every
        self.max_seconds = max_seconds
        self.tally = Tally()
        self.samples: list[Sample] = []
        self.certificate = DtlsCertificate.generate()
        ufrag, pwd = new_ice_credentials()
        local = LocalParameters(
            ice_ufrag=ufrag,
            ice_pwd=pwd,
            fingerprints=self.certificate.fingerprints,
            candidate=host_candidate("127.0.0.1", 9),
        )
        # One offer for the HTTP-only cycles: the server's work per POST is the same.
        self.offer = viewer_offer(local).encode()
        self.started = time.monotonic()
        self._cycles = 0
        self._last_sent: tuple[float, float] | None = None
        # After the warm-up: when the measured cycles began, and when none may start.
        self.measured_from: tuple[int, float] | None = None
        self.measured_until: float | None = None
        self._deadline: float | None = None

    @property
    def out_of_time(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    @property
    def measured_cycles(self) -> int:
        """Cycles run after the warm-up."""
        return 0 if self.measured_from is None else self._cycles - self.measured_from[0]

    @property
    def measured_rate(self) -> float:
        """Cycles per second after the warm-up, sampling pauses included."""
        if self.measured_from is None:
            return 0.0
        until = time.monotonic() if self.measured_until is None else self.measured_until
        return self.measured_cycles / max(1e-9, until - self.measured_from[1])

    async def run(self, http: aiohttp.ClientSession, cycles: int, warmup: int) -> None:
        await self._cycles_of(http, warmup)
        await self.sample(http)
        self.measured_from = (self._cycles, time.monotonic())
        if self.max_seconds is not None:
            self._deadline = time.monotonic() + self.max_seconds
        step = max(1, cycles // 10)
        done = 0
        while done < cycles and not self.out_of_time:
            await self._cycles_of(http, min(step, cycles - done))
            done = self.measured_cycles
            await self.sample(http)
        self.measured_until = time.monotonic()

    async def _cycles_of(self, http: aiohttp.ClientSession, count: int) -> None:
        queue = iter(range(self._cycles, self._cycles + count))

        async def worker() -> None:
            # Out of time: the cycles in flight finish, no new one starts.
            while not self.out_of_time and (index := next(queue, None)) is not None:
                self._cycles += 1
                if self.handshake_every and index % self.handshake_every == 0:
                    await self._handshake()
                else:
                    await self._post_and_delete(http)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    async def _post_and_delete(self, http: aiohttp.ClientSession) -> None:
        tally = self.tally
        tally.posted += 1
        url = f"{self.deployment.url}/whep/{STREAM}"
        try:
            async with http.post(
                url, data=self.offer, headers={"Content-Type": "application/sdp"}
            ) as response:
                await response.read()
                location = response.headers.get("Location")
                if response.status != 201 or location is None:
                    tally.refused += 1
                    return
            tally.created += 1
            async with http.delete(self.deployment.url + location) as response:
                await response.read()
                if response.status == 200:
                    tally.deleted += 1
        except (aiohttp.ClientError, OSError, TimeoutError):
            tally.errors += 1

    async def _handshake(self) -> None:
        """One whole viewer through whepfan's client stack: ICE, DTLS, media, DELETE."""
        self.tally.handshakes += 1
        options = LoadTestOptions(
            url=f"{self.deployment.url}/whep/{STREAM}", viewers=1, duration=1.0, ramp=1000
        )
        report = await LoadTest(options, certificate=self.certificate).run()
        if report.all_viewers_received_media:
            self.tally.handshakes_received_media += 1
        outcomes = self.tally.handshake_outcomes
        for viewer in report.viewers:
            outcome = str(viewer["outcome"])
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async def sample(self, http: aiohttp.ClientSession) -> Sample:
        # Let the server's once-a-second sweeps (ended sessions, stats) run first.
        await asyncio.sleep(2.0)
        lag = await _lag(http, f"{self.deployment.url}/whip/{STREAM}")
        figures = await scrape(http, self.deployment.url)
        rss, fds, processes = _rss_and_fds(self.deployment.server.pid)
        now = time.monotonic()
        sent = figures.get("whepfan_sent_packets_total", 0.0)
        rate = None
        if self._last_sent is not None:
            rate = (sent - self._last_sent[1]) / max(1e-9, now - self._last_sent[0])
        self._last_sent = (now, sent)
        sample = Sample(
            cycles=self._cycles,
            at=now - self.started,
            rss_bytes=rss,
            fds=fds,
            processes=processes,
            viewers=figures.get("whepfan_viewers", 0.0),
            publishers=figures.get("whepfan_publishers", 0.0),
            lag_seconds=lag,
            sent_packets_per_second=rate,
        )
        self.samples.append(sample)
        _print_sample(sample)
        return sample


async def _lag(http: aiohttp.ClientSession, url: str) -> float:
    rounds = []
    for _ in range(LAG_PROBES):
        started = time.perf_counter()
        async with http.get(url) as response:
            await response.read()
        rounds.append(time.perf_counter() - started)
    return statistics.median(rounds)


def _print_sample(sample: Sample) -> None:
    rate = (
        "-" if sample.sent_packets_per_second is None else f"{sample.sent_packets_per_second:.0f}"
    )
    print(
        f"{sample.cycles:>8} cycles {sample.at:7.1f} s  RSS {sample.rss_bytes / 2**20:7.1f} MiB  "
        f"fds {sample.fds:5}  viewers {sample.viewers:4.0f}  publishers {sample.publishers:.0f}  "
        f"lag {sample.lag_seconds * 1000:6.2f} ms  sent {rate} pkt/s",
        flush=True,
    )


def verdict(samples: list[Sample], *, rss_tolerance: float) -> dict[str, bool]:
    """Flat from the first sample (after the warm-up) to the last (module docstring)."""
    start, end = samples[0], samples[-1]
    return {
        "rss": end.rss_bytes <= start.rss_bytes * (1 + rss_tolerance),
        "fds": end.fds <= start.fds + 8,
        "sessions": (end.viewers, end.publishers) == (start.viewers, start.publishers),
        "lag": end.lag_seconds <= max(2 * start.lag_seconds, start.lag_seconds + 0.010),
    }


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="whepfan-soak-") as workdir:
        deployment = Deployment(Path(workdir), workers=args.workers, viewers=args.viewers)
        connector = aiohttp.TCPConnector(limit=args.concurrency + 4)
        timeout = aiohttp.ClientTimeout(total=30)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                await deployment.start(http)
                soak = Soak(
                    deployment,
                    concurrency=args.concurrency,
                    handshake_every=args.handshake_every,
                    max_seconds=args.max_seconds,
                )
                print(
                    f"soak: {args.cycles} cycles after {args.warmup} of warm-up, "
                    f"{args.concurrency} at a time, a whole viewer every "
                    f"{args.handshake_every or 'never'}; {args.viewers} steady viewers, "
                    f"{args.workers} worker(s)",
                    flush=True,
                )
                await soak.run(http, args.cycles, args.warmup)
        finally:
            deployment.close()
            logs = {
                p.name: p.read_text(errors="replace")[-2000:] for p in Path(workdir).glob("*.log")
            }
    flat = verdict(soak.samples, rss_tolerance=args.rss_tolerance)
    start, end = soak.samples[0], soak.samples[-1]
    shown = ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in flat.items())
    complete = soak.measured_cycles >= args.cycles
    print(
        f"ran {soak.measured_cycles} of {args.cycles} cycles after the warm-up "
        f"({soak.measured_rate:.1f}/s)"
        + ("" if complete else f": stopped by --max-seconds {args.max_seconds:g}"),
        flush=True,
    )
    print(
        f"start: RSS {start.rss_bytes / 2**20:.1f} MiB, fds {start.fds}, sessions "
        f"{start.viewers:.0f}+{start.publishers:.0f}, lag {start.lag_seconds * 1000:.2f} ms\n"
        f"end:   RSS {end.rss_bytes / 2**20:.1f} MiB, fds {end.fds}, sessions "
        f"{end.viewers:.0f}+{end.publishers:.0f}, lag {end.lag_seconds * 1000:.2f} ms\n"
        f"cycles: {asdict(soak.tally)}\n"
        f"flat: {shown}",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "options": vars(args),
                    "samples": [asdict(s) for s in soak.samples],
                    "tally": asdict(soak.tally),
                    "measured_cycles": soak.measured_cycles,
                    "cycles_per_second": soak.measured_rate,
                    "complete": complete,
                    "flat": flat,
                    "logs": logs,
                },
                indent=2,
            )
        )
    lost = soak.tally.errors or (soak.tally.handshakes_received_media < soak.tally.handshakes)
    return 0 if all(flat.values()) and not lost else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=2_000, help="cycles before the first sample")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--handshake-every",
        type=int,
        default=100,
        metavar="N",
        help="every Nth cycle is a whole viewer (ICE, DTLS, media); 0: HTTP only",
    )
    parser.add_argument("--viewers", type=int, default=4, help="steady viewers (whepfan loadtest)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rss-tolerance", type=float, default=0.10)
    parser.add_argument(
        "--max-seconds",
        type=float,
        metavar="S",
        help="start no cycle after S s past the warm-up; the run reports how many it ran",
    )
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--smoke", action="store_true", help="300 cycles, 100 of warm-up")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cycles, args.warmup, args.handshake_every = 300, 100, 50
    if args.cycles < 1 or args.warmup < 0 or args.concurrency < 1 or args.handshake_every < 0:
        parser.error("cycles and concurrency are at least 1; warm-up and handshake-every >= 0")
    if args.max_seconds is not None and not args.max_seconds > 0:
        parser.error("--max-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The deployment is stopped with SIGINT (whepfan publish DELETEs its session on it,
    # whepfan loadtest its viewers'). A shell starts a background job (`soak.py &`) with
    # SIGINT ignored, and an ignored signal stays ignored across execve (POSIX), so those
    # children never saw it: they were killed 30 s later, the publisher still retrying
    # against the stopped server and its session never DELETEd. A handled signal is reset
    # to its default across execve instead.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
