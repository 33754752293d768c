"""Which simulcast layer each viewer receives, and why (LayerPolicy + state).

Every encoding of a publisher's video is its own Fanout track (a "layer"). Each viewer
receives one layer under its one SSRC: a ``LayerChoice`` records which, chosen through
the layer extension (``LayerSelector.select``, EXT §5) or by the ``LayerPolicy`` from the
viewer's RTCP, and ``Fanout.switch`` moves it keyframe-aligned in C. Layers are ordered
low to high by measured resolution, then bitrate, then signalling (``Stream.layers``).

A viewer admitted below the top layer (capacity's ``admit_lower_layer``) has every
later request held under that layer (``capped_layer_request``, applied by the worker
backends' ``LayerCeilings``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from whepfan import _fastpath
from whepfan.errors import NotFound, PeerError
from whepfan.media.feedback import KeyframeRequests
from whepfan.media.session import ViewerSession
from whepfan.media.streams import Stream, Track
from whepfan.protocol.negotiation import EgressMedia

# Fanout.subscription_state() values (the compiled core's own constants).
SUBSCRIPTION_NONE = _fastpath.SUBSCRIPTION_NONE
SUBSCRIPTION_AWAITING_KEYFRAME = _fastpath.SUBSCRIPTION_AWAITING_KEYFRAME
SUBSCRIPTION_FORWARDING = _fastpath.SUBSCRIPTION_FORWARDING

_log = logging.getLogger(__name__)

# How often the SSE ``layers`` event repeats an unchanged payload (EXT §4.3.3).
LAYERS_EVENT_REFRESH = 5.0
# RTCP RR intervals are ~1 s in Chromium (RFC 3550 §6.2 scaled to the session's RTCP
# bandwidth): the first RR after a probe still counts the losses it caused.
PROBE_LOSS_GRACE = 1.5
# Chromium sends transport feedback every 50-250 ms (100 ms at these rates); without any
# for this long, its estimate is stale.
ESTIMATE_FRESH_FOR = 1.0

Subscribe = Callable[[ViewerSession, EgressMedia, Track], None]
Emit = Callable[[str, str, dict[str, object]], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerRequest:
    """A viewer's layer choice (WHEP layer extension, EXT §5; spec notes §4.3). Nothing
    set means "automatic"; max* fields constrain the automatic choice too."""

    media_id: str | None = None
    rid: str | None = None
    spatial_layer: int | None = None
    temporal_layer: int | None = None
    max_spatial_layer: int | None = None
    max_temporal_layer: int | None = None
    max_width: int | None = None
    max_height: int | None = None

    @property
    def automatic(self) -> bool:
        return self.rid is None and self.spatial_layer is None


@dataclass(eq=False, kw_only=True)
class LayerPolicyState:
    """Per-viewer memory of the automatic policy (see ``LayerPolicy``)."""

    up_wait: float
    clean_since: float | None = None
    moved_at: float = -math.inf
    raised_at: float | None = None
    # Headroom probes (viewers with transport-wide cc): the layer a probe was asked for;
    # the driver starts it (``ViewerBandwidth.start_probe``) and reports its outcome.
    probe_for: int | None = None
    lossy_reports: int = 0  # consecutive RRs above loss_down


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerPolicy:
    """Automatic simulcast layer choice from what the viewer reports, with hysteresis.

    Down (after ``hold`` on the current layer) when two RTCP RRs in a row show more than
    ``loss_down`` of their interval's packets lost (RFC 3550 §6.4.1 fraction lost), or one
    shows more than ``loss_down_at_once``: a single interval of moderate loss is what one
    keyframe burst costs on a shallow queue (a 50 ms tbf drops part of every keyframe),
    repaired by NACK, not a layer too large for the link. Also down when
    the viewer's REMB estimate (draft-alvestrand-rmcat-remb §2) falls below
    ``remb_margin`` times what the current layer sends; as far down as the REMB requires.
    Up one layer after ``up_wait`` of clean reports (loss at most ``loss_clean``) and no
    REMB congestion. A REMB is not required to exceed the next layer's rate: it is a
    receive-side estimate, about the rate received while the link is clear, so without
    probing it never shows room for more. Instead, an upswitch followed by a downswitch
    within ``failed_up_window`` doubles the wait before the next try (up to
    ``max_up_wait``), so a viewer on a marginal link does not oscillate.

    A viewer that returns transport-wide feedback (draft-holmer-rmcat-transport-wide-cc-
    extensions-01) has a send-side ``estimate`` (media/bandwidth.py): it counts as
    congestion like a REMB and takes over from RR loss (which then only decides whether
    reports are clean), and it replaces the blind upswitch with a test. After
    ``up_wait`` of clean reports the policy asks for a headroom probe (``state.probe_for``:
    padding tops the viewer's rate up to the next layer's for about a second); the viewer
    moves up only if the probe succeeds, and a failed probe doubles the wait as a failed
    upswitch does, without the viewer ever seeing the layer it could not carry.
    """

    loss_down: float = 0.10
    loss_down_at_once: float = 0.20
    loss_clean: float = 0.02
    up_wait: float = 5.0
    max_up_wait: float = 60.0
    failed_up_window: float = 10.0
    remb_margin: float = 0.85
    hold: float = 2.0

    def new_state(self) -> LayerPolicyState:
        return LayerPolicyState(up_wait=self.up_wait)

    @staticmethod
    def initial(count: int) -> int:
        """New viewers start in the middle (index into layers ordered low to high)."""
        return max(count - 1, 0) // 2

    def decide(
        self,
        state: LayerPolicyState,
        *,
        bitrates: Sequence[float],
        current: int,
        ceiling: int,
        fraction_lost: float | None,
        remb: int | None,
        now: float,
        estimate: float | None = None,
        probe_succeeded: bool | None = None,
    ) -> int:
        """The layer index (``bitrates`` ordered low to high) the viewer should be on.

        ``estimate``: the viewer's transport-wide-cc estimate (bit/s), None when it sends
        no such feedback; ``probe_succeeded``: the outcome of the probe asked for in
        ``state.probe_for``, once it is known (None: none finished since the last call).
        """
        if current > ceiling:
            state.moved_at = now
            state.probe_for = None
            return ceiling
        probed_layer = state.probe_for if probe_succeeded is not None else None
        if probe_succeeded is not None:
            state.probe_for = None
        limits = [bps for bps in (remb, estimate) if bps is not None]
        limit = min(limits) if limits else None
        lossy = False
        if fraction_lost is not None:
            if fraction_lost > self.loss_down:
                state.lossy_reports += 1
                lossy = state.lossy_reports >= 2 or fraction_lost > self.loss_down_at_once
            else:
                state.lossy_reports = 0
        if estimate is not None:
            # Transport feedback reports every packet's fate each ~100 ms and the
            # estimate's loss-based part reacts to it (gcc-02 §6), while an RR's fraction
            # lost also counts a keyframe burst's tail drops that NACK repairs (measured:
            # 33 % in one RR on a 700 kbit/s link whose layer fitted, no freeze). With an
            # estimate, RR loss only keeps the viewer from counting as clean.
            lossy = False
        congested = lossy or (limit is not None and limit < bitrates[current] * self.remb_margin)
        if congested:
            state.clean_since = None
            state.probe_for = None
            if current == 0 or now - state.moved_at < self.hold:
                return current
            target = current - 1
            if limit is not None:
                while target > 0 and bitrates[target] > limit:
                    target -= 1
            if state.raised_at is not None and now - state.raised_at < self.failed_up_window:
                state.up_wait = min(state.up_wait * 2, self.max_up_wait)
            state.raised_at = None
            state.moved_at = now
            state.lossy_reports = 0
            return target
        if probe_succeeded is False:
            # The path did not carry the next layer: as a failed upswitch, wait longer.
            state.up_wait = min(state.up_wait * 2, self.max_up_wait)
            state.clean_since = now
            return current
        if fraction_lost is not None and fraction_lost > self.loss_clean:
            state.clean_since = None
            return current
        if state.clean_since is None:
            state.clean_since = now
        if (
            current >= ceiling
            or now - state.clean_since < state.up_wait
            or now - state.moved_at < self.hold
        ):
            return current
        if estimate is not None and not (probe_succeeded and probed_layer == current + 1):
            # Ask for a probe of the next layer (unless one is under way) and stay.
            if state.probe_for is None:
                state.probe_for = current + 1
            return current
        state.clean_since = state.moved_at = state.raised_at = now
        return current + 1


@dataclass(eq=False, kw_only=True)
class LayerChoice:
    """Which layer of a simulcast media one viewer receives, and why."""

    session: ViewerSession
    egress: EgressMedia
    policy: LayerPolicyState
    current: Track | None = None  # forwarding (Fanout subscription state 2 or 1 at start)
    pending: Track | None = None  # Fanout.switch() issued, waiting for its keyframe
    manual: Track | None = None  # chosen through the layer extension; None: automatic
    temporal_limit: int = -1  # -1: every temporal layer
    max_spatial_layer: int | None = None
    max_width: int | None = None
    max_height: int | None = None
    fraction_lost: float | None = None
    remb: int | None = None
    estimate: float | None = None  # transport-wide-cc estimate (media/headroom.py)
    estimate_at: float = -math.inf  # when the feedback behind it arrived
    probe_started: bool = False  # a probe for policy.probe_for is running
    probe_succeeded: bool | None = None  # its outcome, until the policy reads it
    probe_finished_at: float = -math.inf

    @property
    def target(self) -> Track | None:
        return self.pending or self.current


def capped_layer_request(
    request: LayerRequest, layers: Sequence[Track], ceiling: int
) -> LayerRequest:
    """``request`` (EXT §5) as a viewer admitted no higher than layer ``ceiling`` (index
    low to high, as the router counts) may have it: a layer named above the ceiling
    becomes the ceiling layer, and maxSpatialLayerId never exceeds it, so neither a
    manual pick nor the automatic policy (a request with nothing set) climbs over the
    cost the viewer was admitted at. A rid or index the stream does not have is left
    for the router to refuse (400)."""
    if request.rid is not None:
        named = next((i for i, track in enumerate(layers) if track.rid == request.rid), None)
    else:
        named = request.spatial_layer
    limit = (
        ceiling if request.max_spatial_layer is None else min(request.max_spatial_layer, ceiling)
    )
    if named is not None and ceiling < named < len(layers):
        return replace(request, rid=None, spatial_layer=ceiling, max_spatial_layer=limit)
    return replace(request, max_spatial_layer=limit)


class LayerSelector:
    """The layer choices of one worker's viewers: what the layer API asks, what the
    policy decides from RTCP, and the Fanout subscriptions and switches that follow."""

    def __init__(
        self,
        *,
        fanout: _fastpath.Fanout,
        policy: LayerPolicy,
        keyframes: KeyframeRequests,
        subscribe: Subscribe,
        emit: Emit,
        counters: Counter[str],
    ) -> None:
        self.fanout = fanout
        self.policy = policy
        self._keyframes = keyframes
        self._subscribe = subscribe
        self._emit = emit
        self._counters = counters
        self._choice_by_slot: dict[int, LayerChoice] = {}

    # choices ---------------------------------------------------------------------------

    def new_choice(self, stream: Stream, session: ViewerSession) -> LayerChoice | None:
        """Every viewer's video gets a LayerChoice (one layer or many), so the layer API
        answers the same way whether or not the stream is simulcast."""
        video = next((m for m in session.egress if m.kind == "video"), None)
        if video is None:
            return None
        choice = LayerChoice(session=session, egress=video, policy=self.policy.new_state())
        stream.choices[session.id] = choice
        return choice

    def bind_slot(self, slot: int, choice: LayerChoice) -> None:
        """The viewer got its Fanout slot: switch completions are reported by slot."""
        self._choice_by_slot[slot] = choice

    def release(self, stream: Stream | None, session: ViewerSession) -> None:
        """The viewer is gone."""
        if session.fanout_slot is not None:
            self._choice_by_slot.pop(session.fanout_slot, None)
        if stream is not None:
            stream.choices.pop(session.id, None)

    # the layer API (EXT §5) --------------------------------------------------------------

    def select(
        self, stream: Stream, session: ViewerSession, request: LayerRequest, now: float
    ) -> dict[str, object]:
        """Pin a viewer to a layer, constrain it, or (nothing set) return it to automatic
        choice. Raises PeerError (400) for a media or layer the stream does not have.
        Returns the viewer's layer state (``status``)."""
        choice = stream.choices.get(session.id)
        if choice is None:
            raise PeerError("this session receives no video")
        if request.media_id is not None and not _names_media(session, choice, request):
            raise PeerError(f"mediaId {request.media_id!r} is not a video m-line of the session")
        layers = stream.layers()
        manual: Track | None = None
        if request.rid is not None:
            manual = next((t for t in layers if t.rid == request.rid), None)
            if manual is None:
                known = ", ".join(t.rid for t in layers if t.rid) or "none"
                raise PeerError(f"no layer with rid {request.rid!r} (layers: {known})")
        elif request.spatial_layer is not None:
            if not 0 <= request.spatial_layer < len(layers):
                raise PeerError(f"no spatial layer {request.spatial_layer}")
            manual = layers[request.spatial_layer]
        if request.max_spatial_layer is not None and request.max_spatial_layer < 0:
            raise PeerError("maxSpatialLayerId is not negative")
        temporal = request.temporal_layer
        if request.max_temporal_layer is not None:
            temporal = (
                request.max_temporal_layer
                if temporal is None
                else min(temporal, request.max_temporal_layer)
            )
        # TID is 2 bits in VP8 (RFC 7741 §4.2) and 3 bits in VP9 (RFC 9628 §4.2).
        highest_tid = 7 if any(t.codec_name.upper() == "VP9" for t in layers) else 3
        if temporal is not None and not 0 <= temporal <= highest_tid:
            raise PeerError(f"a temporal layer id is 0..{highest_tid} for this codec")
        choice.manual = manual
        choice.temporal_limit = -1 if temporal is None else temporal
        choice.max_spatial_layer = request.max_spatial_layer
        choice.max_width, choice.max_height = request.max_width, request.max_height
        choice.policy = self.policy.new_state()
        self._counters["layer_selections" if manual is not None else "layer_automatic"] += 1
        self.apply(stream, choice, now)
        return self.status(stream, session, now)

    def status(self, stream: Stream, session: ViewerSession, now: float) -> dict[str, object]:
        """One viewer's layer state for the layer API (GET on the layer URL)."""
        choice = stream.choices.get(session.id)
        if choice is None:
            raise NotFound("this session receives no video")
        layers = stream.layers()
        return {
            "mediaId": choice.egress.mid,
            "automatic": choice.manual is None,
            "rid": choice.current.rid if choice.current is not None else None,
            "pendingRid": choice.pending.rid if choice.pending is not None else None,
            "temporalLayerId": choice.temporal_limit if choice.temporal_limit >= 0 else None,
            "maxWidth": choice.max_width,
            "maxHeight": choice.max_height,
            "layers": [track.layer_info(now, index) for index, track in enumerate(layers)],
        }

    @staticmethod
    def stream_layers(stream: Stream, now: float) -> dict[str, object]:
        """The SSE ``layers`` payload (EXT §4.3.3): keyed by the m-line index of the
        publisher's video, a list of layers low to high with measured bitrate, size and
        frame rate. Viewers of a WHEP session number m-lines the same way in practice
        (audio, then video)."""
        if stream.publisher is None:
            return {}
        report: dict[str, object] = {}
        for index, media in enumerate(stream.publisher.ingest):
            if media.kind == "video":
                layers = stream.layers()
                report[str(index)] = [t.layer_info(now, i) for i, t in enumerate(layers)]
        return report

    def report(self, stream: Stream, now: float) -> None:
        """The SSE ``layers`` event, when the layers changed or every few seconds (EXT
        §4.3.3 allows either); the event hub drops repeats of an unchanged payload."""
        report = self.stream_layers(stream, now)
        if not report:
            return
        shape = {
            key: [(layer["rid"], layer.get("width"), layer.get("height")) for layer in value]
            for key, value in report.items()
            if isinstance(value, list)
        }
        if (
            shape != stream.layers_reported
            or now - stream.layers_reported_at >= LAYERS_EVENT_REFRESH
        ):
            stream.layers_reported, stream.layers_reported_at = shape, now
            self._emit(stream.name, "layers", report)

    # decisions -----------------------------------------------------------------------------

    def ceiling(self, choice: LayerChoice, layers: list[Track]) -> int:
        """The highest layer index allowed by maxSpatialLayerId / maxWidth / maxHeight (at
        least the lowest layer, so a too-small limit still gets a picture)."""
        ceiling = len(layers) - 1
        if choice.max_spatial_layer is not None:
            ceiling = min(ceiling, choice.max_spatial_layer)
        while ceiling > 0:
            track = layers[ceiling]
            too_wide = choice.max_width is not None and (track.width or 0) > choice.max_width
            too_tall = choice.max_height is not None and (track.height or 0) > choice.max_height
            if not (too_wide or too_tall):
                break
            ceiling -= 1
        return max(ceiling, 0)

    def viewer_reported(self, stream: Stream, choice: LayerChoice, now: float) -> None:
        """An RR or REMB of the viewer's (``choice.fraction_lost``/``remb`` updated):
        the automatic policy may move it."""
        if choice.manual is not None:
            return
        layers = stream.layers()
        current = choice.target
        if len(layers) < 2 or current is None or current not in layers:
            return
        index = layers.index(current)
        # Probes are padding on the viewer's RTX stream: without one, no estimate-driven
        # upswitch either (the policy falls back to trying the layer).
        can_probe = choice.egress.rtx_ssrc is not None
        fraction_lost = choice.fraction_lost
        if choice.probe_started or now - choice.probe_finished_at < PROBE_LOSS_GRACE:
            # An RR covering a probe reports what the probe's padding did to the queue
            # (tail drops of media behind it), not what the layer alone costs; the
            # estimate still shows real congestion.
            fraction_lost = None
        bitrates = [track.meter.rates(now)[0] for track in layers]
        ceiling = self.ceiling(choice, layers)
        # An estimate whose feedback stopped says nothing about the path now: RR loss and
        # REMB decide again (and the upswitch is tried blind, as without one).
        fresh = now - choice.estimate_at <= ESTIMATE_FRESH_FOR
        estimate = choice.estimate if can_probe and fresh else None
        probe_succeeded = choice.probe_succeeded
        target = self.policy.decide(
            choice.policy,
            bitrates=bitrates,
            current=index,
            ceiling=ceiling,
            fraction_lost=fraction_lost,
            remb=choice.remb,
            now=now,
            estimate=estimate,
            probe_succeeded=probe_succeeded,
        )
        choice.fraction_lost = None  # each report is used once
        choice.probe_succeeded = None
        if target != index:
            if target < index:
                self._counters["layer_auto_down"] += 1
                reason = _down_reason(
                    self.policy,
                    bitrates[index],
                    index > ceiling,
                    fraction_lost,
                    choice.remb,
                    estimate,
                )
                self._counters[f"layer_auto_down_{reason}"] += 1
            else:
                self._counters["layer_auto_up"] += 1
                reason = "probe" if probe_succeeded else "clean"
                self._counters[f"layer_auto_up_{reason}"] += 1
            _log.debug(
                "viewer %s of %s: layer %s -> %s (%s; lost %s, remb %s, estimate %s, "
                "layer rates %s)",
                choice.session.id[:8],
                stream.name,
                layers[index].rid,
                layers[target].rid,
                reason,
                fraction_lost,
                choice.remb,
                None if estimate is None else round(estimate),
                [round(bps) for bps in bitrates],
            )
            self._move(stream, choice, layers[target], now)

    def probe_target(
        self, stream: Stream, choice: LayerChoice, layer: int, now: float
    ) -> float | None:
        """The measured rate (bit/s) of layer index ``layer`` (low to high), the video a
        headroom probe must show room for; None when there is no such layer now."""
        layers = stream.layers()
        if not 0 <= layer < len(layers):
            return None
        return layers[layer].meter.rates(now)[0]

    def apply(self, stream: Stream, choice: LayerChoice, now: float) -> None:
        """Bring the viewer's subscription in line with its choice (manual or automatic)."""
        layers = stream.layers()
        if not layers:
            return
        ceiling = self.ceiling(choice, layers)
        if choice.manual is not None and choice.manual.active:
            target = choice.manual
        elif choice.target is not None and choice.target in layers:
            target = layers[min(layers.index(choice.target), ceiling)]
        else:
            target = layers[min(self.policy.initial(len(layers)), ceiling)]
        self._move(stream, choice, target, now)

    def apply_all_inactive(self, stream: Stream, now: float) -> None:
        """A publisher (re)attached: viewers on a layer it no longer sends are moved."""
        for choice in list(stream.choices.values()):
            if choice.target is not None and not choice.target.active:
                self.apply(stream, choice, now)

    def _move(self, stream: Stream, choice: LayerChoice, target: Track, now: float) -> None:
        """Subscribe, or switch keyframe-aligned (Fanout.switch), to ``target``."""
        slot = choice.session.fanout_slot
        fanout = self.fanout
        if slot is None:
            # Not keyed yet: remember; the viewer subscribes to its choice once keyed.
            choice.current = target
            return
        if choice.pending is not None and choice.pending is not target:
            fanout.unsubscribe(slot, choice.pending.fanout_id)
            choice.pending = None
        if (
            choice.current is None
            or fanout.subscription_state(slot, choice.current.fanout_id) == SUBSCRIPTION_NONE
        ):
            self._subscribe(choice.session, choice.egress, target)
            choice.current = target
        elif choice.current is not target and choice.pending is None:
            fanout.switch(slot, choice.current.fanout_id, target.fanout_id)
            choice.pending = target
            self._counters["layer_switches_started"] += 1
        for track in (choice.current, choice.pending):
            if track is not None:
                fanout.set_temporal_layer(slot, track.fanout_id, choice.temporal_limit)
        waiting = [
            track
            for track in (choice.current, choice.pending)
            if track is not None
            and fanout.subscription_state(slot, track.fanout_id) == SUBSCRIPTION_AWAITING_KEYFRAME
        ]
        if waiting:
            # The switch (or the start) completes on the target's next keyframe: ask now.
            self._keyframes.request(stream, now, tracks=waiting)

    def switches_completed(self) -> None:
        """Collect the Fanout's completed switches (after a video push)."""
        for slot, _, to_track in self.fanout.take_switches():
            choice = self._choice_by_slot.get(slot)
            if choice is None or choice.pending is None or choice.pending.fanout_id != to_track:
                continue
            choice.current, choice.pending = choice.pending, None
            choice.session.track_by_ssrc[choice.egress.ssrc] = to_track
            self._counters["layer_switches_completed"] += 1


def _names_media(session: ViewerSession, choice: LayerChoice, request: LayerRequest) -> bool:
    """mediaId is the m-line index (EXT §5); players also send the mid, often equal."""
    if request.media_id == choice.egress.mid:
        return True
    return request.media_id == str(session.egress.index(choice.egress))


def _down_reason(
    policy: LayerPolicy,
    bitrate: float,
    above_ceiling: bool,
    fraction_lost: float | None,
    remb: int | None,
    estimate: float | None,
) -> str:
    """Why the policy moved a viewer down (the ``layer_auto_down_<reason>`` counters,
    exported as ``whepfan_layer_moves_total``): the first that applies."""
    if above_ceiling:
        return "ceiling"
    if fraction_lost is not None and fraction_lost > policy.loss_down:
        return "loss"  # (the second report in a row, or one above loss_down_at_once)
    if estimate is not None and estimate < bitrate * policy.remb_margin:
        return "estimate"
    return "remb"
