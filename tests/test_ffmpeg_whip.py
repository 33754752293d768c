"""FFmpeg's WHIP muxer publishes H264 + Opus to a running whepfan; an aiortc viewer decodes
it over WHEP.

The muxer is the one in PyAV's wheel (FFmpeg 8, DTLS on GnuTLS): it offers
``a=setup:passive``, so whepfan is the DTLS client, and it signs with a P-224
certificate, which whepfan used to refuse with "wrong curve" (see protocol/dtls.py).
It runs in its own process, as ``ffmpeg -f whip`` would: the muxer's handshake blocks
in C for as long as it takes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import av
import pytest
from _peers import DecodingViewer, only_loopback_candidates
from _server import TOKEN, LiveServer, live_server
from _signalling import exchange

pytestmark = pytest.mark.skipif(
    "whip" not in av.formats_available or not {"libx264", "libopus"} <= set(av.codecs_available),
    reason="this PyAV build has no WHIP muxer, libx264 or libopus",
)

WIDTH, HEIGHT, FPS = 320, 240, 30

# The publisher: a moving bar in H264 (baseline, no B-frames, a keyframe every half
# second so a viewer that joins late decodes at once) and silence in Opus, paced in real
# time until stdin closes; then out.close() sends the WHIP DELETE (RFC 9725 §4.3).
PUBLISHER = f"""
import fractions, sys, threading, time
import av, numpy as np

url, token = sys.argv[1], sys.argv[2]
av.logging.set_level(av.logging.ERROR)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
out = av.open(url, "w", format="whip", options={{"authorization": token}})
video = out.add_stream("libx264", rate={FPS})
video.width, video.height, video.pix_fmt = {WIDTH}, {HEIGHT}, "yuv420p"
video.options = {{"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline",
                  "g": "15", "bf": "0"}}
audio = out.add_stream("libopus", rate=48000, layout="stereo")
samples = 48000 // {FPS}
started = time.monotonic()
for index in range(60 * {FPS}):
    if stop.is_set():
        break
    image = np.zeros(({HEIGHT}, {WIDTH}, 3), np.uint8)
    image[:, (index * 4) % {WIDTH}] = 255
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    frame.pts, frame.time_base = index, fractions.Fraction(1, {FPS})
    for packet in video.encode(frame):
        out.mux(packet)
    sound = av.AudioFrame.from_ndarray(
        np.zeros((1, samples * 2), np.int16), format="s16", layout="stereo"
    )
    sound.sample_rate, sound.pts = 48000, index * samples
    for packet in audio.encode(sound):
        out.mux(packet)
    if index == 0:
        print("published", flush=True)  # the first mux ran ICE and DTLS to completion
    time.sleep(max(0.0, started + (index + 1) / {FPS} - time.monotonic()))
out.close()
print("closed", flush=True)
"""


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = live_server()
    yield live
    live.close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


async def test_ffmpeg_whip_publisher_is_decoded_by_a_whep_viewer(server: LiveServer) -> None:
    publisher = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PUBLISHER,
        f"{server.url}/whip/ffmpeg",
        TOKEN,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert publisher.stdin is not None and publisher.stdout is not None
    assert publisher.stderr is not None
    viewer = DecodingViewer()
    try:
        line = await asyncio.wait_for(publisher.stdout.readline(), 30)
        assert line == b"published\n", (await publisher.stderr.read()).decode()
        offer = await viewer.offer(["audio", "video"], video_codec="H264")
        async with aiohttp.ClientSession() as http:
            _, answer = await exchange(http, f"{server.url}/whep/ffmpeg", offer)
        await viewer.accept(answer)
        await viewer.wait_frames(10, timeout=20)
        frame = viewer.video_frames[-1]
        assert (frame.width, frame.height) == (WIDTH, HEIGHT)
        assert viewer.audio_frames > 0
    finally:
        await viewer.close()
        publisher.stdin.close()
        stdout, stderr = await asyncio.wait_for(publisher.communicate(), 30)
    # The muxer's trailer DELETEs the session; it fails loudly on an error answer.
    assert publisher.returncode == 0, stderr.decode()
    assert stdout == b"closed\n", stderr.decode()
    assert b"DTLS" not in stderr, stderr.decode()
