"""Where a viewer of a stream should be served, and where an edge should pull it from.

Both are pure decisions over the registry's view (registry.NodeRecord), so they are
tested as data. The rules, in order:

**Viewers** (``place_viewer``; WHIP RFC 9725 §4.5 load balancing by redirect, which WHEP
inherits):

1. A node has *room* for one more viewer of the stream when it is not draining, has
   fewer viewers than ``max_viewers`` and, with a packet budget, enough free packets/s
   for one viewer at the stream's measured cost (unknown cost: room is viewers only).
2. Among nodes with room, those already carrying the stream come first: a viewer there
   costs no new upstream session and starts on a warm cache.
3. Within that group, the most viewers' worth of room wins (free packets / cost, or
   free viewer slots); this node wins ties, so a balanced cluster does not bounce.
4. No node with room: the cluster is full (503 + Retry-After).

**Upstreams** (``choose_upstream``; trees, not only stars): the node with the publisher,
unless it already serves ``max_upstream_pulls`` pulls; then the node carrying the stream
(by pull) with the fewest pulls served and room under its own limit. Pulls served by a
node are counted from the view: the edges whose records name it as a stream's source.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from whepfan.cluster.registry import NodeRecord


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """The decision for one viewer: ``node`` None means the cluster is full."""

    node: NodeRecord | None
    local: bool
    carried: bool  # the chosen node already carries the stream
    reason: str


def viewer_cost(nodes: Iterable[NodeRecord], stream: str) -> float | None:
    """Packets/s one viewer of ``stream`` costs, as the nodes carrying it measured."""
    costs = [
        carried.viewer_packets_per_second
        for node in nodes
        if (carried := node.streams.get(stream)) is not None and carried.viewer_packets_per_second
    ]
    return max(costs) if costs else None


def room(node: NodeRecord, cost: float | None) -> float:
    """How many more viewers at ``cost`` packets/s ``node`` takes (inf: unbounded)."""
    if node.draining:
        return 0.0
    slots = float(max(node.max_viewers - node.viewers, 0))
    free = node.packets_free
    if free is None or not cost:
        return slots
    return min(slots, math.floor(free / cost))


def place_viewer(nodes: Sequence[NodeRecord], stream: str, self_id: str) -> Placement:
    """Rules 1-4 of the module docstring."""
    cost = viewer_cost(nodes, stream)
    roomy = [(room(node, cost), node) for node in nodes]
    roomy = [(free, node) for free, node in roomy if free >= 1]
    if not roomy:
        return Placement(node=None, local=False, carried=False, reason="cluster-full")
    carrying = [(free, node) for free, node in roomy if stream in node.streams]
    group = carrying or roomy
    best = max(free for free, _ in group)
    winners = [node for free, node in group if free == best]
    chosen = next((node for node in winners if node.id == self_id), winners[0])
    return Placement(
        node=chosen,
        local=chosen.id == self_id,
        carried=bool(carrying),
        reason="carries-stream" if carrying else "most-room",
    )


def pulls_served(nodes: Iterable[NodeRecord]) -> dict[str, int]:
    """Node id -> how many (edge, stream) pulls name it as their source."""
    served: dict[str, int] = {}
    for node in nodes:
        for carried in node.streams.values():
            if carried.source is not None:
                served[carried.source] = served.get(carried.source, 0) + 1
    return served


def choose_upstream(
    nodes: Sequence[NodeRecord], stream: str, owner: str | None, self_id: str
) -> NodeRecord | None:
    """The node this one should pull ``stream`` from (see the module docstring), or
    None when no other node can serve it."""
    served = pulls_served(nodes)
    by_id = {node.id: node for node in nodes}

    def has_pull_room(node: NodeRecord) -> bool:
        limit = node.max_upstream_pulls
        return not node.draining and (limit is None or served.get(node.id, 0) < limit)

    origin = by_id.get(owner) if owner is not None else None
    if origin is not None and origin.id != self_id and has_pull_room(origin):
        return origin
    relays = [
        node
        for node in nodes
        if node.id != self_id
        and (carried := node.streams.get(stream)) is not None
        # Not an edge that pulls from us: that would be a loop.
        and carried.source not in (None, self_id)
        and has_pull_room(node)
    ]
    if not relays:
        return None
    return min(relays, key=lambda node: (served.get(node.id, 0), node.id))
