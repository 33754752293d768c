"""The naive Python SFU that ``bench/capacity.py`` measures whepfan against (issue 8).

It is built the way the aiortc examples build a relay, and deliberately not optimised:

- ``POST /whip/<stream>``: one publisher, received by an aiortc ``RTCPeerConnection``.
  aiortc decodes what it receives (VP8/H264 to frames, Opus to samples).
- ``POST /whep/<stream>``: one ``RTCPeerConnection`` per viewer, each sender fed by
  ``MediaRelay.subscribe(track, buffered=False)``, so every viewer gets its own encoder
  (libvpx / Opus) running on the relayed frames, and its own Python ICE/DTLS/SRTP stack.
- ``DELETE`` on the ``Location`` of either ends that session.

Answers carry every candidate (aiortc's ``setLocalDescription`` waits for ICE gathering),
``iceServers=[]``, and everything stays on 127.0.0.1: aioice skips loopback addresses
when it gathers host candidates, so this process, and only this process, replaces its
host-address lookup with 127.0.0.1.

aiortc's VP8 encoder starts at 500 kbit/s and moves only on REMB (RFC draft-alvestrand-
rmcat-remb), which ``whepfan loadtest`` does not send; ``--video-bitrate`` (default the
benchmark's 1.5 Mbit/s) sets the starting rate so both servers deliver the same stream.

    python bench/naive_sfu.py --http 127.0.0.1:8090
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal
import sys

import aioice.ice
import aiortc.codecs.vpx
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaBlackhole, MediaRelay
from aiortc.mediastreams import MediaStreamTrack

log = logging.getLogger("naive_sfu")


def _loopback_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"]


class NaiveSfu:
    """One stream: a publisher's tracks relayed to an ``RTCPeerConnection`` per viewer."""

    def __init__(self) -> None:
        self.relay = MediaRelay()
        self.publisher: RTCPeerConnection | None = None
        self.publisher_id: str | None = None
        self.tracks: dict[str, MediaStreamTrack] = {}
        self.viewers: dict[str, RTCPeerConnection] = {}
        # Without a consumer, aiortc's received-frame queue grows without bound while no
        # viewer watches; a blackhole subscriber keeps the relay draining it.
        self.blackhole = MediaBlackhole()
        self._ids = itertools.count(1)

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/whip/{stream}", self.whip)
        app.router.add_delete("/whip/{stream}/{session}", self.end_publisher)
        app.router.add_post("/whep/{stream}", self.whep)
        app.router.add_delete("/whep/{stream}/{session}", self.end_viewer)
        app.router.add_get("/status", self.status)
        app.on_shutdown.append(self._close_all)
        return app

    @staticmethod
    def _peer_connection() -> RTCPeerConnection:
        return RTCPeerConnection(RTCConfiguration(iceServers=[]))

    @staticmethod
    def _created(pc: RTCPeerConnection, location: str) -> web.Response:
        return web.Response(
            status=201,
            text=pc.localDescription.sdp,
            content_type="application/sdp",
            headers={"Location": location},
        )

    async def whip(self, request: web.Request) -> web.Response:
        if self.publisher is not None:
            return web.Response(status=409, text="a publisher is live")
        pc = self._peer_connection()
        session = f"p{next(self._ids)}"
        self.publisher, self.publisher_id = pc, session

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self.tracks[track.kind] = track
            self.blackhole.addTrack(self.relay.subscribe(track, buffered=False))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and self.publisher is pc:
                await self._drop_publisher()

        await pc.setRemoteDescription(RTCSessionDescription(sdp=await request.text(), type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        await self.blackhole.start()
        log.info("publisher %s: tracks %s", session, sorted(self.tracks))
        return self._created(pc, f"/whip/{request.match_info['stream']}/{session}")

    async def _drop_publisher(self) -> None:
        pc, self.publisher, self.publisher_id = self.publisher, None, None
        self.tracks.clear()
        await self.blackhole.stop()
        self.blackhole = MediaBlackhole()
        if pc is not None:
            await pc.close()

    async def end_publisher(self, request: web.Request) -> web.Response:
        if request.match_info["session"] != self.publisher_id:
            return web.Response(status=404)
        await self._drop_publisher()
        return web.Response(status=200)

    async def whep(self, request: web.Request) -> web.Response:
        if not self.tracks:
            return web.Response(status=404, text="no publisher")
        pc = self._peer_connection()
        session = f"v{next(self._ids)}"
        self.viewers[session] = pc

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and self.viewers.get(session) is pc:
                del self.viewers[session]
                await pc.close()

        await pc.setRemoteDescription(RTCSessionDescription(sdp=await request.text(), type="offer"))
        for transceiver in pc.getTransceivers():
            source = self.tracks.get(transceiver.kind)
            if source is not None:
                transceiver.sender.replaceTrack(self.relay.subscribe(source, buffered=False))
                transceiver.direction = "sendonly"
        await pc.setLocalDescription(await pc.createAnswer())
        return self._created(pc, f"/whep/{request.match_info['stream']}/{session}")

    async def end_viewer(self, request: web.Request) -> web.Response:
        pc = self.viewers.pop(request.match_info["session"], None)
        if pc is None:
            return web.Response(status=404)
        await pc.close()
        return web.Response(status=200)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"publisher": self.publisher is not None, "viewers": len(self.viewers)}
        )

    async def _close_all(self, app: web.Application) -> None:
        for pc in list(self.viewers.values()):
            await pc.close()
        self.viewers.clear()
        await self._drop_publisher()


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(NaiveSfu().application())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0][1]
    print(f"naive SFU: WHIP on http://{host}:{bound}/whip/<stream>", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http", default="127.0.0.1:0", metavar="HOST:PORT")
    parser.add_argument("--video-bitrate", type=int, default=1_500_000, metavar="BPS")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    host, _, port = args.http.rpartition(":")
    logging.basicConfig(level=args.log_level.upper())
    aioice.ice.get_host_addresses = _loopback_host_addresses
    aiortc.codecs.vpx.DEFAULT_BITRATE = args.video_bitrate
    asyncio.run(serve(host or "127.0.0.1", int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
