"""The synthetic live source of ``whepfan publish``: a moving test pattern with a burned-in
wall clock and frame counter, a tone, and their encoders (PyAV: libvpx, libx264, libopus).

Frames are drawn straight into YUV 4:2:0 planes with numpy (no colour conversion), and the
text uses a built-in 5x7 pixel font, so nothing is loaded or downloaded at run time.
"""

from __future__ import annotations

import datetime
import fractions
import math
from typing import Any, cast

import av
import numpy as np

VIDEO_CLOCK_RATE = 90000  # RFC 7741 §6.1, RFC 6184 §8.2.1
AUDIO_CLOCK_RATE = 48000  # RFC 7587 §4.1: Opus always uses a 48 kHz RTP clock
AUDIO_FRAME_SAMPLES = 960  # 20 ms, the WebRTC default Opus frame

# 5x7 glyphs, one string of five columns' bits per row ("#" = lit).
_FONT_ROWS = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    ":": (".....", "..#..", "..#..", ".....", "..#..", "..#..", "....."),
    ".": (".....", ".....", ".....", ".....", ".....", ".##..", ".##.."),
    "#": (".#.#.", ".#.#.", "#####", ".#.#.", "#####", ".#.#.", ".#.#."),
    " ": (".....",) * 7,
}
_FONT = {
    char: np.array([[cell == "#" for cell in row] for row in rows], dtype=bool)
    for char, rows in _FONT_ROWS.items()
}
GLYPH_WIDTH = 5
GLYPH_HEIGHT = 7


def render_text(text: str, scale: int) -> np.ndarray:
    """A boolean bitmap of ``text`` (characters outside the font render blank)."""
    glyphs = [_FONT.get(char, _FONT[" "]) for char in text]
    spacer = np.zeros((GLYPH_HEIGHT, 1), dtype=bool)
    row = np.hstack([part for glyph in glyphs for part in (glyph, spacer)])
    return np.kron(row, np.ones((scale, scale), dtype=bool)).astype(bool)


class TestPattern:
    """Frames of a moving pattern: a diagonal luma ramp that scrolls, a white bar that
    sweeps across, slowly cycling colours, and a box with the wall-clock time (UTC,
    milliseconds) and the frame number, so a viewer can read latency and drops off
    the picture."""

    __test__ = False  # not a pytest class, whatever the name says

    def __init__(self, *, width: int, height: int) -> None:
        if width < 32 or height < 32 or width % 2 or height % 2:
            raise ValueError("the pattern needs an even size of at least 32x32")
        self.width = width
        self.height = height
        rows = np.arange(height, dtype=np.int32)[:, None]
        columns = np.arange(width, dtype=np.int32)[None, :]
        self._ramp = (rows + columns) * 255 // (width + height)
        self._scale = max(1, height // 120)

    def luma_and_chroma(
        self, index: int, wallclock: datetime.datetime
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        width, height = self.width, self.height
        luma = ((self._ramp + 2 * index) % 256).astype(np.uint8)
        bar_width = max(4, width // 32)
        bar_x = (index * max(1, width // 120)) % (width - bar_width)
        luma[:, bar_x : bar_x + bar_width] = 235
        phase = index / 90.0
        u = np.full((height // 2, width // 2), 128 + 60 * math.sin(phase), dtype=np.uint8)
        v = np.full((height // 2, width // 2), 128 + 60 * math.cos(phase), dtype=np.uint8)
        clock = wallclock.strftime("%H:%M:%S.") + f"{wallclock.microsecond // 1000:03d}"
        for line, text in enumerate((clock, f"#{index:07d}")):
            bitmap = render_text(text, self._scale)
            top = 4 * self._scale + line * (GLYPH_HEIGHT + 3) * self._scale
            left = 4 * self._scale
            box = luma[top : top + bitmap.shape[0], left : left + bitmap.shape[1]]
            clipped = bitmap[: box.shape[0], : box.shape[1]]
            box[...] = 16
            box[clipped] = 235
        return luma, u, v

    def frame(self, index: int, wallclock: datetime.datetime) -> av.VideoFrame:
        luma, u, v = self.luma_and_chroma(index, wallclock)
        planar = np.concatenate(
            [luma, u.reshape(-1, self.width), v.reshape(-1, self.width)], axis=0
        )
        return av.VideoFrame.from_ndarray(planar, format="yuv420p")


class Tone:
    """A 440 Hz tone with an 880 Hz beep during the first 100 ms of every second of the
    media clock (so audio/video sync can be judged against the burned-in clock)."""

    def __init__(self, *, level: float = 0.2) -> None:
        self.level = level

    def samples(self, first_sample: int, count: int = AUDIO_FRAME_SAMPLES) -> np.ndarray:
        """Mono signed 16-bit samples ``first_sample .. first_sample + count`` at 48 kHz."""
        position = np.arange(first_sample, first_sample + count, dtype=np.int64)
        seconds = position / AUDIO_CLOCK_RATE
        beeping = (position % AUDIO_CLOCK_RATE) < AUDIO_CLOCK_RATE // 10
        frequency = np.where(beeping, 880.0, 440.0)
        wave = np.sin(2 * np.pi * frequency * seconds) * self.level * 32767
        return wave.astype(np.int16)


#: FFmpeg encoders in the av wheel, by the client tools' codec names.
VIDEO_ENCODERS = {"vp8": "libvpx", "h264": "libx264"}


class VideoEncoder:
    """One PyAV video encoder tuned for live WebRTC: no lookahead, no B-frames, one
    encoded frame out per frame in, keyframes on request (and every ``keyframe_interval``
    frames otherwise)."""

    def __init__(
        self,
        *,
        codec: str,
        width: int,
        height: int,
        fps: int,
        bitrate: int,
        keyframe_interval: int = 300,
    ) -> None:
        self.codec = codec
        self.context: Any = cast(Any, av.CodecContext.create(VIDEO_ENCODERS[codec], "w"))
        self.context.width = width
        self.context.height = height
        self.context.pix_fmt = "yuv420p"
        self.context.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        self.context.framerate = fractions.Fraction(fps, 1)
        self.context.bit_rate = bitrate
        self.context.gop_size = keyframe_interval
        # One encoder thread: at these sizes libvpx's worker threads cost more in
        # synchronisation than they save (measured ~1 ms vs ~55 ms per 320x240 frame on a
        # busy 2-core machine), and the publisher already encodes off the event loop.
        self.context.thread_count = 1
        if codec == "vp8":
            self.context.options = {
                "deadline": "realtime",
                "cpu-used": "8",
                "lag-in-frames": "0",
                "error-resilient": "1",
            }
        else:
            self.context.options = {
                "preset": "ultrafast",
                "tune": "zerolatency",
                "profile": "baseline",
                "level": "3.1",
            }
        self.fps = fps

    def encode(self, frame: av.VideoFrame, index: int, *, keyframe: bool) -> tuple[bytes, bool]:
        """(encoded frame, is keyframe); the frame may be empty if the encoder skipped it."""
        frame.pts = index * (VIDEO_CLOCK_RATE // self.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        if keyframe:
            frame.pict_type = av.video.frame.PictureType.I
        packets = self.context.encode(frame)
        data = b"".join(bytes(packet) for packet in packets)
        return data, any(packet.is_keyframe for packet in packets)


class AudioEncoder:
    """Opus at 48 kHz stereo (RFC 7587 §7: always signalled opus/48000/2), 20 ms frames."""

    def __init__(self, *, bitrate: int = 64000) -> None:
        self.context: Any = cast(Any, av.CodecContext.create("libopus", "w"))
        self.context.sample_rate = AUDIO_CLOCK_RATE
        self.context.layout = "stereo"
        self.context.format = "s16"
        self.context.bit_rate = bitrate

    def encode(self, mono: np.ndarray, first_sample: int) -> list[bytes]:
        stereo = np.repeat(mono, 2).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
        frame.sample_rate = AUDIO_CLOCK_RATE
        frame.pts = first_sample
        return [bytes(packet) for packet in self.context.encode(frame)]
