"""Where the tests' data lives: in the repository (tests/data/), so a fresh clone runs the
suite with nothing beside it."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
# Offers captured from Chromium 156 (WHIP sendonly, WHIP simulcast, WHEP recvonly).
SDP_FIXTURES = DATA / "sdp"
