"""Where the shared fixtures live: ``shared/`` sits beside the checkout (in CI, beside
the fresh clone), so resolve it from this file rather than from a fixed path."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SDP_FIXTURES = SHARED / "fixtures" / "sdp"
assert SDP_FIXTURES.is_dir(), f"shared fixtures not found at {SDP_FIXTURES}"
