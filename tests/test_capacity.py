"""Capacity accounting: per-viewer cost against worker packet budgets, the egress budget
and per-stream caps; least-loaded placement; lower-layer admission; refusals counted;
and over HTTP, 503 + Retry-After exactly when the budget is reached."""

from __future__ import annotations

import aiohttp
import pytest
from _server import live_server
from _signalling import publish, view
from hypothesis import given
from hypothesis import strategies as st

from whepfan.errors import ServiceUnavailable
from whepfan.media.health import LatencyHistogram
from whepfan.workers.calibrate import calibrate
from whepfan.workers.capacity import (
    DEFAULT_VIEWER_COST,
    PACKET_OVERHEAD_BYTES,
    CapacityLedger,
    CapacityPolicy,
    LayerCost,
    RateMeter,
    stream_layers,
)
from whepfan.workers.in_process import InProcessWorkers

COST = LayerCost(packets_per_second=200.0, bits_per_second=1_600_000.0)


def _fill(ledger: CapacityLedger, stream: str = "s") -> list[int]:
    """Admit viewers until refused; the workers they went to, in order."""
    placed: list[int] = []
    for index in range(10_000):
        try:
            admission = ledger.reserve(stream)
        except ServiceUnavailable:
            return placed
        ledger.commit(f"v{index}", stream, admission)
        placed.append(admission.worker)
    raise AssertionError("never refused")


def test_refuses_exactly_when_the_worker_budget_is_reached() -> None:
    ledger = CapacityLedger(policy=CapacityPolicy(worker_packet_budget=1000.0, fixed_cost=COST))
    assert len(_fill(ledger)) == 5  # 5 x 200 = 1000 fits; a sixth does not
    assert ledger.refusals == {"worker_budget": 1}
    with pytest.raises(ServiceUnavailable) as refused:
        ledger.reserve("s")
    assert refused.value.retry_after == 10
    ledger.release("v0")
    assert ledger.reserve("s").worker == 0


def test_least_loaded_worker_takes_each_new_viewer() -> None:
    ledger = CapacityLedger(
        policy=CapacityPolicy(worker_packet_budget=600.0, fixed_cost=COST), workers=3
    )
    assert _fill(ledger) == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert [ledger.load(w).used for w in ledger.workers] == [1.0, 1.0, 1.0]


def test_egress_budget_and_stream_cap() -> None:
    egress = CapacityLedger(
        policy=CapacityPolicy(egress_bit_budget=4_000_000.0, fixed_cost=COST), workers=2
    )
    assert len(_fill(egress)) == 2
    assert egress.refusals == {"egress_budget": 1}
    capped = CapacityLedger(policy=CapacityPolicy(stream_viewer_cap=3, fixed_cost=COST))
    assert len(_fill(capped, "a")) == 3
    assert capped.reserve("b").worker == 0  # the cap is per stream
    assert capped.refusals == {"stream_cap": 1}


def test_lower_layer_admission_before_refusal() -> None:
    layers = [
        LayerCost(packets_per_second=300.0, bits_per_second=2_500_000.0),
        LayerCost(packets_per_second=100.0, bits_per_second=500_000.0),
    ]
    strict = CapacityLedger(policy=CapacityPolicy(worker_packet_budget=700.0))
    strict.set_stream_layers("s", layers)
    assert len(_fill(strict)) == 2  # 600 used; 300 more does not fit
    lenient = CapacityLedger(
        policy=CapacityPolicy(worker_packet_budget=700.0, admit_lower_layer=True)
    )
    lenient.set_stream_layers("s", layers)
    admissions = []
    for index in range(3):
        admission = lenient.reserve("s")
        lenient.commit(f"v{index}", "s", admission)
        admissions.append(admission.layer)
    # Two on the top layer (600), then one on the lower layer fills the budget (700).
    assert admissions == [0, 0, 1]
    assert lenient.admissions == {"top_layer": 2, "lower_layer": 1}
    with pytest.raises(ServiceUnavailable):
        lenient.reserve("s")
    assert lenient.refusals == {"worker_budget": 1}


def test_draining_refuses_and_dead_worker_viewers_are_forgotten() -> None:
    ledger = CapacityLedger(policy=CapacityPolicy(fixed_cost=COST), workers=2)
    for index in range(2):
        ledger.commit(f"v{index}", "s", ledger.reserve("s"))
    assert ledger.load(0).viewers == ledger.load(1).viewers == 1
    assert ledger.remove_worker(1) == ["v1"]
    assert ledger.reserve("s").worker == 0
    assert ledger.retain(["v0"]) == []
    assert ledger.retain([]) == ["v0"]
    ledger.draining = True
    with pytest.raises(ServiceUnavailable):
        ledger.reserve("s")
    assert ledger.refusals == {"draining": 1}


def test_measured_cost_follows_the_stream() -> None:
    ledger = CapacityLedger(policy=CapacityPolicy(worker_packet_budget=1000.0))
    assert ledger.layers("s") == (DEFAULT_VIEWER_COST,)
    ledger.commit("v", "s", ledger.reserve("s"))
    ledger.set_stream_layers("s", [COST])
    assert ledger.load(0).packets_per_second == 200.0  # the viewer is re-costed at once


def test_rate_meter_counts_wire_bytes() -> None:
    meter = RateMeter()
    meter.update(0.0, 0, 0)
    assert meter.cost() is None
    meter.update(2.0, 400, 400_000)
    cost = meter.cost()
    assert cost is not None
    assert cost.packets_per_second == 200.0
    assert cost.bits_per_second == (400_000 + 400 * PACKET_OVERHEAD_BYTES) * 8 / 2.0


def test_stream_layers_add_audio_to_each_video_layer() -> None:
    meters: dict[tuple[str, str], RateMeter] = {}
    rows = [("audio", "audio", 0, 0), ("video/0", "video", 0, 0), ("video/1", "video", 0, 0)]
    assert stream_layers(meters, "s", rows, 0.0) == []
    rows = [
        ("audio", "audio", 50, 5_000),
        ("video/0", "video", 50, 25_000),
        ("video/1", "video", 150, 150_000),
    ]
    layers = stream_layers(meters, "s", rows, 1.0)
    assert [layer.packets_per_second for layer in layers] == [200.0, 100.0]


@given(
    budget=st.floats(min_value=1.0, max_value=5_000.0),
    packets=st.floats(min_value=10.0, max_value=1e4),
    workers=st.integers(min_value=1, max_value=3),
)
def test_every_worker_is_filled_to_its_budget_and_no_further(
    budget: float, packets: float, workers: int
) -> None:
    cost = LayerCost(packets_per_second=packets, bits_per_second=0.0)
    ledger = CapacityLedger(
        policy=CapacityPolicy(worker_packet_budget=budget, fixed_cost=cost), workers=workers
    )
    _fill(ledger)
    for worker in ledger.workers:
        load = ledger.load(worker).packets_per_second
        assert load <= budget * (1 + 1e-9)
        assert load + packets > budget * (1 + 1e-9)  # one more would not fit


def test_latency_histogram_round_trips_as_json() -> None:
    histogram = LatencyHistogram()
    for seconds in (0.01, 0.3, 20.0):
        histogram.observe(seconds)
    assert histogram.counts[0] == 1 and histogram.counts[-1] == 3
    assert LatencyHistogram.from_json(histogram.to_json()) == histogram
    with pytest.raises(ValueError):
        LatencyHistogram.from_json({"counts": [1], "total": 0, "count": 0})


async def test_http_answers_503_with_retry_after_exactly_at_the_budget() -> None:
    viewers_that_fit = 3
    budget = DEFAULT_VIEWER_COST.packets_per_second * viewers_that_fit
    live = live_server(worker_packet_budget=str(budget))
    try:
        async with aiohttp.ClientSession(base_url=live.url) as http:
            publisher = await publish(http, "cam")
            statuses = [(await view(http, "cam")).status for _ in range(viewers_that_fit)]
            assert statuses == [201] * viewers_that_fit
            refused = await view(http, "cam")
            assert refused.status == 503
            assert refused.headers["Retry-After"] == "10"
            # A stream that is not live is still 409, not 503 (WHEP §4.2.8).
            assert (await view(http, "nothing")).status == 409
            await publisher.close()
    finally:
        live.close()


async def test_a_default_server_measures_its_own_packet_budget() -> None:
    # No --worker-packet-budget: the server measures this machine at start-up, so it
    # refuses before it falls behind, and says so in /metrics.
    live = live_server()
    try:
        budget = live.info.backend.ledger.policy.worker_packet_budget if live.info else None
        assert isinstance(budget, float) and budget > 0
        # The same loop as `whepfan calibrate` at 0.7 headroom: within a factor of a few
        # of a fresh measurement, whatever else this machine is doing.
        reference = calibrate(packets=20_000).worker_packet_budget
        assert reference / 4 < budget < reference * 4
        async with aiohttp.ClientSession(base_url=live.url) as http:
            text = await (await http.get("/metrics")).text()
        gauges = [
            line for line in text.splitlines() if line.startswith("whepfan_worker_packet_budget{")
        ]
        assert gauges and float(gauges[0].split()[-1]) == budget
    finally:
        live.close()
    unbounded = live_server(worker_packet_budget="none")
    try:
        assert unbounded.info is not None
        assert unbounded.info.backend.ledger.policy.worker_packet_budget is None
    finally:
        unbounded.close()


class _LayeredRouter:
    """Just enough of the Router for admission: one live stream with three layers, viewer
    creation, and a record of the layer constraints the admission applies."""

    def __init__(self) -> None:
        self.streams = {"s": self}
        self.live = True
        self.requests: list[tuple[str, object]] = []
        self._next = 0

    def layers(self) -> list[str]:
        return ["q", "h", "f"]  # the router orders layers low to high

    def view(self, stream_name: str, offer_text: str, now: float) -> tuple[object, str]:
        self._next += 1
        return type("Session", (), {"id": f"v{self._next}"})(), "answer"

    def select_layer(self, session_id: str, request: object, now: float) -> dict[str, object]:
        self.requests.append((session_id, request))
        return {}


# Layer costs, highest first, under a 700 packets/s worker: two viewers of the top layer
# fit (600), a third only one layer down (700).
TOP_LAYER = LayerCost(packets_per_second=300.0, bits_per_second=2_000_000.0)
MIDDLE_LAYER = LayerCost(packets_per_second=100.0, bits_per_second=500_000.0)
LOWEST_LAYER = LayerCost(packets_per_second=50.0, bits_per_second=150_000.0)


def _lower_layer_workers(router: _LayeredRouter, layers: list[LayerCost]) -> InProcessWorkers:
    """In-process workers admitting lower layers under a 700 packets/s budget, with the
    stream's ``layers`` (highest first) as the ledger's measured costs."""
    ledger = CapacityLedger(
        policy=CapacityPolicy(worker_packet_budget=700.0, admit_lower_layer=True)
    )
    ledger.set_stream_layers("s", layers)
    return InProcessWorkers(router=router, ledger=ledger)  # type: ignore[arg-type]


def test_a_viewer_admitted_on_a_lower_layer_is_capped_there() -> None:
    """admit_lower_layer: the third viewer only fits one layer down, so it is admitted with
    a ceiling one below the top and cannot climb back over the budget it was admitted under."""
    from whepfan.media.layers import LayerRequest

    router = _LayeredRouter()
    workers = _lower_layer_workers(router, [TOP_LAYER, MIDDLE_LAYER, LOWEST_LAYER])
    for _ in range(3):
        workers.view("s", "offer", 0.0)
    assert router.requests == [("v3", LayerRequest(max_spatial_layer=1))]
    assert workers.lower_layer_admissions == 1


def test_an_audio_only_viewer_admitted_lower_is_not_an_error() -> None:
    """The router answers "receives no video" for an audio-only viewer: nothing to cap."""
    from whepfan.errors import PeerError

    class AudioOnlyRouter(_LayeredRouter):
        def select_layer(self, session_id: str, request: object, now: float) -> dict[str, object]:
            raise PeerError("this session receives no video")

    router = AudioOnlyRouter()
    workers = _lower_layer_workers(router, [TOP_LAYER, MIDDLE_LAYER])
    sessions = [workers.view("s", "offer", 0.0)[0] for _ in range(3)]
    assert len(sessions) == 3 and workers.lower_layer_admissions == 0
