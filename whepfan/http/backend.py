"""What the HTTP layer needs from the session layer (``whepfan.media.router.Router``), as a
structural type: the HTTP layer sits above the session layer (DESIGN.md §3) and only calls
these methods. Every error the router raises is a ``whepfan.errors`` type."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from whepfan.protocol.sdp import SdpFragment


class IceView(Protocol):
    @property
    def remote_ufrag(self) -> str | None: ...


class SessionView(Protocol):
    """A publisher or viewer session as signalling sees it."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> enum.Enum: ...  # SessionKind: value "publisher" or "viewer"
    @property
    def stream(self) -> str: ...
    @property
    def etag(self) -> str: ...  # strong and quoted, RFC 9110 §8.8.3
    @property
    def ice(self) -> IceView: ...


class StreamView(Protocol):
    @property
    def publisher(self) -> SessionView | None: ...
    @property
    def live(self) -> bool: ...


class SessionRouter(Protocol):
    @property
    def streams(self) -> Mapping[str, StreamView]: ...
    @property
    def viewer_count(self) -> int: ...

    def publish(self, stream_name: str, offer_text: str, now: float) -> tuple[SessionView, str]:
        """WHIP: the new publisher session and the recvonly answer."""
        ...

    def view(self, stream_name: str, offer_text: str, now: float) -> tuple[SessionView, str]:
        """WHEP: the new viewer session and the sendonly answer; NotAcceptable when the
        offer has no codec the stream carries, Conflict when the stream is not live,
        ServiceUnavailable when there is no capacity."""
        ...

    def counter_offer(self, stream_name: str, now: float) -> tuple[SessionView, str]:
        """WHEP draft-03 §4.2.2: a viewer session awaiting an answer, and our offer."""
        ...

    def accept_counter_answer(self, session_id: str, answer_text: str, now: float) -> None: ...

    def trickle(self, session_id: str, fragment: SdpFragment, now: float) -> None: ...

    def restart_ice(self, session_id: str, fragment: SdpFragment, now: float) -> str:
        """ICE restart: the server's sdpfrag; the session gets a new etag."""
        ...

    def end_session(self, session_id: str, now: float, reason: str = "deleted") -> bool: ...

    def get_session(self, session_id: str) -> SessionView:
        """The session, or NotFound."""
        ...


@runtime_checkable
class PendingRouter(Protocol):
    """A backend that knows which sessions are still pending (answered, not connected:
    ICE + DTLS), for the per-client pending cap (http/pending.py). Without it a session
    counts until it ends or reaches its connect deadline."""

    def session_pending(self, session_id: str) -> bool:
        """False once the session connected or ended (or was never known)."""
        ...
