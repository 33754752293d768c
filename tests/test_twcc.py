"""Transport-wide congestion control feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01):
the RTCP format (protocol/rtcp.py ``TransportFeedback``) on the draft's chunk examples
and packets Chromium sends, and the publisher-side feedback (media/twcc.py
``ArrivalFeedback``) on virtual time, fed the arrivals of a captured Chromium publisher
(tests/data/chromium_publisher_arrivals.txt)."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_nack_generator import CHROMIUM_VIDEO_SSRC, _vp8
from test_router import CLIENT, Harness, connect_viewer

from whepfan import _fastpath
from whepfan.config import MediaConfig
from whepfan.errors import ParseError
from whepfan.media.transport import MediaWorker
from whepfan.media.twcc import FEEDBACK_INTERVAL, ArrivalFeedback
from whepfan.protocol import rtcp
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.protocol.negotiation import (
    EXT_TRANSPORT_CC,
    EXT_TRANSPORT_CC_02,
    LocalTransport,
    answer_publisher,
)
from whepfan.protocol.rtcp import TransportFeedback, TransportWideFeedback
from whepfan.protocol.rtp import transport_sequence
from whepfan.protocol.sdp import Candidate, SessionDescription

DATA = Path(__file__).parent / "data"
CAPTURE = DATA / "chromium_publisher_arrivals.txt"
CAPTURE_EXTENSION_ID = 3  # the capture's a=extmap for transport-wide-cc-01

# Transport feedback as Chromium sends it (pion/rtcp's test vectors, taken from Chrome):
# one packet received 37 ms after the reference time; seven received, run-length coded.
CHROMIUM_ONE = bytes.fromhex(
    "afcd0005fa17fa174303 2fa0 0099 0001 3de80217 2001 94 01".replace(" ", "")
)
CHROMIUM_SEVEN = bytes.fromhex("afcd0007fa17fa17193dd8bb0004000710636e0120074c2424100c0c10000003")


def _capture() -> list[tuple[float, bytes]]:
    rows = []
    for line in CAPTURE.read_text().splitlines():
        if line.startswith("#"):
            continue
        micros, _, header = line.split()
        rows.append((int(micros) / 1e6, bytes.fromhex(header)))
    return rows


# --------------------------------------------------------------------------- the format


def test_chromium_packets_decode_and_encode_byte_for_byte() -> None:
    one = TransportFeedback.parse(CHROMIUM_ONE)
    assert (one.sender_ssrc, one.media_ssrc) == (0xFA17FA17, 0x43032FA0)
    assert (one.base_sequence, one.reference_time, one.feedback_count) == (153, 4057090, 23)
    assert one.deltas == [148]  # 37 ms in 250 µs ticks
    (arrival,) = one.arrivals()
    assert arrival == (153, pytest.approx(4057090 * 0.064 + 0.037))
    seven = TransportFeedback.parse(CHROMIUM_SEVEN)
    assert (seven.base_sequence, seven.reference_time, seven.feedback_count) == (4, 1074030, 1)
    assert seven.deltas == [76, 36, 36, 16, 12, 12, 16]
    # Re-encoded as libwebrtc does: one run-length chunk, padding by the RTCP P bit.
    assert one.serialize() == CHROMIUM_ONE
    assert seven.serialize() == CHROMIUM_SEVEN
    # parse_compound keeps it as the generic RTPFB FMT 15 packet; from_packet decodes it.
    (generic,) = rtcp.parse_compound(CHROMIUM_SEVEN)
    assert isinstance(generic, TransportWideFeedback)
    assert TransportFeedback.from_packet(generic) == seven


def _chunks(feedback: TransportFeedback) -> list[int]:
    """The packet status chunks of a serialized feedback packet."""
    fci = TransportWideFeedback.parse(feedback.serialize()).feedback
    chunks, covered, offset = [], 0, 8
    while covered < len(feedback.deltas):
        chunk = int.from_bytes(fci[offset : offset + 2], "big")
        chunks.append(chunk)
        covered += chunk & 0x1FFF if not chunk & 0x8000 else 7 if chunk & 0x4000 else 14
        offset += 2
    return chunks


def _feedback(deltas: list[int | None]) -> TransportFeedback:
    return TransportFeedback(
        sender_ssrc=1,
        media_ssrc=2,
        base_sequence=65530,
        reference_time=5,
        feedback_count=9,
        deltas=deltas,
    )


def test_the_drafts_chunk_examples() -> None:
    # §3.1.3 example 1: a run of 221 packets not received is 0|00|0 0000 1101 1101.
    lost_run = _feedback([None] * 221 + [4])
    assert _chunks(lost_run)[0] == 0x00DD
    # §3.1.4 example 1: 1|0|01 1111 0001 1100, as symbols: lost, 5 received, 3 lost,
    # 3 received, 2 lost, in one 1-bit status vector chunk (0x9F1C).
    symbols = [0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0]
    vector = _feedback([10 if s else None for s in symbols] + [3] * 3)
    assert _chunks(vector)[0] == 0x9F1C
    # A large or negative delta needs 2-bit symbols: 1|1|01 10 00 00 00 00 00 (0xD800).
    two_bit = _feedback([208, -4, None, None, None, None, None, 1, 2])
    assert _chunks(two_bit)[0] == 0xD800
    for feedback in (lost_run, vector, two_bit):
        assert TransportFeedback.parse(feedback.serialize()) == feedback


@given(
    st.lists(st.one_of(st.none(), st.integers(-0x8000, 0x7FFF)), min_size=1, max_size=600),
    st.integers(0, 0xFFFF),
    st.integers(0, (1 << 24) - 1),
)
def test_any_feedback_survives_serialize_and_parse(
    deltas: list[int | None], base: int, reference: int
) -> None:
    feedback = TransportFeedback(
        sender_ssrc=7,
        media_ssrc=8,
        base_sequence=base,
        reference_time=reference,
        feedback_count=200,
        deltas=deltas,
    )
    decoded = TransportFeedback.parse(feedback.serialize())
    if reference >= 1 << 23:  # §3.1: the reference time is a signed 24-bit field
        reference -= 1 << 24
    assert decoded.reference_time == reference
    assert decoded.deltas == deltas
    assert decoded.base_sequence == base


def test_malformed_feedback_is_refused() -> None:
    body = bytes.fromhex("fa17fa17 193dd8bb 0004 0007 10636e01".replace(" ", ""))
    # Status count 7 but no chunk; then a chunk whose deltas are missing; then the
    # reserved symbol 11 in a run-length chunk.
    for fci_tail in (b"", bytes.fromhex("2007"), bytes.fromhex("6007") + bytes(8)):
        packet = TransportWideFeedback(
            sender_ssrc=1, media_ssrc=2, feedback=body[8:] + fci_tail
        ).serialize()
        with pytest.raises(ParseError):
            TransportFeedback.parse(packet)


def test_arrivals_round_trip_without_drift() -> None:
    # 2,000 packets 0.3 ms apart: each delta is rounded from the previous *encoded*
    # time, so the error stays within half a tick however many packets there are.
    times = [1000.0 + 0.0003 * index for index in range(2000)]
    feedback = TransportFeedback.from_arrivals(
        sender_ssrc=1, media_ssrc=0, base_sequence=10, feedback_count=0, arrivals=times
    )
    decoded = feedback.arrivals()
    offset = decoded[0][1] - times[0]  # the reference clock's zero is our own
    for (_, arrival), sent in zip(decoded, times, strict=True):
        assert arrival is not None
        assert abs(arrival - offset - sent) <= 0.000125 + 1e-9
    assert decoded[-1][0] == 2009
    with pytest.raises(ValueError):  # 9 s apart do not fit a 16-bit delta
        TransportFeedback.from_arrivals(
            sender_ssrc=1,
            media_ssrc=0,
            base_sequence=0,
            feedback_count=0,
            arrivals=[0.0, 9.0],
        )


# --------------------------------------------------------------------- the extension


def test_transport_sequence_is_read_from_chromium_headers() -> None:
    rows = _capture()
    sequences = [transport_sequence(header, CAPTURE_EXTENSION_ID) for _, header in rows]
    # Chromium numbers every packet of the transport from 1, audio and video alike.
    assert sequences == list(range(1, len(rows) + 1))
    assert all(transport_sequence(header, 9) is None for _, header in rows)
    # RFC 8285 §4.3 two-byte form: id 3, length 2.
    two_byte = bytes.fromhex("90000001000000000000000a100000020302abcd00000000")
    assert transport_sequence(two_byte, 3) == 0xABCD
    assert transport_sequence(two_byte[:14], 3) is None  # truncated
    assert transport_sequence(bytes.fromhex("80000001000000000000000a"), 3) is None


# ------------------------------------------------------------------ publisher feedback


def _replay(
    feedback: ArrivalFeedback, arrivals: list[tuple[int, float]], step: float = 0.01
) -> list[tuple[float, TransportFeedback]]:
    """Virtual time: record each arrival at its time, poll whenever the deadline says,
    on a 10 ms timer grain; every packet sent goes through serialize and parse."""
    sent: list[tuple[float, TransportFeedback]] = []
    ordered = sorted(arrivals, key=lambda item: item[1])
    index, now = 0, ordered[0][1]
    end = ordered[-1][1] + 1.0
    while now <= end:
        while index < len(ordered) and ordered[index][1] <= now:
            feedback.record(ordered[index][0], ordered[index][1])
            index += 1
        deadline = feedback.deadline()
        if deadline is not None and deadline <= now:
            for packet in feedback.poll(now):
                sent.append((now, TransportFeedback.parse(packet.serialize())))
        now = round(now + step, 6)
    return sent


def _reported(sent: list[tuple[float, TransportFeedback]]) -> dict[int, float | None]:
    reported: dict[int, float | None] = {}
    for _, packet in sent:
        for sequence, arrival in packet.arrivals():
            assert sequence not in reported, f"{sequence} reported twice"
            reported[sequence] = arrival
    return reported


def test_a_captured_chromium_publisher_is_reported_every_100_ms() -> None:
    rows = _capture()
    start = 5000.0
    arrivals = [
        (transport_sequence(header, CAPTURE_EXTENSION_ID) or 0, start + t) for t, header in rows
    ]
    feedback = ArrivalFeedback(sender_ssrc=0x1234)
    sent = _replay(feedback, arrivals)
    reported = _reported(sent)
    assert sorted(reported) == [sequence for sequence, _ in arrivals]
    first_sequence, first_time = arrivals[0]
    first_reported = reported[first_sequence]
    assert first_reported is not None
    for sequence, arrival in arrivals:
        decoded = reported[sequence]
        assert decoded is not None
        # Same spacing as captured, to the draft's 250 µs resolution.
        assert abs((decoded - first_reported) - (arrival - first_time)) <= 0.000125 + 1e-9
    times = [at for at, _ in sent]
    # Never two at once; longer only where nothing arrived for an interval (the capture
    # has such pauses before the video starts).
    for earlier, later in itertools.pairwise(times):
        assert later - earlier >= FEEDBACK_INTERVAL / 2
        if later - earlier > FEEDBACK_INTERVAL + 0.01 + 1e-9:
            assert not any(earlier + 0.01 < t < later - FEEDBACK_INTERVAL for _, t in arrivals), (
                earlier,
                later,
            )
    # 4 s of media: one feedback packet per interval while packets arrive, counted on.
    assert len(sent) == round(4.0 / FEEDBACK_INTERVAL)
    assert [packet.feedback_count for _, packet in sent] == list(range(len(sent)))
    assert all(len(packet.serialize()) <= 1200 for _, packet in sent)
    assert feedback.deadline() is None  # nothing left to report
    assert feedback.stats.recorded == len(rows)


def test_losses_and_reordering_in_a_captured_flow() -> None:
    rows = _capture()
    generator = random.Random(14)
    arrivals = []
    for t, header in rows:
        sequence = transport_sequence(header, CAPTURE_EXTENSION_ID) or 0
        if generator.random() < 0.05:
            continue  # lost on the link
        if generator.random() < 0.02:
            t += 0.004  # overtaken by the next few packets
        arrivals.append((sequence, 100.0 + t))
    lost = set(range(1, len(rows) + 1)) - {sequence for sequence, _ in arrivals}
    sent = _replay(ArrivalFeedback(sender_ssrc=1), arrivals)
    reported = _reported(sent)
    first, last = min(s for s, _ in arrivals), max(s for s, _ in arrivals)
    assert sorted(reported) == list(range(first, last + 1))
    assert {s for s, arrival in reported.items() if arrival is None} == {
        s for s in lost if first < s < last
    }


def test_sequence_numbers_wrap_and_a_restarted_sender_starts_over() -> None:
    feedback = ArrivalFeedback(sender_ssrc=1)
    arrivals = [((65530 + i) & 0xFFFF, 10.0 + 0.001 * i) for i in range(12)]
    sent = _replay(feedback, arrivals)
    reported = _reported(sent)
    assert sorted(reported) == sorted(s for s, _ in arrivals)
    assert sent[0][1].base_sequence == 65530
    # A packet reported lost that turns up later is counted late, not reported again.
    feedback = ArrivalFeedback(sender_ssrc=1)
    feedback.record(100, 20.0)
    feedback.record(102, 20.001)
    (first,) = feedback.poll(20.2)
    feedback.record(101, 20.25)
    assert feedback.stats.late == 1
    assert first.arrivals()[1] == (101, None)
    # A jump far outside the window (the sender restarted its counter) starts a new line.
    feedback.record(40000, 21.0)
    (restart,) = feedback.poll(21.2)
    assert restart.base_sequence == 40000 and len(restart.deltas) == 1


def test_a_long_gap_is_split_into_packets_that_fit() -> None:
    feedback = ArrivalFeedback(sender_ssrc=1, max_packets=50)
    feedback.record(0, 1.0)
    feedback.record(1, 1.001)
    feedback.record(900, 1.002)  # 898 lost between
    feedback.record(901, 10.5)  # 9.5 s later: more than a 16-bit delta
    packets = feedback.poll(11.0)
    covered = [s for packet in packets for s, _ in packet.arrivals()]
    assert covered == list(range(0, 902))
    assert [packet.feedback_count for packet in packets] == list(range(len(packets)))
    assert packets[-1].base_sequence == 901  # the late one starts its own packet
    for packet in packets:
        assert TransportFeedback.parse(packet.serialize()) == packet


# ------------------------------------------------------------------------- negotiation


def test_a_chromium_whip_offer_gets_transport_cc_in_the_answer() -> None:
    offer = SessionDescription.parse(
        (DATA / "sdp" / "chromium-156-whip-simulcast-offer.sdp").read_text()
    )
    local = LocalTransport(
        "srvU",
        "serverpasswordserverpass",
        [("sha-256", ":".join(["4F"] * 32))],
        [Candidate.parse("1 1 udp 2130706431 198.18.0.1 40000 typ host")],
    )
    offered = {e.uri: e.id for e in offer.media[1].extmaps}
    answer, ingest = answer_publisher(offer, local, transport_cc=True)
    for section, media in zip(answer.media, ingest, strict=True):
        # RFC 8285 §6: the offerer's id; only the -01 extension whepfan reports on.
        assert {e.uri: e.id for e in section.extmaps}[EXT_TRANSPORT_CC] == offered[EXT_TRANSPORT_CC]
        assert EXT_TRANSPORT_CC_02 not in {e.uri for e in section.extmaps}
        assert media.extension_ids[EXT_TRANSPORT_CC] == offered[EXT_TRANSPORT_CC]
        assert all(
            "transport-cc" in codec.rtcp_fb
            for codec in section.codecs
            if codec.name.lower() not in ("rtx", "red", "ulpfec")
        )
    # Without it (relay stand-ins, REMB-only), neither the extension nor the feedback.
    answer, ingest = answer_publisher(offer, local)
    assert all(EXT_TRANSPORT_CC not in m.extension_ids for m in ingest)
    assert "transport-cc" not in answer.serialize()


# ------------------------------------------------------------------ through the router


def _with_transport_sequence(packet: bytes, sequence: int) -> bytes:
    """``packet`` (no extensions) with an RFC 8285 one-byte block carrying the transport-
    wide sequence number as id 3 (the Chromium fixture's a=extmap), as Chromium sends."""
    header = bytearray(packet[:12])
    header[0] |= 0x10
    block = bytes.fromhex("bede0001") + bytes([0x31]) + sequence.to_bytes(2, "big") + b"\x00"
    return bytes(header) + block + packet[12:]


def test_a_publishers_packets_are_reported_to_it_every_100_ms() -> None:
    """In memory, on virtual time: a WHIP publisher (the Chromium fixture, transport-cc
    offered) sends SRTP with transport-wide sequence numbers, one lost; the router's
    TRANSPORT_FEEDBACK timer sends it SRTCP feedback with each arrival, naming its
    video SSRC."""
    harness = Harness()
    try:
        router = harness.router
        publisher_id, _, now = connect_viewer(harness, 0.0, publisher=True)
        keys = router.sessions[publisher_id].keys
        assert keys is not None
        rtp_out = _fastpath.SrtpSession(keys.profile, keys.remote_key, keys.remote_salt)
        rtcp_in = _fastpath.SrtpSession(keys.profile, keys.local_key, keys.local_salt)
        harness.take_sent()
        start = now
        arrivals = {}
        feedback: list[TransportFeedback] = []

        def run_timers_until(until: float) -> None:
            # Every deadline of the router at its time (feedback, RR, ICE), in order.
            while (deadline := router.get_timer()) is not None and deadline <= until:
                router.handle_timer(deadline)
                for data in harness.take_sent():
                    for packet in rtcp.parse_compound(rtcp_in.unprotect_rtcp(data)):
                        if isinstance(packet, TransportWideFeedback):
                            feedback.append(TransportFeedback.from_packet(packet))

        for index in range(40):
            sequence = 500 + index
            at = start + 0.005 * index
            run_timers_until(at)
            if index == 7:
                continue  # lost on the way
            packet = _with_transport_sequence(_vp8(1000 + index, keyframe=index == 0), sequence)
            router.datagram_received(rtp_out.protect(packet), CLIENT, at)
            arrivals[sequence] = at
        run_timers_until(start + 1.0)
        reported = dict(item for packet in feedback for item in packet.arrivals())
        assert sorted(reported) == list(range(500, 540))
        assert reported[507] is None
        base = reported[500]
        assert base is not None
        for sequence, at in arrivals.items():
            decoded = reported[sequence]
            assert decoded is not None
            assert abs((decoded - base) - (at - start)) <= 0.000125 + 1e-9
        assert {packet.media_ssrc for packet in feedback} == {CHROMIUM_VIDEO_SSRC}
        assert len(feedback) == 2  # 0.2 s of packets, one feedback per 100 ms
    finally:
        harness.close()


# ------------------------------------------------------------------- arrival times


async def test_datagrams_read_late_keep_their_kernel_arrival_times() -> None:
    """Feedback reports arrival times, so the worker hands the router each datagram's
    SO_TIMESTAMPNS time: three datagrams sent 50 ms apart while the loop is busy are
    read together but keep their spacing, and all of them precede the read."""
    config = MediaConfig(udp_host="127.0.0.1", udp_port=0, public_ips=("127.0.0.1",))
    worker = MediaWorker(config=config, certificate=DtlsCertificate.generate())
    await worker.start()
    seen: list[float] = []
    received = worker.router.datagram_received

    def record(data: bytes, addr: tuple[str, int], now: float, local: str | None = None) -> None:
        seen.append(now)
        received(data, addr, now, local)

    worker.router.datagram_received = record  # type: ignore[method-assign]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(3):
            sender.sendto(b"\x00garbage", ("127.0.0.1", worker.port))
            time.sleep(0.05)  # the loop is blocked here: nothing is read yet
        blocked_until = time.monotonic()
        await asyncio.sleep(0.05)
        assert len(seen) == 3
        assert all(later - earlier >= 0.045 for earlier, later in itertools.pairwise(seen))
        assert seen[-1] <= blocked_until
    finally:
        sender.close()
        worker.close()
