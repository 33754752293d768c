"""Configuration of the media plane (frozen dataclasses; the CLI/TOML layer builds them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class MediaConfig:
    """What one media worker needs to know.

    ``public_ips`` are the addresses advertised as host candidates in answers (servers
    do not trickle, so the answer carries them all; WHEP draft-03 §4.4.2). Empty means
    "every non-loopback interface address", resolved by the transport at start-up.
    """

    udp_host: str = "0.0.0.0"
    udp_port: int = 8189
    public_ips: tuple[str, ...] = ()
    # RFC 7675 §5.1: consent is lost 30 s after the last verified check.
    consent_timeout: float = 30.0
    # A session not connected (ICE + DTLS keyed) this long after its POST is ended, so
    # that one that never sends a check frees its slot long before consent would expire
    # (media/session.py). Counter-offered sessions must be answered and connected in it.
    connect_timeout: float = 10.0
    # A publisher with no media for this long is stalled (media/liveness.py): viewers hear
    # "inactive" and a new WHIP POST may replace it, without waiting for consent expiry.
    media_timeout: float = 3.0
    # At most one keyframe request (PLI) upstream per stream per interval: a storm of
    # viewers joining must not make the publisher send keyframes back to back.
    keyframe_request_interval: float = 0.5
    # Feedback to the publisher (RR + REMB, RFC 3550 §6.4.2 and draft-alvestrand-rmcat-remb)
    # so that a browser publisher's bandwidth estimate can ramp up.
    publisher_feedback_interval: float = 1.0
    publisher_max_bitrate: int = 6_000_000
    # Sender reports to viewers are relayed from the publisher's; if the publisher sends
    # none, the viewer's lip sync cannot be recovered (RFC 3550 §6.4.1), nothing to invent.
    max_viewers: int = 16384
    # WHEP draft-03 §4.2.2: a counter-offer with no valid-until is valid for 30 s.
    counter_offer_ttl: float = 30.0
    fanout_batch_size: int = 32
    # UDP GSO for the fan-out (media/gso.py): "auto" where the start-up probe succeeds,
    # "on" (a failing probe is a start-up error) or "off".
    gso: str = "auto"
    # ~2 s of 720p video at ~200 packets/s, rounded up to a power of two.
    video_cache_packets: int = 1024
    audio_cache_packets: int = 128
    socket_buffer_bytes: int = 8 * 1024 * 1024
