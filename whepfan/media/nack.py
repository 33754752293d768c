"""Upstream repair: NACKs to the publisher for what its link lost, PLI for what stays lost.

Theory of operation
-------------------
A packet lost between the publisher and the server is lost for every viewer at once, and
no viewer's NACK can be answered from the fan-out cache: the server never had it. So for
each ingested SSRC whose m= section negotiated ``a=rtcp-fb:<pt> nack`` (RFC 4585 §4.2:
only negotiated feedback is sent), a ``NackGenerator`` watches the sequence numbers::

    RTP in ──▶ received(seq) ── a gap ──▶ missing[seq], first due after reorder_delay
                               └ fills a gap (late, or RTX / a resend) ──▶ no longer missing
    NACK timer ──▶ due(now) ──▶ one Generic NACK per SSRC (PID + BLP, RFC 4585 §6.2.1),
                                all of a stream's in one SRTCP compound to the publisher
    retries spent / too many missing / sequence restart ──▶ unrepairable ──▶ PLI
                                (RFC 4585 §6.3.1) through the KeyframeRequests throttle

The publisher answers with RTX (RFC 4588 §4; ingest unwraps it to the original sequence
number) or by sending the original packet again. Either way the repaired packet goes
through the Fanout like any other, so it reaches the viewers late rather than never, and
it is cached under its original sequence number: a viewer's own NACK for it now hits.

Reordering is not loss: a missing packet is only NACKed ``reorder_delay`` after its gap
was seen, and one that arrives late simply leaves the list. Sequence numbers are
extended across the 16-bit wrap as in RFC 3550 A.1; a forward jump of more than
``max_dropout`` (A.1's MAX_DROPOUT, 3000) is not a gap to repair but a restart.

Timing. Each sequence number is NACKed at most ``max_retries`` times, a retry interval
apart, and given up one interval after its last NACK (mediasoup's ``NackGenerator`` and
str0m's ``register_nack`` also cap retries; giving up only after the last answer could
have come keeps that answer). The interval comes from the one round trip the server can
measure towards a sendonly publisher: NACK sent to repair received. Our RRs carry
LSR/DLSR (RFC 3550 §6.4.1) but only the publisher can turn them into an RTT, and browsers
do not send RFC 3611 DLRR unasked. ``RepairRtt`` smooths those samples as TCP smooths its
RTT (RFC 6298 §2), taking only unambiguous ones (Karn's rule, RFC 6298 §3: a packet
NACKed twice could be answering either NACK), and the retry interval is SRTT + 4 RTTVAR
clamped to [min_retry_interval, max_retry_interval], ``initial_rtt`` before any sample.
The samples include the publisher's time to answer, which is what a retry must wait for.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from whepfan.media.feedback import KeyframeRequests, PublisherFeedback
from whepfan.media.session import PublisherSession
from whepfan.media.streams import RTP_SEQ_MOD, Stream, Track
from whepfan.media.timers import TimerKind, Timers
from whepfan.protocol import rtcp

_HALF = RTP_SEQ_MOD // 2
# A datagram of NACKs stays within 1200 bytes, below any path MTU WebRTC runs on (the
# SRTCP tag and index add at most 20). A Generic NACK is 12 bytes plus 4 per item, so
# 200 items (812 bytes, after an 8-byte RR) always fit; a scattered loss list is split.
_MAX_DATAGRAM = 1200
_MAX_ITEMS_PER_NACK = 200


@dataclass(frozen=True, kw_only=True)
class NackPolicy:
    """When and how often to NACK (see the module docstring for why each rule)."""

    max_retries: int = 10  # NACKs per sequence number before it is given up
    reorder_delay: float = 0.005  # s a gap may fill by itself before its first NACK
    initial_rtt: float = 0.1  # s between retries before any round trip was measured
    min_retry_interval: float = 0.02  # s
    max_retry_interval: float = 0.5  # s
    max_missing: int = 1000  # sequence numbers tracked; a wider loss needs a keyframe
    max_dropout: int = 3000  # RFC 3550 A.1 MAX_DROPOUT: a larger jump is a restart


class Arrival(enum.Enum):
    """What one received sequence number meant to the generator."""

    IN_ORDER = "in-order"  # the next one, or newer after nothing missing
    GAP = "gap"  # newer, and the ones between are now missing
    OVERFLOW = "overflow"  # newer past more missing packets than max_missing: all given up
    REORDERED = "reordered"  # a missing one, before it was NACKed
    RECOVERED = "recovered"  # a missing one, after it was NACKed
    DUPLICATE = "duplicate"  # older and not missing: had it, gave up on it, or too old
    RESTART = "restart"  # a jump past max_dropout: the sender's sequence restarted

    @property
    def filled_gap(self) -> bool:
        return self is Arrival.REORDERED or self is Arrival.RECOVERED


@dataclass(eq=False, kw_only=True)
class RepairRtt:
    """NACK-to-repair round trips of one publisher, smoothed per RFC 6298 §2."""

    initial: float
    srtt: float | None = None
    rttvar: float = 0.0
    samples: int = 0

    def sample(self, rtt: float) -> None:
        rtt = max(rtt, 0.0)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            # RFC 6298 §2.3 with alpha = 1/8, beta = 1/4 (RTTVAR first, from the old SRTT).
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.samples += 1

    def retry_interval(self, policy: NackPolicy) -> float:
        wait = self.initial if self.srtt is None else self.srtt + 4 * self.rttvar
        return min(max(wait, policy.min_retry_interval), policy.max_retry_interval)


@dataclass(eq=False, kw_only=True)
class _Missing:
    due_at: float
    nacks: int = 0
    first_nack_at: float = 0.0


class NackGenerator:
    """Missing sequence numbers of one SSRC and when to NACK them (sans-IO: ``now`` in).

    ``received`` for every packet (``retransmission`` for an unwrapped RTX packet),
    ``due(now)`` for the sequence numbers to NACK now, ``next_deadline()`` for when to
    call it again, and ``take_unrepairable()`` for what was given up since last asked.
    """

    def __init__(self, *, policy: NackPolicy, rtt: RepairRtt | None = None) -> None:
        self.policy = policy
        self.rtt = rtt if rtt is not None else RepairRtt(initial=policy.initial_rtt)
        # Extended (cycle-counting, RFC 3550 A.1) highest sequence number; it starts a
        # few cycles up so that extended numbers of late packets never go negative.
        self._highest: int | None = None
        self._missing: dict[int, _Missing] = {}  # extended seq -> state, ascending
        self._given_up: list[int] = []
        self.nacked = 0  # sequence numbers put in NACKs, retries included
        self.recovered = 0
        self.unrepairable = 0

    @property
    def missing(self) -> list[int]:
        """The sequence numbers missing now, oldest first."""
        return [ext % RTP_SEQ_MOD for ext in self._missing]

    def received(self, seq: int, now: float, *, retransmission: bool = False) -> Arrival:
        seq %= RTP_SEQ_MOD
        if self._highest is None:
            self._highest = 4 * RTP_SEQ_MOD + seq
            return Arrival.IN_ORDER
        delta = (seq - self._highest) % RTP_SEQ_MOD
        if delta == 0:
            return Arrival.DUPLICATE
        if delta < _HALF:
            return self._newer(delta, now, retransmission=retransmission)
        entry = self._missing.pop(self._highest - (RTP_SEQ_MOD - delta), None)
        if entry is None:
            return Arrival.DUPLICATE
        if entry.nacks == 0:
            return Arrival.REORDERED
        if entry.nacks == 1:  # Karn's rule: only an answer to a single NACK is a sample
            self.rtt.sample(now - entry.first_nack_at)
        self.recovered += 1
        return Arrival.RECOVERED

    def _newer(self, delta: int, now: float, *, retransmission: bool) -> Arrival:
        assert self._highest is not None
        if delta > self.policy.max_dropout:
            if retransmission:
                return Arrival.DUPLICATE  # a resend cannot restart the original stream
            self._give_up(list(self._missing))
            self._highest += delta
            return Arrival.RESTART
        first_missing = self._highest + 1
        self._highest += delta
        if delta == 1:
            return Arrival.IN_ORDER
        if len(self._missing) + delta - 1 > self.policy.max_missing:
            self._give_up([*self._missing, *range(first_missing, self._highest)])
            return Arrival.OVERFLOW
        due_at = now + self.policy.reorder_delay
        for ext in range(first_missing, self._highest):
            self._missing[ext] = _Missing(due_at=due_at)
        return Arrival.GAP

    def due(self, now: float) -> list[int]:
        """The sequence numbers to NACK now (each counted as one more NACK); those whose
        last NACK went unanswered for a retry interval are given up instead."""
        batch: list[int] = []
        spent: list[int] = []
        interval = self.rtt.retry_interval(self.policy)
        for ext, entry in self._missing.items():
            if entry.due_at > now:
                continue
            if entry.nacks >= self.policy.max_retries:
                spent.append(ext)
                continue
            if entry.nacks == 0:
                entry.first_nack_at = now
            entry.nacks += 1
            entry.due_at = now + interval
            batch.append(ext % RTP_SEQ_MOD)
        self._give_up(spent)
        self.nacked += len(batch)
        return batch

    def next_deadline(self) -> float | None:
        """When ``due`` next has something to do (None: nothing is missing)."""
        return min((entry.due_at for entry in self._missing.values()), default=None)

    def take_unrepairable(self) -> list[int]:
        """Sequence numbers given up since the last call: the caller asks for a keyframe."""
        given_up, self._given_up = self._given_up, []
        return given_up

    def _give_up(self, extended: Sequence[int]) -> None:
        for ext in extended:
            self._missing.pop(ext, None)
            self._given_up.append(ext % RTP_SEQ_MOD)
        self.unrepairable += len(extended)


# -----------------------------------------------------------------------------------------
# One worker's upstream repair: a generator per ingested track, one timer per stream.


@dataclass(eq=False, kw_only=True)
class _TrackRepair:
    track: Track
    generator: NackGenerator
    media_ssrc: int | None = None  # the NACK's media source: the stream that lost packets


@dataclass(eq=False, kw_only=True)
class _StreamRepair:
    publisher: PublisherSession
    rtt: RepairRtt
    tracks: dict[int, _TrackRepair] = field(default_factory=dict)  # by fanout id


def nack_negotiated(publisher: PublisherSession, track: Track) -> bool:
    """Whether the publisher's m= section of ``track``'s kind agreed generic NACK."""
    return any(
        media.kind == track.kind and "nack" in media.codec.rtcp_feedback
        for media in publisher.ingest
    )


class UpstreamRepair:
    """NACK generation for the publishers of one worker (see the module docstring).

    ``received`` is called by ingest for each media packet of a publisher on this worker
    (never for a relay copy: the origin worker repairs); it returns False for an RTX
    packet that repairs nothing (a second answer, or an old packet libwebrtc resends as a probe),
    which ingest drops. The ``NACK`` timer of a stream sends what is due.
    """

    def __init__(
        self,
        *,
        policy: NackPolicy,
        timers: Timers,
        feedback: PublisherFeedback,
        keyframes: KeyframeRequests,
        counters: Counter[str],
    ) -> None:
        self.policy = policy
        self._timers = timers
        self._feedback = feedback
        self._keyframes = keyframes
        self._counters = counters
        self._streams: dict[str, _StreamRepair] = {}

    def received(
        self,
        stream: Stream,
        track: Track,
        ssrc: int,
        seq: int,
        now: float,
        *,
        retransmission: bool,
    ) -> bool:
        publisher = stream.publisher
        if publisher is None or not nack_negotiated(publisher, track):
            return True
        state = self._streams.get(stream.name)
        if state is None or state.publisher is not publisher:
            state = self._streams[stream.name] = _StreamRepair(
                publisher=publisher, rtt=RepairRtt(initial=self.policy.initial_rtt)
            )
        entry = state.tracks.get(track.fanout_id)
        if entry is None or entry.track is not track:
            entry = state.tracks[track.fanout_id] = _TrackRepair(
                track=track, generator=NackGenerator(policy=self.policy, rtt=state.rtt)
            )
        if not retransmission:
            entry.media_ssrc = ssrc
        arrival = entry.generator.received(seq, now, retransmission=retransmission)
        if arrival is Arrival.RECOVERED:
            self._counters["nack_recovered"] += 1
        elif arrival is Arrival.GAP:
            due_at = now + self.policy.reorder_delay
            key = (TimerKind.NACK, stream.name)
            armed = self._timers.deadline(key)
            if armed is None or due_at < armed:
                self._timers.schedule(key, due_at)
        elif arrival is Arrival.OVERFLOW or arrival is Arrival.RESTART:
            self._unrepairable(stream, [entry], now, restart=arrival is Arrival.RESTART)
        return not (retransmission and arrival is Arrival.DUPLICATE)

    def handle_timer(self, stream: Stream | None, name: str, now: float) -> None:
        """The ``NACK`` timer of stream ``name``: send what is due, give up what is spent."""
        state = self._streams.get(name)
        if state is None:
            return
        if stream is None or stream.publisher is not state.publisher:
            self.forget(name)
            return
        if not PublisherFeedback.connected(stream):
            return
        nacks: list[rtcp.GenericNack] = []
        for entry in state.tracks.values():
            due = entry.generator.due(now)
            if not due or entry.media_ssrc is None:
                continue
            self._counters["nack_sent_upstream"] += len(due)
            nack = rtcp.GenericNack.from_sequence_numbers(
                sender_ssrc=self._feedback.rtcp_ssrc,
                media_ssrc=entry.media_ssrc,
                sequence_numbers=due,
            )
            for start in range(0, len(nack.items), _MAX_ITEMS_PER_NACK):
                nacks.append(
                    rtcp.GenericNack(
                        sender_ssrc=nack.sender_ssrc,
                        media_ssrc=nack.media_ssrc,
                        items=nack.items[start : start + _MAX_ITEMS_PER_NACK],
                    )
                )
        self._send(stream, nacks)
        self._unrepairable(stream, list(state.tracks.values()), now)
        deadlines = [e.generator.next_deadline() for e in state.tracks.values()]
        next_at = min((d for d in deadlines if d is not None), default=None)
        self._timers.schedule((TimerKind.NACK, name), next_at)

    def _send(self, stream: Stream, nacks: list[rtcp.GenericNack]) -> None:
        # RFC 4585 §3.1 / RFC 3550 §6.1: feedback goes in a compound packet that starts
        # with a report; an RR with no report blocks (RC = 0) leaves the periodic RRs'
        # loss intervals alone. NACKs are packed greedily up to _MAX_DATAGRAM.
        head = bytes(rtcp.ReceiverReport(ssrc=self._feedback.rtcp_ssrc, reports=[]))
        compounds: list[bytes] = []
        compound = head
        for nack in nacks:
            packet = bytes(nack)
            if len(compound) > len(head) and len(compound) + len(packet) > _MAX_DATAGRAM:
                compounds.append(compound)
                compound = head
            compound += packet
        if len(compound) > len(head):
            compounds.append(compound)
        for datagram in compounds:
            if self._feedback.send(stream, datagram, failure="nack_upstream_failed"):
                self._counters["nack_packets_upstream"] += 1

    def _unrepairable(
        self, stream: Stream, entries: list[_TrackRepair], now: float, *, restart: bool = False
    ) -> None:
        lost_tracks = []
        for entry in entries:
            lost = entry.generator.take_unrepairable()
            if lost:
                self._counters["nack_unrepairable"] += len(lost)
            if lost or restart:
                lost_tracks.append(entry.track)
        if lost_tracks:
            # The decoder behind the gap needs a fresh picture (RFC 4585 §6.3.1); the
            # throttle merges this with every other request for the layer.
            self._keyframes.request(stream, now, tracks=lost_tracks)

    def rtt(self, stream_name: str) -> float | None:
        """The smoothed NACK-to-repair round trip of the stream's publisher, if measured."""
        state = self._streams.get(stream_name)
        return None if state is None else state.rtt.srtt

    def forget(self, stream_name: str) -> None:
        """The stream's publisher left or was replaced: nothing of it is repaired."""
        self._streams.pop(stream_name, None)
        self._timers.cancel((TimerKind.NACK, stream_name))
