"""The upstream-repair test's network (tests/test_upstream_repair.py): a publisher behind a
link that drops a random share of its UDP datagrams, and viewers behind another.

Two network namespaces joined by a veth pair (198.18.5.0/24, RFC 2544 benchmarking range:
never routed; nothing in either namespace reaches the outside network)::

    server namespace  198.18.5.1                          publisher namespace  198.18.5.2
      whepfan serve  HTTP :8080, media UDP :8189  <-- WHIP --  aiortc publisher (VP8 + RTX)
      aiortc viewers (on lo: the viewers' link)                iptables OUTPUT udp:
      iptables OUTPUT -o lo udp: random DROP                   random DROP (the publisher's link)

This kernel has no netem, so loss is iptables' ``statistic`` match (``--mode random
--probability p``), in front of which an unconditional rule counts every datagram, so the
loss actually applied can be read back. Only UDP is dropped: signalling (HTTP) is TCP.

Run as a script inside a namespace it is one of the peers:

* ``python tests/_lossy_link.py publish URL TOKEN``: the aiortc publisher of the moving
  pattern (tests/_peers.py), until SIGTERM.
* ``python tests/_lossy_link.py view URL METRICS_URL --viewers N --seconds S``: N aiortc
  viewers; for each, how many of the publisher's pictures in S seconds of media time
  after its first decoded one it decoded; plus the server's repair counters over the
  run. One JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

SERVER_ADDRESS = "198.18.5.1"
PUBLISHER_ADDRESS = "198.18.5.2"
HTTP_PORT = 8080
MEDIA_PORT = 8189
PUBLISH_TOKEN = "lossy-publish-token"
VIDEO_CLOCK = 90000
NEEDS = (
    "the upstream repair test needs root (ip netns, iptables) with the iptables "
    "statistic match: apt-get install -y iproute2 iptables"
)


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"`{' '.join(argv)}` failed ({result.stderr.strip()}); {NEEDS}", pytrace=False)
    return result.stdout


@dataclass(frozen=True)
class Namespace:
    name: str

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


@dataclass(frozen=True)
class LossyNetwork:
    """The two namespaces above; ``delete()`` removes both (and every rule in them)."""

    server: Namespace
    publisher: Namespace

    @classmethod
    def create(cls, prefix: str) -> LossyNetwork:
        for tool in ("ip", "iptables"):
            if shutil.which(tool) is None:
                pytest.fail(f"`{tool}` is missing; {NEEDS}", pytrace=False)
        network = cls(Namespace(f"{prefix}-srv"), Namespace(f"{prefix}-pub"))
        network.delete()
        for namespace in (network.server, network.publisher):
            _run(["ip", "netns", "add", namespace.name])
        server, publisher = network.server.name, network.publisher.name
        for command in (
            f"ip -n {server} link add vs type veth peer name vp netns {publisher}",
            f"ip -n {server} addr add {SERVER_ADDRESS}/24 dev vs",
            f"ip -n {publisher} addr add {PUBLISHER_ADDRESS}/24 dev vp",
            f"ip -n {server} link set vs up",
            f"ip -n {publisher} link set vp up",
            f"ip -n {server} link set lo up",
            f"ip -n {publisher} link set lo up",
        ):
            _run(command.split())
        return network

    def _link(self, which: str) -> tuple[Namespace, list[str]]:
        # The viewers and the server share the server namespace: their datagrams cross lo
        # (both ways, each once through OUTPUT); the publisher's leave through its veth.
        if which == "publisher":
            return self.publisher, ["-p", "udp"]
        return self.server, ["-o", "lo", "-p", "udp"]

    def set_loss(self, which: str, probability: float) -> None:
        """``which`` ("publisher" or "viewers") drops ``probability`` of its UDP
        datagrams from now on (0: none); the link's counters start from zero."""
        namespace, match = self._link(which)
        _run(namespace.command("iptables", "-F", "OUTPUT"))
        _run(namespace.command("iptables", "-Z", "OUTPUT"))
        _run(namespace.command("iptables", "-A", "OUTPUT", *match))  # counts everything
        if probability > 0:
            _run(
                namespace.command(
                    "iptables",
                    "-A",
                    "OUTPUT",
                    *match,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    str(probability),
                    "-j",
                    "DROP",
                )
            )

    def loss(self, which: str) -> tuple[int, int]:
        """(datagrams dropped, datagrams sent) on the link since its last ``set_loss``."""
        namespace, _ = self._link(which)
        listing = _run(namespace.command("iptables", "-L", "OUTPUT", "-v", "-x", "-n"))
        rules = [line.split() for line in listing.splitlines()[2:] if line.strip()]
        sent = int(rules[0][0])
        dropped = sum(int(rule[0]) for rule in rules[1:] if rule[2] == "DROP")
        return dropped, sent

    def delete(self) -> None:
        for namespace in (self.server, self.publisher):
            subprocess.run(["ip", "netns", "del", namespace.name], capture_output=True, check=False)


def server_url() -> str:
    return f"http://{SERVER_ADDRESS}:{HTTP_PORT}"


def whepfan_serve_argv(network: LossyNetwork) -> list[str]:
    return network.server.command(
        sys.executable,
        "-m",
        "whepfan.cli",
        "serve",
        "--http",
        f"{SERVER_ADDRESS}:{HTTP_PORT}",
        "--allow-insecure-http",  # a private namespace: no one else can listen
        "--udp",
        f"{SERVER_ADDRESS}:{MEDIA_PORT}",
        "--public-ip",
        SERVER_ADDRESS,
        "--publish-token",
        PUBLISH_TOKEN,
    )


def publisher_argv(network: LossyNetwork, stream: str) -> list[str]:
    return network.publisher.command(
        sys.executable,
        str(Path(__file__)),
        "publish",
        f"{server_url()}/whip/{stream}",
        PUBLISH_TOKEN,
    )


def view(network: LossyNetwork, stream: str, *, viewers: int, seconds: float) -> dict[str, Any]:
    """Run the viewers in the server namespace; what they printed."""
    result = subprocess.run(
        network.server.command(
            sys.executable,
            str(Path(__file__)),
            "view",
            f"{server_url()}/whep/{stream}",
            f"{server_url()}/metrics",
            "--viewers",
            str(viewers),
            "--seconds",
            str(seconds),
        ),
        capture_output=True,
        text=True,
        timeout=seconds * 4 + 60,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, f"the viewers failed:\n{result.stderr[-4000:]}"
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


# --- the peers (run inside a namespace) ----------------------------------------------------


async def _publish(url: str, token: str) -> None:
    import aiohttp
    from _peers import accept_answer, sending_peer, wait_until

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    pc = await sending_peer(video=True, audio=False)
    headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=pc.localDescription.sdp, headers=headers) as response,
    ):
        assert response.status == 201, await response.text()
        answer = await response.text()
    await accept_answer(pc, answer)
    # Connected (ICE + DTLS) means media flows: the viewers may start.
    assert await wait_until(lambda: pc.connectionState == "connected", 60.0), pc.connectionState
    print("publishing", flush=True)
    await stop.wait()
    await pc.close()


_REPAIR_SAMPLES = {
    "whepfan_upstream_nacks_total": "outcome",
    "whepfan_nacked_packets_total": None,
    "whepfan_retransmissions_total": None,
    "whepfan_retransmission_misses_total": None,
    "whepfan_keyframe_requests_total": "outcome",
}


async def _repair_counters(http: Any, url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with http.get(url) as response:
        text = await response.text()
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _REPAIR_SAMPLES:
                label = _REPAIR_SAMPLES[sample.name]
                key = sample.name + (f":{sample.labels[label]}" if label else "")
                counters[key] = counters.get(key, 0.0) + sample.value
    return counters


def _pictures_in_window(timestamps: list[int], seconds: float) -> int:
    """Distinct RTP timestamps (pictures, RFC 3550 §5.1) from the first decoded one to
    ``seconds`` of media time later: the publisher's pattern stamps frame i at i * 3000,
    so a loss-free viewer counts 30 per second whatever the machine's load."""
    if not timestamps:
        return 0
    first = timestamps[0]
    span = int(seconds * VIDEO_CLOCK)
    return len({ts for ts in timestamps if (ts - first) % 2**32 < span})


def _pts(frame: Any) -> int:
    """A decoded picture's RTP timestamp (aiortc gives it to the decoder as the pts)."""
    assert frame.pts is not None
    return int(frame.pts)


async def _view_one(http: Any, url: str, seconds: float) -> dict[str, Any]:
    import time

    from _peers import DecodingViewer, wait_until

    viewer = DecodingViewer()
    offer = await viewer.offer(["video"])
    async with http.post(url, data=offer, headers={"Content-Type": "application/sdp"}) as response:
        assert response.status == 201, await response.text()
        answer = await response.text()
    await viewer.accept(answer)
    try:
        assert await wait_until(lambda: viewer.first_frame_at is not None, 30.0), "no frame"
        first = _pts(viewer.video_frames[0])
        span = int(seconds * VIDEO_CLOCK)

        def past_window() -> bool:
            return any((_pts(f) - first) % 2**32 >= span for f in viewer.video_frames[-5:])

        # Media time, not wall time: wait until a picture past the window decoded (a
        # loaded machine may lag), or give up after twice the window.
        await wait_until(past_window, seconds * 2 + 5)
        started = viewer.first_frame_at or time.monotonic()
        timestamps = [_pts(f) for f in viewer.video_frames]
        return {
            "pictures": _pictures_in_window(timestamps, seconds),
            "decoded": len(timestamps),
            "wall_seconds": round(time.monotonic() - started, 2),
        }
    finally:
        await viewer.close()


async def _view(url: str, metrics_url: str, viewers: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        before = await _repair_counters(http, metrics_url)
        results = await asyncio.gather(*(_view_one(http, url, seconds) for _ in range(viewers)))
        after = await _repair_counters(http, metrics_url)
    return {
        "viewers": list(results),
        "expected": int(seconds * VIDEO_CLOCK) // 3000,
        "server": {key: after[key] - before.get(key, 0.0) for key in sorted(after)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="a peer of the upstream repair test")
    commands = parser.add_subparsers(dest="command", required=True)
    publish = commands.add_parser("publish")
    publish.add_argument("url")
    publish.add_argument("token")
    viewing = commands.add_parser("view")
    viewing.add_argument("url")
    viewing.add_argument("metrics_url")
    viewing.add_argument("--viewers", type=int, default=2)
    viewing.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS_DIR))
    if args.command == "publish":
        asyncio.run(_publish(args.url, args.token))
    else:
        report = asyncio.run(_view(args.url, args.metrics_url, args.viewers, args.seconds))
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
