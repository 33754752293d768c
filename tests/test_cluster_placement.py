"""Placement and upstream choice as data (whepfan/cluster/placement.py): no Redis, no
sockets; every rule of the module docstring on its own."""

from __future__ import annotations

from whepfan.cluster.placement import choose_upstream, place_viewer, pulls_served, room
from whepfan.cluster.registry import CarriedStream, NodeRecord


def node(
    name: str,
    *,
    viewers: int = 0,
    max_viewers: int = 100,
    pps: float = 0.0,
    budget: float | None = None,
    draining: bool = False,
    max_pulls: int | None = None,
    **streams: CarriedStream,
) -> NodeRecord:
    return NodeRecord(
        id=name,
        url=f"http://{name}",
        viewers=viewers,
        max_viewers=max_viewers,
        packets_per_second=pps,
        packet_budget=budget,
        draining=draining,
        max_upstream_pulls=max_pulls,
        streams=dict(streams),
    )


PUBLISHED = CarriedStream(viewers=1, viewer_packets_per_second=200.0)


def test_room_is_the_smaller_of_viewer_slots_and_packet_budget() -> None:
    assert room(node("a", viewers=90), None) == 10
    assert room(node("a", viewers=10, pps=9_000, budget=10_000), 200.0) == 5
    assert room(node("a", budget=None), 200.0) == 100
    assert room(node("a", draining=True), None) == 0


def test_a_node_carrying_the_stream_wins_over_an_emptier_one() -> None:
    nodes = [node("origin", viewers=50, s=PUBLISHED), node("edge", viewers=0)]
    placement = place_viewer(nodes, "s", "edge")
    assert placement.node is not None and placement.node.id == "origin"
    assert not placement.local and placement.carried


def test_among_carriers_the_most_room_wins_and_this_node_wins_ties() -> None:
    pulled = CarriedStream(viewers=5, source="origin", viewer_packets_per_second=200.0)
    nodes = [
        node("origin", viewers=60, s=PUBLISHED),
        node("a", viewers=20, s=pulled),
        node("b", viewers=20, s=pulled),
    ]
    assert place_viewer(nodes, "s", "b").local
    chosen = place_viewer(nodes, "s", "origin").node
    assert chosen is not None and chosen.id == "a"


def test_full_carriers_send_viewers_to_the_node_with_most_room() -> None:
    nodes = [
        node("origin", viewers=100, s=PUBLISHED),
        node("a", viewers=30),
        node("b", viewers=10),
    ]
    placement = place_viewer(nodes, "s", "a")
    assert placement.node is not None and placement.node.id == "b"
    assert not placement.carried and placement.reason == "most-room"


def test_the_packet_budget_counts_at_the_streams_measured_cost() -> None:
    heavy = CarriedStream(viewers=1, viewer_packets_per_second=1_000.0)
    nodes = [
        node("origin", pps=9_500, budget=10_000, s=heavy),
        node("edge", pps=0, budget=10_000),
    ]
    placement = place_viewer(nodes, "s", "origin")
    assert placement.node is not None and placement.node.id == "edge"


def test_a_full_cluster_places_nowhere() -> None:
    nodes = [node("a", viewers=100), node("b", draining=True)]
    placement = place_viewer(nodes, "s", "a")
    assert placement.node is None and placement.reason == "cluster-full"


def test_edges_pull_from_the_origin_until_its_pull_limit_then_from_an_edge() -> None:
    from_origin = CarriedStream(source="origin")
    origin = node("origin", max_pulls=1, s=PUBLISHED)
    assert choose_upstream([origin, node("a")], "s", "origin", "a") is origin
    edge_a = node("a", s=from_origin)
    nodes = [origin, edge_a, node("b")]
    assert pulls_served(nodes) == {"origin": 1}
    assert choose_upstream(nodes, "s", "origin", "b") is edge_a


def test_an_edge_never_pulls_from_an_edge_that_pulls_from_it() -> None:
    origin = node("origin", max_pulls=0, s=PUBLISHED)
    nodes = [origin, node("a", s=CarriedStream(source="b")), node("b")]
    assert choose_upstream(nodes, "s", "origin", "b") is None


def test_among_relays_the_least_loaded_serves() -> None:
    origin = node("origin", max_pulls=0, s=PUBLISHED)
    a = node("a", s=CarriedStream(source="origin"))
    b = node("b", s=CarriedStream(source="origin"))
    c = node("c", s=CarriedStream(source="a"))
    chosen = choose_upstream([origin, a, b, c, node("d")], "s", "origin", "d")
    assert chosen is b  # a already serves c


def test_records_survive_the_json_round_trip() -> None:
    record = node("a", viewers=3, budget=1e5, max_pulls=2, s=CarriedStream(source="o"))
    assert NodeRecord.from_json(record.to_json()) == record


def test_the_registry_url_is_shown_without_its_password() -> None:
    from whepfan.cluster.registry import redacted

    assert redacted("redis://:s3cret@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert redacted("rediss://user:pw@[::1]/2") == "rediss://user:***@[::1]/2"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
