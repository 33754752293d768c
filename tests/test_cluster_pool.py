"""An edge's upstream open over a worker pool's control channel (cluster/pool_backend.py,
cluster/worker_upstreams.py): the worker's failures come back to the puller as the
``UpstreamError`` an in-process session raises (reason and the viewer's HTTP error), and
a worker that exits while the origin has not answered fails the open with ``WORKER``.

Real parts: a two-worker ``WorkerPool`` with the cluster's worker extension, and an
aiohttp origin on loopback that answers 409, or a TCP listener that never answers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from whepfan.cluster.node import ClusterNode
from whepfan.cluster.pool_backend import WORKER_EXTENSIONS, PoolUpstreams
from whepfan.cluster.upstream import PullFailure, PullSession, UpstreamError, UpstreamTarget
from whepfan.config import MediaConfig
from whepfan.errors import Conflict, ServiceUnavailable
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.workers.capacity import CapacityLedger, CapacityPolicy, LayerCost
from whepfan.workers.pool import WorkerPool

pytestmark = pytest.mark.slow


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    config = MediaConfig(udp_host="127.0.0.1", udp_port=0, public_ips=("127.0.0.1",))
    workers = WorkerPool(
        workers=2,
        config=config,
        certificate=DtlsCertificate.generate(),
        ledger=CapacityLedger(policy=CapacityPolicy(), workers=2),
        stats_interval=0.2,
        log_level="warning",
        extensions=WORKER_EXTENSIONS,
    )
    await workers.start()
    yield workers
    await workers.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def silent_origin() -> Iterator[str]:
    """A WHEP URL whose server accepts the connection and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/whep/{{stream}}"


def _lost(session: PullSession, reason: str) -> None:
    raise AssertionError(f"no session gets far enough to be lost ({reason})")


def _session(hosts: PoolUpstreams, http: aiohttp.ClientSession, url: str) -> PullSession:
    return hosts(
        stream_name="s",
        target=UpstreamTarget(url=url),
        http=http,
        clock=asyncio.get_running_loop().time,
        on_lost=_lost,
    )


async def test_an_origin_without_the_stream_is_not_live_as_in_process(
    pool: WorkerPool, http: aiohttp.ClientSession
) -> None:
    async def not_live(request: web.Request) -> web.Response:
        return web.json_response({"detail": "not live"}, status=409, headers={"Retry-After": "5"})

    app = web.Application()
    app.router.add_post("/whep/{stream}", not_live)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        hosts = PoolUpstreams(pool)
        with pytest.raises(UpstreamError) as caught:
            await _session(hosts, http, f"http://127.0.0.1:{port}/whep/s").start()
        assert caught.value.reason is PullFailure.NOT_LIVE
        assert isinstance(caught.value.error, Conflict)
        assert caught.value.error.retry_after == 5
        assert hosts.sessions == {}
        assert "s" not in pool.streams  # nothing registered as the stream's publisher
    finally:
        await runner.cleanup()


async def test_an_unreachable_origin_is_a_503_that_names_it(
    pool: WorkerPool, http: aiohttp.ClientSession
) -> None:
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/whep/s"
    with pytest.raises(UpstreamError) as caught:
        await _session(PoolUpstreams(pool), http, url).start()
    assert caught.value.reason is PullFailure.UNREACHABLE
    assert isinstance(caught.value.error, ServiceUnavailable)
    assert url in caught.value.detail


async def test_a_worker_that_exits_during_the_open_fails_it_and_is_replaced(
    pool: WorkerPool, http: aiohttp.ClientSession, silent_origin: str
) -> None:
    hosts = PoolUpstreams(pool)
    session = _session(hosts, http, silent_origin.format(stream="s"))
    opening = asyncio.ensure_future(session.start())
    assert await _eventually(lambda: bool(hosts.sessions))
    (pending,) = hosts.sessions.values()
    worker = pending.worker
    assert worker is not None
    pool.kill_worker(worker)
    with pytest.raises(UpstreamError) as caught:
        await asyncio.wait_for(opening, 10)
    assert caught.value.reason is PullFailure.WORKER
    assert caught.value.error.status == 503
    assert hosts.sessions == {}
    assert await _eventually(lambda: pool.handles[worker].serving, 30)


async def test_a_pool_whose_workers_lack_the_extension_takes_no_upstreams() -> None:
    config = MediaConfig(udp_host="127.0.0.1", udp_port=0, public_ips=("127.0.0.1",))
    bare = WorkerPool(
        workers=2,
        config=config,
        certificate=DtlsCertificate.generate(),
        ledger=CapacityLedger(policy=CapacityPolicy(), workers=2),
    )
    try:
        with pytest.raises(ValueError, match="WORKER_EXTENSIONS"):
            PoolUpstreams(bare)
    finally:
        await bare.close()


async def test_a_pool_nodes_record_sums_its_workers_load_and_budget() -> None:
    """What placement weighs a node by (cluster/node.py ``record``): its viewers, packets
    per second used and packet budget, over every worker the ledger knows."""
    config = MediaConfig(udp_host="127.0.0.1", udp_port=0, public_ips=("127.0.0.1",))
    cost = LayerCost(packets_per_second=100.0, bits_per_second=1e6)
    ledger = CapacityLedger(
        policy=CapacityPolicy(worker_packet_budget=1000.0, fixed_cost=cost, max_viewers=9),
        workers=2,
    )
    pool = WorkerPool(
        workers=2,
        config=config,
        certificate=DtlsCertificate.generate(),
        ledger=ledger,
        extensions=WORKER_EXTENSIONS,
    )
    try:
        node = ClusterNode.create(
            backend=pool,
            clock=asyncio.get_running_loop().time,
            upstream=None,
            upstream_token=None,
            cluster="redis://127.0.0.1:1/0",  # never contacted: record() reads the ledger
            node_url="http://node.example",
            cluster_token="t",
            max_upstream_pulls=None,
            grace=1.0,
        )
        for viewer in ("a", "b", "c"):
            ledger.commit(viewer, "s", ledger.reserve("s"))
        assert {ledger.load(w).viewers for w in (0, 1)} == {1, 2}  # least loaded alternates
        record = node.record()
        assert record.packets_per_second == 300.0
        assert record.packet_budget == 2000.0
        assert record.packets_free == 1700.0
        # One worker gone (restarting): the node's budget is the live workers'.
        ledger.remove_worker(1)
        assert node.record().packet_budget == 1000.0
    finally:
        await pool.close()


async def _eventually(condition: object, timeout: float = 5.0) -> bool:
    assert callable(condition)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return bool(condition())
