"""A viewer's transport feedback and headroom probes: the driver of its ViewerBandwidth.

A viewer that negotiated transport-wide cc (draft-holmer-rmcat-transport-wide-cc-
extensions-01) gets the viewer's own transport-wide sequence number on every packet the
Fanout sends it, and a send log of when each left and how large it was
(``Fanout.set_transport_cc``, ``Fanout.transport_sent``). Its RTCP transport feedback
(§3.1), matched against that log, drives its ``ViewerBandwidth`` (media/bandwidth.py:
delay trend, acknowledged rate, loss), whose estimate the layer policy reads like a REMB
(media/layers.py). Chromium sends either transport feedback or REMB, never both: once its
packets carry the extension, this is the only estimate there is.

Only an estimate can say that the path is too slow; only a probe can say it has room
for more (an SFU cannot nudge an encoder up a few percent to see). When the policy wants
to know whether the next layer fits (``LayerPolicyState.probe_for``), ``HeadroomProbes``
starts a probe to that layer's rate plus what the viewer receives besides its video,
sends the padding ``ViewerBandwidth.poll`` asks for as padding-only RTX packets
(``Fanout.send_padding``) on the worker's timer, and hands the outcome back to the
policy with the next feedback.

Cost: matching and the delay trend are Python, about 2.7 µs per reported packet (a
1.5 Mbit/s viewer: ~0.6 ms of CPU per second). Feedback is therefore used only where a
decision depends on it: viewers of a simulcast stream on automatic layer choice. The
others' feedback is counted and dropped unread.
"""

from __future__ import annotations

from collections import Counter

from whepfan import _fastpath
from whepfan.media.bandwidth import ViewerBandwidth
from whepfan.media.delay_trend import BandwidthUsage
from whepfan.media.layers import LayerChoice, LayerSelector
from whepfan.media.session import ViewerSession
from whepfan.media.streams import Stream
from whepfan.media.timers import TimerKind, Timers
from whepfan.protocol import rtcp

# Before any feedback, an estimate is a guess: start from what the viewer is being sent
# (its layer and audio) or, with no meter reading yet, from this.
DEFAULT_INITIAL_BPS = 300_000.0
# Feedback packets (Chromium sends one per ~100 ms) before the estimate is given to the
# policy: the first second or two cover the viewer's first keyframe, sent as one burst,
# whose spread on any link looks like a growing queue (measured: both a 700 kbit/s and an
# open viewer moved down at 0.9 s on 5), and a trend fitted to few groups.
FEEDBACK_BEFORE_USE = 20
# A probe's target is the next layer's rate plus what the viewer receives besides its
# video (audio, RTX, headers), with this margin: a probe that just passes should leave
# the layer room for its own keyframes.
PROBE_MARGIN = 1.1


class HeadroomProbes:
    """Transport feedback in, estimates and padding out, for one worker's viewers."""

    def __init__(
        self,
        *,
        fanout: _fastpath.Fanout,
        layers: LayerSelector,
        timers: Timers,
        counters: Counter[str],
    ) -> None:
        self.fanout = fanout
        self._layers = layers
        self._timers = timers
        self._counters = counters

    def attach(self, session: ViewerSession, stream: Stream, now: float) -> None:
        """The viewer got its Fanout slot with transport-cc on: start its estimate from
        the rate of what it was just subscribed to."""
        rates = 0.0
        for kind, tracks in stream.tracks.items():
            if kind == "video":
                choice = stream.choices.get(session.id)
                target = choice.target if choice is not None else None
                chosen = target if target is not None else (tracks[0] if tracks else None)
                if chosen is not None:
                    rates += chosen.meter.rates(now)[0]
            elif tracks:
                rates += tracks[0].meter.rates(now)[0]
        session.bandwidth = ViewerBandwidth(
            initial_bps=rates if rates > 0 else DEFAULT_INITIAL_BPS, now=now
        )

    def release(self, session: ViewerSession) -> None:
        self._timers.cancel((TimerKind.HEADROOM_PROBE, session.id))
        session.bandwidth = None

    def feedback(
        self,
        session: ViewerSession,
        stream: Stream | None,
        choice: LayerChoice | None,
        packet: rtcp.TransportWideFeedback,
        now: float,
    ) -> bool:
        """One transport feedback packet of the viewer's. True when it gave the policy
        something new to decide on."""
        bandwidth, slot = session.bandwidth, session.fanout_slot
        if bandwidth is None or slot is None:
            self._counters["viewer_transport_feedback_unexpected"] += 1
            return False
        if (
            stream is None
            or choice is None
            or choice.manual is not None
            or len(stream.layers()) < 2
        ):
            self._counters["viewer_transport_feedback_unused"] += 1
            if choice is not None and choice.probe_started:
                # Chosen by hand (or no longer simulcast) mid-probe: nobody will read it.
                bandwidth.cancel_probe(now)
                choice.probe_started = False
                choice.probe_finished_at = now
                self._counters["headroom_probes_cancelled"] += 1
                self._timers.cancel((TimerKind.HEADROOM_PROBE, session.id))
            return False
        try:
            feedback = rtcp.TransportFeedback.from_packet(packet)
        except rtcp.ParseError:
            self._counters["drop_viewer_transport_feedback"] += 1
            return False
        sent = self.fanout.transport_sent(slot, feedback.base_sequence, len(feedback.deltas))
        bandwidth.on_feedback(feedback, sent, now)
        self._counters["viewer_transport_feedback"] += 1
        if bandwidth.feedback_count >= FEEDBACK_BEFORE_USE:
            bandwidth.start_from_acknowledged()
            choice.estimate = bandwidth.estimate_bps
            choice.estimate_at = now
        self._take_result(bandwidth, choice, now)
        return True

    def _take_result(self, bandwidth: ViewerBandwidth, choice: LayerChoice, now: float) -> None:
        """A finished probe's outcome, for the policy's next decision: judged on feedback,
        or by ``poll`` at the probe's feedback timeout (then the next RR reads it; until
        it is taken, ``probe_started`` would keep the viewer's RR loss ignored)."""
        result = bandwidth.probe_result
        if result is not None and choice.probe_started:
            bandwidth.probe_result = None
            choice.probe_started = False
            choice.probe_succeeded = result.succeeded
            choice.probe_finished_at = now
            self._counters[f"headroom_probes_{result.outcome.name.lower()}"] += 1

    def decided(
        self, session: ViewerSession, stream: Stream, choice: LayerChoice, now: float
    ) -> None:
        """After the policy's decision: start the probe it asked for, or stop one it no
        longer wants (it moved, or the viewer congested)."""
        bandwidth = session.bandwidth
        if bandwidth is None:
            return
        wanted = choice.policy.probe_for
        if wanted is None:
            if choice.probe_started:
                bandwidth.cancel_probe(now)
                choice.probe_started = False
                choice.probe_finished_at = now
                self._counters["headroom_probes_cancelled"] += 1
        elif not choice.probe_started:
            target = self._layers.probe_target(stream, choice, wanted, now)
            if target is None or target <= 0 or bandwidth.state is BandwidthUsage.OVERUSING:
                # A layer that sends nothing now cannot be tested (nor switched to), and
                # a probe into a queue that is already growing would fail for that
                # reason: ask again at the next report.
                return
            sent = bandwidth.sent_bps
            current = choice.target
            besides_video = 0.0
            if sent is not None and current is not None:
                besides_video = max(sent - current.meter.rates(now)[0], 0.0)
            bandwidth.start_probe(PROBE_MARGIN * (target + besides_video), now)
            choice.probe_started = True
            self._counters["headroom_probes_started"] += 1
        self._timers.schedule((TimerKind.HEADROOM_PROBE, session.id), bandwidth.deadline())

    def handle_timer(self, session: ViewerSession, stream: Stream | None, now: float) -> None:
        """The probe's next padding chunk (or its feedback timeout) is due."""
        bandwidth, slot = session.bandwidth, session.fanout_slot
        if bandwidth is None or slot is None:
            return
        choice = stream.choices.get(session.id) if stream is not None else None
        request = bandwidth.poll(now)
        if request is not None and choice is not None and choice.current is not None:
            sent = self.fanout.send_padding(
                slot, choice.current.fanout_id, request.count, request.size
            )
            self._counters["headroom_padding_sent"] += sent
            if sent == 0:
                # No RTX stream yet (its first media packet) or the kernel refused: the
                # path could not be tested, which the policy treats as a failed probe.
                bandwidth.cancel_probe(now)
                choice.probe_started = False
                choice.probe_succeeded = False
                choice.probe_finished_at = now
                self._counters["headroom_probes_unsent"] += 1
        if choice is not None:
            # Past the feedback timeout, poll judged the probe from what was reported.
            self._take_result(bandwidth, choice, now)
        self._timers.schedule((TimerKind.HEADROOM_PROBE, session.id), bandwidth.deadline())
