"""The WHIP/WHEP HTTP surface (signalling layer, DESIGN.md §3)."""

from whepfan.http.app import COUNTERS_KEY, create_app
from whepfan.http.links import IceServer
from whepfan.http.routes import HttpOptions

__all__ = ["COUNTERS_KEY", "HttpOptions", "IceServer", "create_app"]
