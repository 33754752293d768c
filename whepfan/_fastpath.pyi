"""Typed surface of the compiled core (whepfan/_fastpath.pyx). Only bytes and ints cross it."""

from collections.abc import Sequence

# SRTP protection profiles (IANA DTLS-SRTP registry values, RFC 5764 / RFC 7714).
PROFILE_AES128_CM_SHA1_80: int
PROFILE_AES128_CM_SHA1_32: int
PROFILE_AEAD_AES_128_GCM: int
PROFILE_AEAD_AES_256_GCM: int

def gcm_backend() -> str:
    """Which AES-GCM code SRTP contexts keyed from now on use: "intel-ipsec-mb <version>
    (<sse|avx|avx2|avx512>)" or "openssl"."""

def use_gcm_backend(name: str) -> str:
    """Key new SRTP contexts with "intel-ipsec-mb" (if built with it and the CPU has
    AES-NI) or "openssl"; contexts keyed before keep theirs. Returns gcm_backend()."""

def profile_key_lengths(profile: int) -> tuple[int, int]:
    """(master key length, master salt length) in bytes for a profile."""

def _derive_session_keys(
    profile: int, key: bytes, salt: bytes
) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
    """Test hook: (rtp_key, rtp_auth_key, rtp_salt, rtcp_key, rtcp_auth_key, rtcp_salt)."""

class SrtpError(ValueError):
    """A packet failed to protect/unprotect; ``reason`` is one of
    "malformed", "auth", "replay", "no-room", "streams", "crypto"."""

    reason: str

class SrtpSession:
    """One direction of an SRTP/SRTCP association (RFC 3711).

    Use one session to protect (sender side) or to unprotect (receiver side), as with
    libsrtp's outbound/inbound policies. Tracks up to 8 SSRCs, each with its own
    rollover counter and 64-packet replay window.
    """

    def __init__(self, profile: int, key: bytes, salt: bytes) -> None: ...
    @staticmethod
    def _from_session_keys(
        profile: int,
        rtp_key: bytes,
        rtp_auth_key: bytes,
        rtp_salt: bytes,
        rtcp_key: bytes,
        rtcp_auth_key: bytes,
        rtcp_salt: bytes,
    ) -> SrtpSession: ...
    def protect(self, packet: bytes) -> bytes: ...
    def unprotect(self, packet: bytes) -> bytes: ...
    def protect_rtcp(self, packet: bytes) -> bytes: ...
    def unprotect_rtcp(self, packet: bytes) -> bytes: ...

# How a Fanout track's payload may be read (Fanout.add_track ``payload_format``).
PAYLOAD_OPAQUE: int
SUBSCRIPTION_NONE: int  # Fanout.subscription_state(): not subscribed
SUBSCRIPTION_AWAITING_KEYFRAME: int  # subscribed, waiting for a keyframe
SUBSCRIPTION_FORWARDING: int  # forwarding
PAYLOAD_VP8: int  # RFC 7741 descriptors: temporal-layer dropping, picture-id continuity
PAYLOAD_VP9: int  # RFC 9628 descriptors: the same (picture ids kept as sent on drops)

class Fanout:
    """Per-worker send path: re-encrypts each pushed RTP packet once per subscribed viewer
    and sends the results with batched ``sendmmsg`` on ``fd`` (a bound, non-blocking UDP
    socket). Nothing raises per viewer: failures are counters in ``viewer_stats``/``stats``.
    """

    def __init__(
        self,
        fd: int,
        *,
        max_viewers: int = 16384,
        max_tracks: int = 64,
        batch_size: int = 32,
        gso: bool = False,
        gso_max_segment: int = 1452,
        pad_limit: int = 32,
        transport_log_size: int = 1024,
    ) -> None:
        """``transport_log_size``: entries (a power of two, 64..65536) of each
        transport-cc viewer's send log, 8 bytes each (see ``transport_sent``)."""
    # Tracks are ingest streams (one SSRC of the publisher: audio, a video layer).
    def add_track(
        self,
        *,
        cache_packets: int = 1024,
        clock_rate: int = 90000,
        payload_format: int = 0,
        transport_cc_id: int = 0,
    ) -> int: ...
    def set_track_transport_cc(self, track: int, extension_id: int) -> None:
        """The publisher's transport-wide cc extension id in ``track``'s packets (0: none).
        Transport-cc viewers get that element (two data octets) rewritten in place with
        their own id and number; packets without it get an element added."""

    def remove_track(self, track: int) -> None: ...
    # Viewers: one DTLS-SRTP association each.
    def add_viewer(
        self,
        host: str,
        port: int,
        *,
        profile: int,
        tx_key: bytes,
        tx_salt: bytes,
        rx_key: bytes,
        rx_salt: bytes,
        source: str | None = None,
    ) -> int:
        """``source``: this host's address the viewer's ICE check reached; everything sent
        to the viewer leaves from it (IP_PKTINFO / IPV6_PKTINFO). None: the kernel picks."""

    def remove_viewer(self, viewer: int) -> None: ...
    def set_viewer_address(
        self, viewer: int, host: str, port: int, source: str | None = None
    ) -> None:
        """The viewer's selected pair changed: its address and our ``source`` address."""

    def set_transport_cc(self, viewer: int, extension_id: int, sequence: int | None = None) -> None:
        """Stamp the viewer's own transport-wide sequence number (draft-holmer-rmcat-
        transport-wide-cc-extensions-01 §2) under its ``extension_id`` (1..14 one-byte,
        up to 255 two-byte form; 0: off) on every RTP packet sent to it: media, RTX,
        padding. One 16-bit counter per viewer (its BUNDLE transport). ``sequence``: the
        next number (None: unchanged; random when first turned on). Allocates the
        viewer's send log once; remove_viewer frees it."""

    def transport_sent(
        self, viewer: int, base_sequence: int, count: int
    ) -> list[tuple[float, int] | None]:
        """Per transport-wide sequence number base_sequence .. +count-1 (mod 2^16; count
        0..65535): (sent_at, size) or None (not sent, refused by the kernel, or overwritten
        in the ring). sent_at: CLOCK_MONOTONIC seconds (= time.monotonic()) when the
        sendmmsg batch that carried it began to fill (one reading per batch, kept to 2^-16
        s); size: the datagram's UDP payload octets, SRTP tag included."""

    def subscribe(
        self,
        viewer: int,
        track: int,
        *,
        ssrc: int,
        payload_type: int,
        ext_map: bytes = b"",
        rtx_ssrc: int = 0,
        rtx_payload_type: int = -1,
        wait_keyframe: bool = True,
    ) -> None:
        """Send ``track`` to ``viewer`` as ``ssrc``/``payload_type``. ``ext_map[i]`` is the
        viewer's id for the publisher's header extension id ``i`` (0 or missing: strip it)."""

    def unsubscribe(self, viewer: int, track: int) -> None: ...
    def switch(self, viewer: int, from_track: int, to_track: int) -> None:
        """Move ``viewer`` to another simulcast layer at ``to_track``'s next keyframe,
        keeping its SSRC/PT and continuing its sequence numbers (last + 1), timestamps (+
        real elapsed time) and VP8/VP9 picture id / TL0PICIDX. ``from_track`` keeps flowing
        until then; ``unsubscribe(viewer, to_track)`` cancels. Completions are reported by
        ``take_switches``."""

    def set_temporal_layer(self, viewer: int, track: int, limit: int) -> None:
        """Forward VP8 (0..3) or VP9 (0..7) temporal layers 0..``limit`` only (-1: all),
        applied at a picture boundary (upwards only where decodable: TID 0, or the VP8 Y /
        VP9 U bit). Dropped packets close up the viewer's sequence numbers; VP8 picture
        ids close up too, VP9 picture ids keep their gaps (VP9 references are picture-id
        distances), and a VP9 flexible-mode picture whose P_DIFF names a dropped picture
        is dropped as well."""

    def subscription_state(self, viewer: int, track: int) -> int:
        """0: not subscribed, 1: waiting for a keyframe (start or switch), 2: forwarding."""

    def take_switches(self) -> list[tuple[int, int, int]]:
        """Completed switches since the last call: (viewer, from_track, to_track)."""

    def push(
        self, track: int, packet: bytes, keyframe: bool = False, now: float | None = None
    ) -> int:
        """Cache ``packet`` (plain RTP) and send it to every subscriber; returns datagrams
        handed to the kernel. ``keyframe`` marks the first packet of a keyframe: subscribers
        waiting for one start there (and pending switches complete). ``now`` is the
        caller's monotonic time in seconds (default: CLOCK_MONOTONIC)."""

    def push_batch(
        self,
        track: int,
        packets: Sequence[bytes],
        keyframes: Sequence[bool] | None = None,
        now: float | None = None,
    ) -> int:
        """push() for packets of ``track`` that arrived together, viewer by viewer: with
        ``gso`` on, each viewer's run of equal-length packets goes out as one UDP GSO
        entry (near-equal ones padded, RFC 3550 §5.1). Returns datagrams sent."""

    @property
    def gso(self) -> bool:
        """push_batch uses UDP GSO; False after the kernel refused it (``gso_error``)."""

    @gso.setter
    def gso(self, enabled: bool) -> None: ...
    @property
    def gso_error(self) -> int: ...
    def resend(self, viewer: int, track: int, seqs: Sequence[int]) -> int:
        """Answer a NACK: re-send the viewer's sequence numbers ``seqs`` from the cache
        (as RTX when the subscription has an RTX ssrc/pt), with the header and VP8/VP9
        picture id / TL0PICIDX the viewer first got. Numbers from before the viewer's
        last switch or temporal drop, or of a packet it never got, are misses. Returns
        packets re-sent."""

    def send_padding(self, viewer: int, track: int, count: int, size: int) -> int:
        """``count`` (0..1024) padding-only packets of ``size`` (1..255) padding octets on
        the subscription's RTX SSRC/PT and RTX sequence numbers (RFC 3550 §5.1 P bit,
        RFC 4588), each with the viewer's next transport-wide number, logged: a bandwidth
        probe. Returns packets sent; 0 without RTX, without transport-cc, or before the
        subscription's first media packet. Counted as ``padding_sent``."""

    def send_sender_reports(self, track: int, ntp_time: int, rtp_time: int) -> int:
        """An RTCP SR (RFC 3550 §6.4.1) to every subscriber of ``track``, with the
        viewer's SSRC, its timestamp mapping and its packet/octet counts."""

    def send_rtcp(self, viewer: int, packet: bytes) -> int: ...
    def unprotect_rtcp(self, viewer: int, packet: bytes) -> bytes: ...
    def viewer_stats(self, viewer: int) -> dict[str, int]: ...
    def stats(self) -> dict[str, int]: ...
    @property
    def viewer_count(self) -> int: ...

def measure_send_limit(
    fd: int,
    destinations: Sequence[tuple[str, int]],
    *,
    profile: int,
    packet_size: int,
    packets: int,
    batch_size: int = 32,
    segments: int = 1,
) -> tuple[int, float]:
    """The same-run limit for benchmarks: a plain C loop that protects one packet per
    destination with the same crypto and sends with ``sendmmsg``.
    Returns (datagrams sent, seconds)."""

# --- receive side (loadtest)

class Receiver:
    """Batched receive path of ``whepfan loadtest`` (``_receiver.pxi``): one bound,
    non-blocking UDP socket per simulated viewer, watched in one epoll set (``drain()``
    reads every ready one) or, once ``set_polled``, swept by ``poll()`` on the caller's
    timer so the sender is not made to wake us per datagram. Either reads with
    ``recvmmsg``, stamps arrivals with the kernel's receive time (SO_TIMESTAMPNS),
    counts RTP from its clear header (packets, bytes, per-SSRC sequence gaps, duplicates,
    RFC 3550 jitter, the socket's own drops), SRTP-unprotects every packet until the
    viewer's first keyframe and then every ``verify_every``-th, and returns the STUN/DTLS
    datagrams for Python. The sockets stay the caller's."""

    def __init__(
        self,
        *,
        max_viewers: int = 4096,
        batch_size: int = 64,
        verify_every: int = 1,
        gro: bool = False,
    ) -> None:
        """``gro``: ask every socket for UDP_GRO, so a run of datagrams is one read (64 KiB
        buffers per batch slot); counts stay per datagram (split by the segment size)."""

    def fileno(self) -> int:
        """The epoll fd, readable whenever a viewer socket is (for ``loop.add_reader``)."""

    def add_viewer(self, fd: int) -> int: ...
    def remove_viewer(self, viewer: int) -> None: ...
    def set_payload_type(
        self, viewer: int, payload_type: int, *, kind: str, clock_rate: int
    ) -> None:
        """``kind``: "audio", "vp8", "h264" or "video" (keyframes inspected for vp8/h264)."""

    def set_keys(self, viewer: int, *, profile: int, key: bytes, salt: bytes) -> None: ...
    def set_polled(self, viewer: int, polled: bool) -> None: ...
    def drain(self) -> list[tuple[int, bytes, tuple[str, int]]]: ...
    def poll(self) -> list[tuple[int, bytes, tuple[str, int]]]: ...
    def viewer_stats(self, viewer: int) -> dict[str, int | float | None]:
        """packets, bytes, expected, lost, duplicates, late, rtcp_packets,
        control_packets, control_dropped, decrypted, decrypt_failures, replayed, unkeyed,
        malformed, other_streams, socket_drops, streams, audio_jitter_ms, video_jitter_ms, and the
        CLOCK_MONOTONIC (= time.monotonic()) times first_rtp_at, first_keyframe_at,
        last_rtp_at (None until they happen)."""

    def stats(self) -> dict[str, int]: ...
