"""A Fanout with one viewer on real loopback sockets, the viewer's datagrams decrypted by
libsrtp (pylibsrtp) and parsed: the harness of the layer-switching tests (VP8 and VP9)."""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pylibsrtp import Policy, Session

from whepfan._fastpath import PROFILE_AEAD_AES_128_GCM, Fanout

VIDEO_CLOCK = 90000

Descriptor = TypeVar("Descriptor")


@dataclass
class Received(Generic[Descriptor]):
    seq: int  # of a retransmission: its original sequence number (RFC 4588 §4 OSN)
    timestamp: int
    ssrc: int
    marker: bool
    descriptor: Descriptor
    payload: bytes = b""  # the media payload (of a retransmission: after the OSN)
    rtx: bool = False  # arrived on the RTX stream (rtx_payload_type)


class DescriptorLoopback(Generic[Descriptor]):
    """A Fanout on one UDP socket and one viewer socket with libsrtp keys; every packet
    received is parsed with ``parse_descriptor`` (the codec's payload descriptor)."""

    def __init__(
        self,
        *,
        payload_format: int,
        parse_descriptor: Callable[[bytes], Descriptor],
        max_viewers: int = 8,
        max_tracks: int = 8,
    ) -> None:
        self.payload_format = payload_format
        self.parse_descriptor = parse_descriptor
        self.send_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.send_sock.bind(("127.0.0.1", 0))
        self.send_sock.setblocking(False)
        self.viewer_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.viewer_sock.bind(("127.0.0.1", 0))
        self.viewer_sock.setblocking(False)
        self.fanout = Fanout(
            self.send_sock.fileno(), max_viewers=max_viewers, max_tracks=max_tracks
        )
        key, salt = os.urandom(16), os.urandom(12)
        self.slot = self.fanout.add_viewer(
            "127.0.0.1",
            self.viewer_sock.getsockname()[1],
            profile=PROFILE_AEAD_AES_128_GCM,
            tx_key=key,
            tx_salt=salt,
            rx_key=os.urandom(16),
            rx_salt=os.urandom(12),
        )
        self.key_and_salt = key + salt
        self.inbound = self.fresh_inbound()
        # The viewer's RTX payload type (RFC 4588 §8.6, a=rtpmap rtx), if it has one.
        self.rtx_payload_type: int | None = None

    def fresh_inbound(self) -> Session:
        """A new libsrtp receiver: resends reuse sequence numbers, which the first one's
        replay window (RFC 3711 §3.3.2) rightly refuses."""
        return Session(
            Policy(
                key=self.key_and_salt,
                ssrc_type=Policy.SSRC_ANY_INBOUND,
                srtp_profile=Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
            )
        )

    def add_layer(self) -> int:
        return self.fanout.add_track(clock_rate=VIDEO_CLOCK, payload_format=self.payload_format)

    def push(self, track: int, packets: list[tuple[bytes, bool]], now: float) -> None:
        for packet, keyframe in packets:
            self.fanout.push(track, packet, keyframe, now)

    def receive(self) -> list[Received[Descriptor]]:
        """Every datagram delivered so far, decrypted by libsrtp and parsed."""
        out: list[Received[Descriptor]] = []
        poller = select.poll()
        poller.register(self.viewer_sock, select.POLLIN)
        # Loopback delivery completes within sendmmsg; poll only guards against a race.
        while poller.poll(0 if out else 50):
            try:
                datagram = self.viewer_sock.recv(4096)
            except BlockingIOError:
                break
            plain = self.inbound.unprotect(datagram)
            first, second, seq, timestamp, ssrc = struct.unpack_from("!BBHII", plain)
            # RFC 3550 §5.1, §5.3.1: CSRC list and header extension before the payload.
            header_len = 12 + 4 * (first & 0x0F)
            if first & 0x10:
                header_len += 4 + 4 * struct.unpack_from("!H", plain, header_len + 2)[0]
            payload = plain[header_len:]
            rtx = (second & 0x7F) == self.rtx_payload_type
            if rtx:
                # RFC 4588 §4: the original sequence number, then the original payload.
                (seq,) = struct.unpack_from("!H", payload)
                payload = payload[2:]
            out.append(
                Received(
                    seq=seq,
                    timestamp=timestamp,
                    ssrc=ssrc,
                    marker=bool(second & 0x80),
                    descriptor=self.parse_descriptor(payload),
                    payload=payload,
                    rtx=rtx,
                )
            )
        return out

    def close(self) -> None:
        self.send_sock.close()
        self.viewer_sock.close()
