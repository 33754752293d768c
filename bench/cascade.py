"""Cascade: what an edge adds (issue 18). Origin -> edge A -> edge B, all ``whepfan
serve`` processes on this machine, with measuring viewers on all three in the same run.

* **Added latency per hop.** The same RTP packet (told apart by the end of its payload,
  which no hop rewrites) arrives at a viewer of the origin, of edge A and of edge B; per
  packet, A - origin is hop 1 and B - A is hop 2.
  Arrival times are the kernel's receive timestamps (SO_TIMESTAMPNS) of the viewers'
  sockets, all in this process. p50 and p99 over every video packet of the run.
* **CPU of one upstream pull against one local viewer**, on edge A: its CPU/s idle, then
  with its upstream and one viewer, then with ``--viewers`` more. The pull costs
  (CPU with 1 viewer - idle) - one viewer; one viewer costs the slope of the last step.
* **Cold edge: POST -> first keyframe.** A viewer POSTs to an edge holding no upstream
  (``--upstream-grace`` short, each round waits for the release); the time until its first
  keyframe includes the upstream's signalling, ICE, DTLS and a PLI through the origin.

Targets (issue 18): hop p99 < 5 ms on loopback; cold POST -> keyframe p50 < 600 ms.
Reported, never asserted. ``--smoke`` runs a few seconds of each for the CI smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from whepfan import _fastpath
from whepfan.client.peer import (
    ClientTransport,
    LocalParameters,
    TransportConnected,
    host_candidate,
    new_ice_credentials,
    viewer_offer,
)
from whepfan.client.publisher import Publisher, PublisherOptions
from whepfan.client.signalling import delete_session, post_offer
from whepfan.protocol import codecs
from whepfan.protocol.demux import is_rtcp
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.protocol.negotiation import remote_transport
from whepfan.protocol.sdp import SessionDescription

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:  # the helper beside this file, after everything else
    sys.path.append(BENCH)
from _cpu import process_cpu_seconds, stat_cpu_seconds  # noqa: E402

TOKEN = "cascade-bench"
STREAM = "cascade"
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("qq")


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    seconds = process_cpu_seconds(pid)
    if seconds is not None:
        return seconds
    with open(f"/proc/{pid}/stat") as handle:
        return stat_cpu_seconds(handle.read().rsplit(")", 1)[1].split())


class Node:
    """One ``whepfan serve``; ``upstream`` makes it an edge of that node."""

    def __init__(self, name: str, upstream: Node | None, grace: float) -> None:
        self.name = name
        port = _free_port(socket.SOCK_STREAM)
        self.url = f"http://127.0.0.1:{port}"
        args = [
            sys.executable, "-m", "whepfan.cli", "serve",
            "--http", f"127.0.0.1:{port}",
            "--udp", f"127.0.0.1:{_free_port(socket.SOCK_DGRAM)}",
            "--public-ip", "127.0.0.1", "--publish-token", TOKEN,
            "--log-level", "warning", "--worker-packet-budget", "none",
        ]  # fmt: skip
        if upstream is not None:
            args += ["--upstream", f"{upstream.url}/whep/{{stream}}"]
            args += ["--upstream-grace", str(grace)]
        self.process = subprocess.Popen(args)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/metrics", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"{name} did not start") from None
                time.sleep(0.2)

    def pulls(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/api/cluster", timeout=2) as response:
            document: dict[str, Any] = orjson.loads(response.read())
        return dict(document["pulls"])

    def close(self) -> None:
        self.process.send_signal(2)  # SIGINT: stop at once
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass(eq=False)
class Viewer:
    """A WHEP viewer that unprotects SRTP in this process and notes, per video sequence
    packet, the kernel's arrival time; and when the first keyframe came."""

    url: str
    certificate: DtlsCertificate
    arrivals: dict[bytes, float] = field(default_factory=dict)
    posted_at: float = 0.0
    first_keyframe_at: float | None = None
    location: str | None = None
    video_pt: int | None = None
    video_codec: str = "VP8"

    async def start(self, http: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        ufrag, pwd = new_ice_credentials()
        local = LocalParameters(
            ice_ufrag=ufrag,
            ice_pwd=pwd,
            fingerprints=self.certificate.fingerprints,
            candidate=host_candidate("127.0.0.1", self.sock.getsockname()[1]),
        )
        self.posted_at = time.time()
        result = await post_offer(http, self.url, viewer_offer(local), token=None)
        if result.status != 201 or result.answer is None:
            raise RuntimeError(f"{self.url}: {result.status} {result.detail}")
        self.location = result.location
        answer = SessionDescription.parse(result.answer)
        for section in answer.media:
            if section.kind == "video" and section.codecs:
                self.video_pt = section.codecs[0].payload_type
                self.video_codec = section.codecs[0].name
        remote = remote_transport(answer)
        self.transport = ClientTransport(
            certificate=self.certificate,
            local_ufrag=ufrag,
            local_pwd=pwd,
            remote=remote,
            dtls_role="client" if remote.setup == "passive" else "server",
        )
        self.srtp: _fastpath.SrtpSession | None = None
        self.transport.start(loop.time())
        loop.add_reader(self.sock.fileno(), self._readable)
        self._timer: asyncio.TimerHandle | None = None
        self._pump()

    def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, ancillary, _, addr = self.sock.recvmsg(2048, 64)
            except BlockingIOError:
                break
            arrived = time.time()
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanos = _TIMESPEC.unpack(value[: _TIMESPEC.size])
                    arrived = seconds + nanos / 1e9
            media = self.transport.receive(data, addr, loop.time())
            if media is not None and self.srtp is not None and not is_rtcp(media):
                self._rtp(media, arrived)
        self._pump()

    def _rtp(self, data: bytes, arrived: float) -> None:
        assert self.srtp is not None
        try:
            plain = self.srtp.unprotect(data)
        except _fastpath.SrtpError:
            return
        if (plain[1] & 0x7F) != self.video_pt:
            return
        # Each viewer's sequence numbers and timestamps are its own (the fan-out rewrites
        # them per viewer); the end of the payload is the encoder's, the same everywhere.
        self.arrivals.setdefault(bytes(plain[-24:]), arrived)
        if self.first_keyframe_at is None:
            header = 12 + 4 * (plain[0] & 0x0F)
            if plain[0] & 0x10:
                length = int.from_bytes(plain[header + 2 : header + 4], "big")
                header += 4 + 4 * length
            if codecs.is_keyframe_start(self.video_codec, bytes(plain[header:])):
                self.first_keyframe_at = arrived

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        for datagram, address in self.transport.datagrams_to_send():
            with contextlib.suppress(OSError):
                self.sock.sendto(datagram, address[:2])
        while (event := self.transport.next_event()) is not None:
            if isinstance(event, TransportConnected):
                keys = event.keys
                self.srtp = _fastpath.SrtpSession(keys.profile, keys.remote_key, keys.remote_salt)
        if self._timer is not None:
            self._timer.cancel()
        deadline = self.transport.get_timer()
        self._timer = None if deadline is None else loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.transport.handle_timer(asyncio.get_running_loop().time())
        self._pump()

    async def close(self, http: aiohttp.ClientSession) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
        self.sock.close()
        if self.location is not None:
            await delete_session(http, self.location)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def hop(upper: Viewer, lower: Viewer) -> dict[str, float]:
    deltas = [
        (lower.arrivals[seq] - arrived) * 1000
        for seq, arrived in upper.arrivals.items()
        if seq in lower.arrivals
    ]
    if not deltas:
        return {"packets": 0}
    return {
        "packets": len(deltas),
        "p50_ms": percentile(deltas, 0.5),
        "p99_ms": percentile(deltas, 0.99),
        "max_ms": max(deltas),
    }


async def cpu_rate(pid: int, seconds: float) -> float:
    before, started = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


async def run(options: argparse.Namespace) -> dict[str, Any]:
    grace = 0.5
    origin = Node("origin", None, grace)
    edge_a = Node("edge A", origin, grace)
    edge_b = Node("edge B", edge_a, grace)
    certificate = DtlsCertificate.generate()
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load": os.getloadavg()}}
    try:
        publisher = Publisher(
            PublisherOptions(
                url=f"{origin.url}/whip/{STREAM}",
                token=TOKEN,
                width=640,
                height=360,
                bitrate=1_500_000,
                keyframe_interval=10.0,
            )
        )
        async with aiohttp.ClientSession() as http, publisher:
            await asyncio.sleep(0.5)
            # CPU of edge A before it pulls anything.
            idle = await cpu_rate(edge_a.process.pid, options.cpu_window)
            viewers = [
                Viewer(f"{node.url}/whep/{STREAM}", certificate)
                for node in (origin, edge_a, edge_b)
            ]
            for viewer in viewers:
                await viewer.start(http)
            await asyncio.sleep(1.0)
            one = await cpu_rate(edge_a.process.pid, options.cpu_window)
            extra = [
                Viewer(f"{edge_a.url}/whep/{STREAM}", certificate) for _ in range(options.viewers)
            ]
            for viewer in extra:
                await viewer.start(http)
            await asyncio.sleep(1.0)
            many = await cpu_rate(edge_a.process.pid, options.cpu_window)
            await asyncio.sleep(max(options.duration - 3 * options.cpu_window, 0))
            per_viewer = (many - one) / options.viewers
            report["cpu"] = {
                "edge_idle_cpu_per_s": idle,
                "edge_one_viewer_cpu_per_s": one,
                f"edge_{options.viewers + 1}_viewers_cpu_per_s": many,
                "one_local_viewer_cpu_per_s": per_viewer,
                "one_upstream_pull_cpu_per_s": one - idle - per_viewer,
            }
            report["hops"] = {
                "origin->edge A": hop(viewers[0], viewers[1]),
                "edge A->edge B": hop(viewers[1], viewers[2]),
            }
            for viewer in extra + viewers[1:]:
                await viewer.close(http)
            # Cold edge B: no upstream, each round.
            cold: list[float] = []
            for _ in range(options.cold_rounds):
                deadline = time.monotonic() + 15
                while (edge_b.pulls() or edge_a.pulls()) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                viewer = Viewer(f"{edge_b.url}/whep/{STREAM}", certificate)
                await viewer.start(http)
                deadline = time.monotonic() + 10
                while viewer.first_keyframe_at is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                if viewer.first_keyframe_at is not None:
                    cold.append((viewer.first_keyframe_at - viewer.posted_at) * 1000)
                await viewer.close(http)
            report["cold_edge_post_to_keyframe_ms"] = {
                "rounds": len(cold),
                "p50": statistics.median(cold) if cold else None,
                "max": max(cold) if cold else None,
                "all": [round(value, 1) for value in cold],
            }
            await viewers[0].close(http)
    finally:
        for node in (edge_b, edge_a, origin):
            node.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--viewers", type=int, default=20, help="extra viewers on edge A")
    parser.add_argument("--cpu-window", type=float, default=4.0)
    parser.add_argument("--cold-rounds", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--smoke", action="store_true", help="a few seconds of each")
    options = parser.parse_args(argv)
    if options.smoke:
        options.duration, options.viewers, options.cpu_window, options.cold_rounds = 4, 3, 1, 1
    report = asyncio.run(run(options))
    for name, figures in report["hops"].items():
        if figures.get("packets"):
            print(
                f"hop {name:<16} {figures['packets']:>6} packets  p50 {figures['p50_ms']:.2f} ms"
                f"  p99 {figures['p99_ms']:.2f} ms  (target p99 < 5 ms)"
            )
        else:
            print(f"hop {name:<16} no packets matched")
    cpu = report["cpu"]
    print(
        f"edge CPU: one upstream pull {cpu['one_upstream_pull_cpu_per_s'] * 100:.2f} % of a core,"
        f" one local viewer {cpu['one_local_viewer_cpu_per_s'] * 100:.2f} %"
    )
    cold = report["cold_edge_post_to_keyframe_ms"]
    if cold["p50"] is not None:
        print(
            f"cold edge POST -> first keyframe: p50 {cold['p50']:.0f} ms over {cold['rounds']}"
            f" rounds, max {cold['max']:.0f} ms (target p50 < 600 ms)"
        )
    print(f"machine: {report['machine']}")
    if options.json:
        with open(options.json, "wb") as handle:
            handle.write(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
