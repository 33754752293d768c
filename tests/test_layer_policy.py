"""Layer choice (media/layers.py) on virtual time: the automatic ``LayerPolicy``, the
layer ceilings of ``LayerSelector``, and the one lower-layer admission rule both worker
backends apply (``workers.capacity.LayerCeilings``).

Policy tests are pure decisions: a state object, bitrates ordered low to high, and
``now`` stepped by hand, as mediasoup tests its managers (no sockets, no clock)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from whepfan.errors import PeerError
from whepfan.media.layers import LayerChoice, LayerPolicy, LayerRequest
from whepfan.media.streams import Track
from whepfan.workers.capacity import LayerCeilings

# --- the automatic policy on virtual time -------------------------------------------------

LOW, MID, HIGH = 200_000.0, 600_000.0, 1_800_000.0


def test_policy_starts_in_the_middle() -> None:
    assert [LayerPolicy.initial(n) for n in (1, 2, 3, 4)] == [0, 0, 1, 1]


def test_policy_moves_down_on_loss_and_back_up_after_a_clean_period() -> None:
    policy = LayerPolicy()
    state = policy.new_state()
    bitrates = [LOW, MID, HIGH]
    now, layer = 100.0, 2

    def report(lost: float) -> int:
        return policy.decide(
            state,
            bitrates=bitrates,
            current=layer,
            ceiling=2,
            fraction_lost=lost,
            remb=None,
            now=now,
        )

    layer = report(0.25)  # RFC 3550 §6.4.1 fraction lost 64/256
    assert layer == 1
    now += 1.0
    assert report(0.25) == 1  # held: ``hold`` seconds on a layer before moving again
    now += 1.0
    layer = report(0.25)
    assert layer == 0
    now += 1.0
    assert report(0.30) == 0  # nothing lower
    # Clean reports: up one layer once they have lasted ``up_wait``, not before.
    for _ in range(5):
        now += 1.0
        assert report(0.0) == 0
    now += 1.0
    layer = report(0.01)
    assert layer == 1
    # Middling loss neither moves nor counts as clean.
    for _ in range(10):
        now += 1.0
        assert report(0.05) == 1


def test_policy_doubles_the_wait_after_a_failed_upswitch() -> None:
    policy = LayerPolicy(up_wait=5.0)
    state = policy.new_state()

    def decide(current: int, lost: float, now: float) -> int:
        return policy.decide(
            state,
            bitrates=[LOW, MID, HIGH],
            current=current,
            ceiling=2,
            fraction_lost=lost,
            remb=None,
            now=now,
        )

    assert decide(1, 0.0, 0.0) == 1
    assert decide(1, 0.0, 5.0) == 2
    assert decide(2, 0.4, 8.0) == 1  # the higher layer did not fit
    assert state.up_wait == 10.0
    assert decide(1, 0.0, 17.0) == 1  # the first clean report after the fall
    assert decide(1, 0.0, 26.0) == 1  # 9 s clean: enough before, not now
    assert decide(1, 0.0, 27.0) == 2


def test_policy_follows_remb_down_as_far_as_needed_and_respects_the_ceiling() -> None:
    policy = LayerPolicy()
    state = policy.new_state()
    bitrates = [LOW, MID, HIGH]
    # A REMB of 300 kbit/s (draft-alvestrand-rmcat-remb §2) fits only the low layer.
    assert (
        policy.decide(
            state,
            bitrates=bitrates,
            current=2,
            ceiling=2,
            fraction_lost=0.0,
            remb=300_000,
            now=0.0,
        )
        == 0
    )
    # A REMB around what the layer sends is no congestion.
    state = policy.new_state()
    assert (
        policy.decide(
            state,
            bitrates=bitrates,
            current=1,
            ceiling=2,
            fraction_lost=None,
            remb=620_000,
            now=0.0,
        )
        == 1
    )
    # A viewer above its ceiling (maxWidth/maxHeight) goes down at once.
    assert (
        policy.decide(
            state,
            bitrates=bitrates,
            current=2,
            ceiling=0,
            fraction_lost=None,
            remb=None,
            now=1.0,
        )
        == 0
    )
    # ... and is never raised above it, however clean.
    for second in range(2, 60):
        assert (
            policy.decide(
                state,
                bitrates=bitrates,
                current=0,
                ceiling=0,
                fraction_lost=0.0,
                remb=None,
                now=float(second),
            )
            == 0
        )


def test_policy_waits_hold_seconds_after_a_move_before_moving_again() -> None:
    policy = LayerPolicy(hold=2.0, up_wait=1.0)
    state = policy.new_state()

    def decide(current: int, lost: float | None, now: float) -> int:
        return policy.decide(
            state,
            bitrates=[LOW, MID, HIGH],
            current=current,
            ceiling=2,
            fraction_lost=lost,
            remb=None,
            now=now,
        )

    assert decide(2, 0.5, 10.0) == 1  # down
    assert decide(1, 0.0, 11.0) == 1  # clean, but within ``hold`` of the move
    assert decide(1, 0.0, 12.0) == 2  # hold passed and up_wait of clean reports
    assert decide(2, 0.5, 13.0) == 2  # within hold of the upswitch: stays...
    assert decide(2, 0.5, 14.0) == 1  # ...then down, and the failed try doubles the wait
    assert state.up_wait == 2.0


def test_policy_caps_the_doubled_wait() -> None:
    policy = LayerPolicy(up_wait=5.0, max_up_wait=12.0, hold=0.0, failed_up_window=100.0)
    state = policy.new_state()
    now = 0.0
    for _ in range(5):  # up, then straight down again: a marginal link
        now += state.up_wait + 1
        up = policy.decide(
            state,
            bitrates=[LOW, HIGH],
            current=0,
            ceiling=1,
            fraction_lost=0.0,
            remb=None,
            now=now - state.up_wait,
        )
        up = policy.decide(
            state,
            bitrates=[LOW, HIGH],
            current=0,
            ceiling=1,
            fraction_lost=0.0,
            remb=None,
            now=now,
        )
        assert up == 1
        assert (
            policy.decide(
                state,
                bitrates=[LOW, HIGH],
                current=1,
                ceiling=1,
                fraction_lost=0.5,
                remb=None,
                now=now + 0.5,
            )
            == 0
        )
        now += 0.5
    assert state.up_wait == 12.0


# --- ceilings ---------------------------------------------------------------------------------


def _layers(*sizes: tuple[int, int]) -> list[Track]:
    return [
        Track(
            fanout_id=index,
            kind="video",
            ingest=None,  # type: ignore[arg-type]  # ceilings read sizes only
            codec_name="VP8",
            clock_rate=90000,
            encoding_index=index,
            width=width,
            height=height,
        )
        for index, (width, height) in enumerate(sizes)
    ]


def _ceiling(choice_limits: dict[str, int | None], layers: list[Track]) -> int:
    from whepfan.media.layers import LayerSelector

    choice = LayerChoice(
        session=None,  # type: ignore[arg-type]
        egress=None,  # type: ignore[arg-type]
        policy=LayerPolicy().new_state(),
        **choice_limits,  # type: ignore[arg-type]
    )
    selector = LayerSelector.__new__(LayerSelector)  # ceiling() reads only the choice
    return selector.ceiling(choice, layers)


# --- with a transport-wide-cc estimate: probe before moving up ------------------------------


class _EstimatedViewer:
    """A viewer with a send-side estimate, reporting every 100 ms of virtual time."""

    def __init__(self, policy: LayerPolicy, layer: int) -> None:
        self.policy, self.state, self.layer, self.now = policy, policy.new_state(), layer, 0.0

    def report(
        self,
        estimate: float,
        *,
        lost: float = 0.0,
        probe_succeeded: bool | None = None,
        seconds: float = 0.1,
    ) -> int:
        self.now += seconds
        self.layer = self.policy.decide(
            self.state,
            bitrates=[LOW, MID, HIGH],
            current=self.layer,
            ceiling=2,
            fraction_lost=lost,
            remb=None,
            now=self.now,
            estimate=estimate,
            probe_succeeded=probe_succeeded,
        )
        return self.layer


def test_an_estimated_viewer_moves_up_only_after_its_probe_succeeds() -> None:
    viewer = _EstimatedViewer(LayerPolicy(up_wait=5.0, hold=2.0), layer=1)
    first = viewer.now + 0.1  # clean since the first report
    while viewer.state.probe_for is None:  # nothing moves meanwhile
        assert viewer.report(MID * 1.2) == 1
    # after up_wait of clean reports (to within a report interval), a probe of layer 2
    assert viewer.now - first == pytest.approx(5.0, abs=0.15)
    assert viewer.state.probe_for == 2
    for _ in range(10):  # while it runs, nothing moves and nothing else is asked
        assert viewer.report(MID * 1.2) == 1
        assert viewer.state.probe_for == 2
    assert viewer.report(HIGH * 1.05, probe_succeeded=True) == 2
    assert viewer.state.probe_for is None


def test_a_failed_probe_doubles_the_wait_and_the_viewer_never_sees_the_layer() -> None:
    viewer = _EstimatedViewer(LayerPolicy(up_wait=5.0, hold=2.0, max_up_wait=60.0), layer=1)
    clean_since = viewer.now + 0.1
    waits = []
    for _ in range(3):
        while viewer.state.probe_for is None:
            assert viewer.report(MID * 1.1) == 1
        waits.append(viewer.now - clean_since)
        assert viewer.report(MID * 1.1, probe_succeeded=False) == 1
        assert viewer.state.probe_for is None
        clean_since = viewer.now  # the failure restarts the clean period
    # 5 s of clean reports before the first probe, then 10 s, then 20 s (each to within
    # a report interval)
    assert waits == [pytest.approx(wait, abs=0.15) for wait in (5.0, 10.0, 20.0)]
    assert viewer.state.up_wait == 40.0


def test_an_estimate_below_the_layer_moves_the_viewer_down_as_far_as_it_needs() -> None:
    viewer = _EstimatedViewer(LayerPolicy(hold=2.0), layer=2)
    viewer.now = 10.0
    assert viewer.report(HIGH * 0.9) == 2  # within the margin (0.85): stays
    assert viewer.report(MID * 0.95) == 0  # below the top and the middle layer: lowest
    viewer = _EstimatedViewer(LayerPolicy(hold=2.0), layer=2)
    viewer.now = 10.0
    assert viewer.report(MID * 1.3) == 1  # the middle layer fits what the path carries


def test_congestion_during_a_probe_drops_the_probe_request() -> None:
    viewer = _EstimatedViewer(LayerPolicy(up_wait=1.0, hold=0.5), layer=1)
    while viewer.state.probe_for is None:
        viewer.report(MID * 1.2)
    assert viewer.report(LOW * 1.1) == 0  # the estimate fell: down, and no probe is wanted
    assert viewer.state.probe_for is None
    # A result arriving after that is for a layer no longer next: it moves nothing.
    assert viewer.report(MID * 1.2, probe_succeeded=True) == 0


def test_a_viewer_without_an_estimate_keeps_the_blind_upswitch() -> None:
    policy = LayerPolicy(up_wait=5.0, hold=2.0)
    state = policy.new_state()
    layer, now = 1, 0.0
    for _ in range(60):
        now += 0.1
        layer = policy.decide(
            state,
            bitrates=[LOW, MID, HIGH],
            current=layer,
            ceiling=2,
            fraction_lost=0.0,
            remb=None,
            now=now,
        )
    assert layer == 2 and state.probe_for is None


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({}, 2),
        ({"max_spatial_layer": 1}, 1),
        ({"max_width": 640}, 1),
        ({"max_height": 300}, 0),
        ({"max_width": 100}, 0),  # too small for every layer: still the lowest picture
        ({"max_spatial_layer": 2, "max_height": 360}, 1),
    ],
)
def test_the_ceiling_is_the_highest_layer_every_limit_allows(
    limits: dict[str, int | None], expected: int
) -> None:
    layers = _layers((320, 180), (640, 360), (1280, 720))
    assert _ceiling(limits, layers) == expected


# --- the lower-layer admission rule (both worker backends) -----------------------------------


class _Stream:
    def __init__(self, layers: Sequence[str]) -> None:
        self._layers = list(layers)

    def layers(self) -> list[str]:
        return self._layers


class _Router:
    def __init__(self, *, video: bool = True) -> None:
        self.requests: list[tuple[str, LayerRequest]] = []
        self.video = video

    def select_layer(self, session_id: str, request: LayerRequest, now: float) -> dict[str, object]:
        if not self.video:
            raise PeerError("this session receives no video")
        self.requests.append((session_id, request))
        return {}


@pytest.mark.parametrize(
    ("active_layers", "from_top", "ceiling"),
    [(3, 1, 1), (3, 2, 0), (3, 5, 0), (2, 1, 0), (1, 1, None), (0, 1, None)],
)
def test_a_ceiling_counts_the_streams_active_layers(
    active_layers: int, from_top: int, ceiling: int | None
) -> None:
    """One rule for ``--workers 1`` and each worker process: the ceiling is counted from
    ``Stream.layers()`` (active layers, low to high) on the viewer's own worker, so both
    backends cap a viewer admitted ``from_top`` layers down at the same index."""
    ceilings = LayerCeilings()
    router = _Router()
    stream = _Stream(["q", "h", "f"][:active_layers])
    assert ceilings.cap(router, "v", stream, from_top, 0.0) == ceiling
    if ceiling is None:
        assert router.requests == [] and "v" not in ceilings
    else:
        assert router.requests == [("v", LayerRequest(max_spatial_layer=ceiling))]
        assert ceilings.get("v") == ceiling and ceilings.capped == 1


def test_a_ceiling_holds_later_requests_and_leaves_with_the_session() -> None:
    ceilings = LayerCeilings()
    stream = _Stream(["q", "h", "f"])
    ceilings.cap(_Router(), "v", stream, 2, 0.0)
    held = ceilings.held("v", LayerRequest(spatial_layer=2), stream)
    assert held == LayerRequest(spatial_layer=0, max_spatial_layer=0)
    assert ceilings.held("other", LayerRequest(spatial_layer=2), stream) == LayerRequest(
        spatial_layer=2
    )
    ceilings.forget("v")
    assert "v" not in ceilings


def test_an_audio_only_viewer_gets_no_ceiling() -> None:
    ceilings = LayerCeilings()
    assert ceilings.cap(_Router(video=False), "v", _Stream(["q", "f"]), 1, 0.0) is None
    assert ceilings.capped == 0


def test_one_moderately_lossy_report_is_a_keyframe_burst_two_are_congestion() -> None:
    """A 700 kbit/s link with a 50 ms queue drops part of every keyframe of a layer that
    otherwise fits: one RR of 10-20 % loss is that, NACK repairs it; two in a row, or one
    above loss_down_at_once, mean the layer is too large."""
    policy = LayerPolicy(hold=0.0)
    state = policy.new_state()

    def report(lost: float, now: float, layer: int = 2) -> int:
        return policy.decide(
            state,
            bitrates=[LOW, MID, HIGH],
            current=layer,
            ceiling=2,
            fraction_lost=lost,
            remb=None,
            now=now,
        )

    assert report(0.15, 1.0) == 2  # one burst
    assert report(0.0, 2.0) == 2  # a clean report in between: the count starts again
    assert report(0.15, 3.0) == 2
    assert report(0.15, 4.0) == 1  # two in a row
    assert report(0.15, 5.0, layer=1) == 1  # the count starts again on the new layer
    assert report(0.25, 6.0, layer=1) == 0  # above loss_down_at_once: at once
