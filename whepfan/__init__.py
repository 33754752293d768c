"""whepfan: a self-hosted WebRTC fan-out server (WHIP in, WHEP out)."""

__version__ = "0.1.0.dev0"
