"""The cluster registry in Redis: which nodes there are, how loaded, and who carries what.

Keys (``whepfan:`` prefix; one Redis database per cluster)::

    whepfan:nodes            SET of node ids (an id is the node's public URL)
    whepfan:node:{id}        JSON NodeRecord, EX NODE_TTL, rewritten every REFRESH_INTERVAL
    whepfan:stream:{name}    the id of the node with the stream's WHIP publisher, EX NODE_TTL
    whepfan:events           channel: "up {id}", "down {id}", "stream {name} {id}", ...

A node that stops refreshing (killed, cut off) drops out when its key expires, within
``NODE_TTL`` seconds; readers drop its id from the set when they find the key gone. A
stream key is refreshed while its publisher is live and deleted when it leaves (only by
its owner: another node may have taken the publisher since). Changes are published on
the channel; every node re-reads the view as soon as it hears one, and once per refresh
anyway, so placement works from a view at most one interval old without a Redis round
trip per POST.

What goes on when Redis is unreachable: the node keeps serving what it carries (nothing
here is on the media path), ``available`` turns False, placement answers locally, new
cross-node pulls get a 503 that says why (upstream.py ``NO_UPSTREAM``), and the next
refresh that succeeds re-registers everything.

Per second at N nodes and S streams, Redis carries N node writes, one write per live
stream, N set reads and N MGETs of N records (N^2 small reads): at 100 nodes that is
~10^4 tiny operations per second, well within one Redis core (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("whepfan.cluster.registry")

PREFIX = "whepfan:"
NODES_KEY = PREFIX + "nodes"
EVENTS_CHANNEL = PREFIX + "events"
NODE_TTL = 5  # seconds: a node silent this long is gone
REFRESH_INTERVAL = 1.0
REDIS_TIMEOUT = 1.0  # per command: a Redis that does not answer is down, not slow


@dataclass(frozen=True, slots=True, kw_only=True)
class CarriedStream:
    """A stream a node carries: published there (``source`` None) or pulled from the
    node ``source``; its viewers there and the packet rate one viewer of it costs."""

    viewers: int = 0
    source: str | None = None
    viewer_packets_per_second: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeRecord:
    """What a node says about itself in ``whepfan:node:{id}``."""

    id: str
    url: str  # public HTTP(S) base URL: WHEP endpoints are {url}/whep/{stream}
    viewers: int
    max_viewers: int
    packets_per_second: float  # budget used
    packet_budget: float | None  # None: unbounded
    draining: bool = False
    upstream_sessions: int = 0  # pulls this node makes
    max_upstream_pulls: int | None = None  # pulls this node serves at most (None: any)
    version: str = ""
    streams: dict[str, CarriedStream] = field(default_factory=dict)

    @property
    def packets_free(self) -> float | None:
        if self.packet_budget is None:
            return None
        return max(self.packet_budget - self.packets_per_second, 0.0)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> NodeRecord:
        document = orjson.loads(data)
        streams = {
            name: CarriedStream(**entry) for name, entry in document.pop("streams", {}).items()
        }
        return cls(**document, streams=streams)


class ClusterRegistry:
    """This node's registration and its view of the others (see the module docstring).

    ``describe_self`` is called at every refresh for this node's current record;
    ``published`` for the names of the streams with a live WHIP publisher here."""

    def __init__(
        self,
        *,
        url: str,
        node_id: str,
        describe_self: Callable[[], NodeRecord],
        published: Callable[[], set[str]],
        interval: float = REFRESH_INTERVAL,
    ) -> None:
        self.url = url
        # For logs and GET /api/cluster: the URL without its password.
        self.shown_url = redacted(url)
        self.node_id = node_id
        self._describe_self = describe_self
        self._published = published
        self.interval = interval
        self._redis = aioredis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        self.nodes: dict[str, NodeRecord] = {}
        self.available = False
        self.last_error: str | None = None
        self._registered_streams: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.refreshes = 0
        self.failures = 0

    async def start(self) -> None:
        """Register (or note that Redis is down and keep trying) and start refreshing."""
        await self.refresh()
        self._task = asyncio.ensure_future(self._refresh_forever())
        self._listener = asyncio.ensure_future(self._listen_forever())

    async def close(self) -> None:
        for task in (self._task, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(RedisError, OSError):
            # Leave at once rather than at TTL expiry: viewers stop being sent here.
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(PREFIX + "node:" + self.node_id)
                pipe.srem(NODES_KEY, self.node_id)
                for name in self._registered_streams:
                    pipe.delete(PREFIX + "stream:" + name)
                pipe.publish(EVENTS_CHANNEL, f"down {self.node_id}")
                await pipe.execute()
        await self._redis.aclose()

    # reads ------------------------------------------------------------------------------

    async def stream_owner(self, name: str) -> str | None:
        """The node with ``name``'s WHIP publisher, asked now (a stream published a
        moment ago must be found). Raises RedisError/OSError when Redis is down."""
        value = await self._redis.get(PREFIX + "stream:" + name)
        return _text(value)

    def others(self) -> list[NodeRecord]:
        return [node for node_id, node in self.nodes.items() if node_id != self.node_id]

    # the refresh ------------------------------------------------------------------------

    async def _refresh_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            await self.refresh()

    async def refresh(self) -> None:
        """Write this node's record and stream keys, then read every node's record."""
        try:
            await self._write()
            await self._read()
        except (RedisError, OSError) as exc:
            self.failures += 1
            if self.available or self.last_error is None:
                log.warning(
                    "cluster registry %s unreachable (%s): serving local streams only, "
                    "cross-node pulls refused until it is back",
                    self.shown_url,
                    exc,
                )
            self.available = False
            self.last_error = str(exc) or type(exc).__name__
            return
        if not self.available:
            log.info("registered in the cluster registry %s as %s", self.shown_url, self.node_id)
        self.available = True
        self.last_error = None
        self.refreshes += 1

    async def _write(self) -> None:
        record = self._describe_self()
        published = self._published()
        ended = sorted(self._registered_streams - published)
        node_key = PREFIX + "node:" + self.node_id
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(node_key, record.to_json(), ex=NODE_TTL)
            pipe.sadd(NODES_KEY, self.node_id)
            for name in published:
                pipe.set(PREFIX + "stream:" + name, self.node_id, ex=NODE_TTL)
            for name in ended:
                pipe.get(PREFIX + "stream:" + name)
            results = await pipe.execute()
        owners = results[2 + len(published) :]
        # Only the owner removes a stream key: the publisher may have moved elsewhere.
        stale = [
            name for name, owner in zip(ended, owners, strict=True) if _text(owner) == self.node_id
        ]
        if stale:
            await self._redis.delete(*(PREFIX + "stream:" + name for name in stale))
        changes = [f"stream {name} {self.node_id}" for name in published - self._registered_streams]
        changes += [f"unstream {name} {self.node_id}" for name in ended]
        if self.node_id not in self.nodes:
            changes.append(f"up {self.node_id}")
        self._registered_streams = published
        for change in changes:
            await self._redis.publish(EVENTS_CHANNEL, change)

    async def _read(self) -> None:
        members = [str(_text(m)) for m in await self._redis.smembers(NODES_KEY)]
        if not members:
            self.nodes = {}
            return
        values = await self._redis.mget([PREFIX + "node:" + m for m in members])
        nodes: dict[str, NodeRecord] = {}
        gone: list[str] = []
        for member, value in zip(members, values, strict=True):
            if value is None:
                gone.append(member)
                continue
            try:
                nodes[member] = NodeRecord.from_json(value)
            except (orjson.JSONDecodeError, TypeError, ValueError):
                log.warning("cluster node %s has an unreadable record; ignored", member)
        if gone:
            await self._redis.srem(NODES_KEY, *gone)
        self.nodes = nodes

    async def _listen_forever(self) -> None:
        """React to other nodes' changes at once (the refresh timer is the fallback)."""
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(EVENTS_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._wake.set()
            except (RedisError, OSError):
                await asyncio.sleep(self.interval)

    def describe(self) -> dict[str, Any]:
        return {
            "registry": self.shown_url,
            "available": self.available,
            "error": self.last_error,
            "node": self.node_id,
        }


def redacted(url: str) -> str:
    """``url`` with the password of its userinfo (redis://:PASSWORD@host) replaced."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
