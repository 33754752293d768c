"""The per-client cap on pending sessions (whepfan/http/pending.py).

Sans-IO on virtual time: the table's count, deadlines, Retry-After and memory (10^4
create/expire and create/release cycles leave it empty), and a Hypothesis model check.
Through the real aiohttp application in front of the real router (the tests/test_router.py
harness: whepfan's own ICE checker and DTLS client, in memory): beyond the cap a POST gets
429 + Retry-After + a problem body and is counted in /metrics; WHIP publishers and
server-offered viewers count too; and the client can POST again after a session connects,
fails DTLS, reaches its connect deadline, or is DELETEd. Against a real server with two
worker processes, behind a trusted proxy: the pool's workers report a session keyed and
its place frees.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from _peers import DecodingViewer, only_loopback_candidates, sending_peer
from _server import LiveServer, settings_for
from _signalling import AUTH, SDP, accept_answer, exchange, wait_connected
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from test_metrics import parse
from test_router import (
    WHEP_OFFER,
    WHIP_OFFER,
    Harness,
    _with_fingerprint,
    connect_viewer,
    handshake,
)

from whepfan.cli import build_parser, settings_from_args
from whepfan.http import COUNTERS_KEY, HttpOptions, create_app
from whepfan.http.metrics import add_metrics_route
from whepfan.http.pending import (
    DEFAULT_MAX_PENDING_PER_CLIENT,
    PendingLimit,
    PendingSessions,
)
from whepfan.media.session import MediaSession, SessionState
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.settings import Settings, SettingsError
from whepfan.workers.capacity import CapacityLedger, CapacityPolicy, LayerCost
from whepfan.workers.in_process import InProcessWorkers

COST = LayerCost(packets_per_second=100.0, bits_per_second=1_000_000.0)
TIMEOUT = 10.0

# ---------------------------------------------------------------- the table, sans-IO


def _table(cap: int = 2, timeout: float = TIMEOUT) -> PendingSessions:
    return PendingSessions(PendingLimit(max_per_client=cap, connect_timeout=timeout))


def test_a_client_at_its_cap_waits_until_its_oldest_session_s_deadline() -> None:
    table = _table(cap=2)
    assert table.check("a", 0.0) is None
    table.add("a", "s1", 0.0)
    table.add("a", "s2", 3.0)
    assert table.pending("a") == 2
    # s1 is connected or gone by 10.0 at the latest: 5.5 s from 4.5, rounded up.
    assert table.check("a", 4.5) == 6
    assert table.check("b", 4.5) is None  # another client counts apart
    assert table.check("a", 9.999) == 1  # never less than a second
    assert table.check("a", 10.0) is None  # s1's deadline: it no longer counts
    assert table.pending("a") == 1 and table.sessions == 1


def test_retry_after_is_at_most_the_connect_timeout() -> None:
    table = _table(cap=1, timeout=2.5)
    table.add("a", "s1", 100.0)
    assert table.check("a", 100.0) == 3


def test_release_frees_a_place_once_and_forgets_empty_clients() -> None:
    table = _table(cap=1)
    table.add("a", "s1", 0.0)
    assert table.check("a", 1.0) is not None
    assert table.release("s1") is True
    assert table.release("s1") is False
    assert table.release("never-added") is False
    assert len(table) == 0 and table.sessions == 0
    assert table.check("a", 1.0) is None


def test_at_the_cap_the_backend_is_asked_which_sessions_still_pend() -> None:
    table = _table(cap=2)
    table.add("a", "s1", 0.0)
    table.add("a", "s2", 0.0)
    asked: list[str] = []

    def still_pending(session_id: str) -> bool:
        asked.append(session_id)
        return session_id != "s1"  # s1 connected since

    assert table.check("a", 1.0, still_pending) is None
    assert sorted(asked) == ["s1", "s2"] and table.pending("a") == 1
    asked.clear()
    assert table.check("b", 1.0, still_pending) is None
    assert asked == []  # below its cap a client costs no lookup


def test_settle_forgets_connected_and_expired_sessions_of_every_client() -> None:
    table = _table(cap=4)
    table.add("a", "s1", 0.0)
    table.add("a", "s2", 5.0)
    table.add("b", "s3", 5.0)
    assert table.settle(10.0, lambda session_id: session_id != "s3") == 2  # s1: deadline
    assert table.pending("a") == 1 and table.pending("b") == 0 and len(table) == 1


def test_a_session_added_again_counts_once_with_its_new_deadline() -> None:
    table = _table(cap=2)
    table.add("a", "s1", 0.0)
    table.add("a", "s1", 5.0)
    assert table.pending("a") == 1
    assert table.expire(10.0) == 0  # the first deadline no longer holds
    assert table.expire(15.0) == 1 and len(table) == 0


def test_ten_thousand_create_expire_cycles_leave_the_table_empty() -> None:
    table = _table(cap=DEFAULT_MAX_PENDING_PER_CLIENT, timeout=1.0)
    now = 0.0
    for cycle in range(10_000):
        client = f"198.51.100.{cycle % 7}"
        assert table.check(client, now) is None
        table.add(client, f"s{cycle}", now)
        now += 1.0  # its deadline
    assert table.expire(now) > 0
    assert len(table) == 0 and table.sessions == 0
    assert table._deadlines == []  # the heap holds nothing either


def test_ten_thousand_create_release_cycles_keep_the_heap_bounded() -> None:
    """Released sessions leave their heap entries behind until compaction: memory stays
    proportional to the live sessions, not to how many came and went."""
    table = _table(cap=DEFAULT_MAX_PENDING_PER_CLIENT)
    for cycle in range(10_000):
        table.add("a", f"s{cycle}", 0.0)  # no time passes: nothing expires
        assert table.release(f"s{cycle}")
        assert len(table._deadlines) <= 2 * table.sessions + 65
    assert len(table) == 0 and table.sessions == 0


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        PendingLimit(max_per_client=0)
    with pytest.raises(ValueError):
        PendingLimit(connect_timeout=0.0)


_OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["add", "release", "check"]),
        st.integers(0, 3),  # client
        st.integers(0, 11),  # session
        st.floats(0.0, 3.0),  # time step
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(_OPERATIONS)
def test_the_table_agrees_with_a_plain_model(operations: list[tuple[str, int, int, float]]) -> None:
    """Any sequence of adds, releases and checks on advancing time: each client's count
    is its sessions added, not released and within their deadline, and a check refuses
    exactly at the cap."""
    cap, timeout = 3, 4.0
    table = _table(cap=cap, timeout=timeout)
    model: dict[str, tuple[str, float]] = {}  # session -> (client, deadline)
    now = 0.0
    for operation, client_index, session_index, step in operations:
        now += step
        client, session_id = f"c{client_index}", f"s{session_index}"
        model = {s: (c, d) for s, (c, d) in model.items() if d > now}
        table.expire(now)
        if operation == "add":
            table.add(client, session_id, now)
            model[session_id] = (client, now + timeout)
        elif operation == "release":
            assert table.release(session_id) is (session_id in model)
            model.pop(session_id, None)
        else:
            held = sum(1 for c, _ in model.values() if c == client)
            wait = table.check(client, now)
            assert (wait is None) is (held < cap)
            if wait is not None:
                assert 1 <= wait <= timeout
        for index in range(4):
            name = f"c{index}"
            assert table.pending(name) == sum(1 for c, _ in model.values() if c == name)
    assert table.sessions == len(model)


# ---------------------------------------------------------------- settings and CLI


def test_settings_cli_environment_and_toml_give_the_cap() -> None:
    assert Settings().max_pending_per_client == DEFAULT_MAX_PENDING_PER_CLIENT == 16
    limit = Settings(session_connect_timeout=4.0).http_options().pending_limit
    assert limit == PendingLimit(max_per_client=16, connect_timeout=4.0)
    args = build_parser().parse_args(["serve", "--max-pending-per-client", "3"])
    assert settings_from_args(args, {}).max_pending_per_client == 3
    environ = {"WHEPFAN_MAX_PENDING_PER_CLIENT": "5"}
    assert Settings.resolve(cli={}, environ=environ).max_pending_per_client == 5
    off = Settings.resolve(cli={"max_pending_per_client": "0"}, environ={})
    assert off.http_options().pending_limit is None  # 0: no cap
    with pytest.raises(SettingsError, match="--max-pending-per-client -1: cannot be negative"):
        Settings.resolve(cli={"max_pending_per_client": "-1"}, environ={})


def test_the_toml_key(tmp_path: Path) -> None:
    path = tmp_path / "whepfan.toml"
    path.write_text("max_pending_per_client = 7\n")
    assert Settings.resolve(cli={}, environ={}, config_path=path).max_pending_per_client == 7


# ---------------------------------------------------------------- through the application


@dataclass
class Signalling:
    harness: Harness
    workers: InProcessWorkers
    client: TestClient[web.Request, web.Application]
    clock: list[float]
    app: web.Application

    async def view(
        self, certificate: DtlsCertificate | None = None, **headers: str
    ) -> tuple[aiohttp.ClientResponse, str]:
        """A WHEP POST of an offer pinning ``certificate`` (a fresh one by default)."""
        offer = _with_fingerprint(WHEP_OFFER, certificate or DtlsCertificate.generate())
        response = await self.client.post("/whep/live", data=offer, headers={**SDP, **headers})
        await response.read()
        return response, offer

    def session_of(self, response: aiohttp.ClientResponse) -> MediaSession:
        return self.harness.router.get_session(response.headers["Location"].rsplit("/", 1)[1])

    async def metric(self, reason: str) -> float:
        response = await self.client.get("/metrics")
        samples = parse(await response.text())
        return samples[("whepfan_admission_refusals_total", (("reason", reason),))]


@pytest.fixture
async def signalling() -> AsyncIterator[Signalling]:
    harness = Harness(connect_timeout=TIMEOUT)
    clock = [100.0]
    ledger = CapacityLedger(policy=CapacityPolicy(fixed_cost=COST, connect_timeout=TIMEOUT))
    workers = InProcessWorkers(router=harness.router, ledger=ledger)
    connect_viewer(harness, clock[0], publisher=True)  # straight to the router: uncounted
    app = create_app(
        router=workers,
        clock=lambda: clock[0],
        options=HttpOptions(
            publish_token="t",
            # The test client is on loopback, exempt by default (as from the rate limit).
            pending_limit=PendingLimit(
                max_per_client=2, connect_timeout=TIMEOUT, exempt_loopback=False
            ),
        ),
    )
    add_metrics_route(app, workers.stats)
    try:
        async with TestClient(TestServer(app)) as client:
            yield Signalling(harness, workers, client, clock, app)
    finally:
        harness.close()


async def _fill(signalling: Signalling) -> list[tuple[aiohttp.ClientResponse, str]]:
    posts = [await signalling.view() for _ in range(2)]
    assert [response.status for response, _ in posts] == [201, 201]
    return posts


async def test_beyond_the_cap_a_post_gets_429_retry_after_a_problem_and_a_metric(
    signalling: Signalling,
) -> None:
    await _fill(signalling)
    sessions = len(signalling.harness.router.sessions)
    signalling.clock[0] += 3.0
    refused, _ = await signalling.view()
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "7"  # the first session's deadline, 110.0
    assert refused.content_type == "application/problem+json"
    problem = orjson.loads(await refused.read())
    assert problem["status"] == 429 and problem["title"] == "Too Many Requests"
    assert "not connected" in problem["detail"] and "2 sessions" in problem["detail"]
    assert len(signalling.harness.router.sessions) == sessions  # nothing was made
    assert signalling.app[COUNTERS_KEY]["client_pending_full"] == 1
    assert await signalling.metric("client_pending_full") == 1
    assert await signalling.metric("pending_full") == 0  # the server-wide cap is another


async def test_whip_publishers_and_server_offered_viewers_count_too(
    signalling: Signalling,
) -> None:
    whip = await signalling.client.post(
        "/whip/other", data=WHIP_OFFER, headers={**SDP, "Authorization": "Bearer t"}
    )
    assert whip.status == 201
    offered = await signalling.client.post("/whep/live")  # no body: the server's offer
    assert offered.status == 201
    refused, _ = await signalling.view()
    assert refused.status == 429
    again = await signalling.client.post(
        "/whip/third", data=WHIP_OFFER, headers={**SDP, "Authorization": "Bearer t"}
    )
    assert again.status == 429


async def test_a_session_that_connects_frees_its_place_at_once(signalling: Signalling) -> None:
    certificate = DtlsCertificate.generate()
    (first, offer), _ = await signalling.view(certificate), await signalling.view()
    session = signalling.session_of(first)
    answer = await first.text()
    done = handshake(signalling.harness, session, offer, answer, certificate, 100.0)
    assert done is not None
    # In-process the backend's own state answers: no once-a-second report to wait for.
    admitted, _ = await signalling.view()
    assert admitted.status == 201
    refused, _ = await signalling.view()
    assert refused.status == 429


async def test_a_session_that_fails_dtls_frees_its_place(signalling: Signalling) -> None:
    (first, offer), _ = await signalling.view(), await signalling.view()
    session = signalling.session_of(first)
    impostor = DtlsCertificate.generate()  # not the certificate its offer pins
    answer = await first.text()
    assert handshake(signalling.harness, session, offer, answer, impostor, 100.0) is None
    assert session.state is SessionState.CLOSED
    admitted, _ = await signalling.view()
    assert admitted.status == 201


async def test_a_session_that_reaches_its_connect_deadline_frees_its_place(
    signalling: Signalling,
) -> None:
    squatters = [signalling.session_of(response) for response, _ in await _fill(signalling)]
    signalling.clock[0] += TIMEOUT - 0.001
    assert (await signalling.view())[0].status == 429
    signalling.clock[0] = 100.0 + TIMEOUT
    # The deadline is the HTTP layer's own too: no word from the backend is needed.
    assert all(s.id in signalling.harness.router.sessions for s in squatters)
    assert (await signalling.view())[0].status == 201
    signalling.harness.router.handle_timer(signalling.clock[0])  # the media plane ends them
    assert all(s.state is SessionState.CLOSED for s in squatters)
    assert (await signalling.view())[0].status == 201
    assert (await signalling.view())[0].status == 429


async def test_a_deleted_session_frees_its_place(signalling: Signalling) -> None:
    (first, _), _ = await _fill(signalling)
    deleted = await signalling.client.delete(first.headers["Location"])
    assert deleted.status == 200
    assert (await signalling.view())[0].status == 201
    assert (await signalling.view())[0].status == 429


async def test_loopback_is_exempt_by_default_as_from_the_rate_limit() -> None:
    harness = Harness()
    try:
        connect_viewer(harness, 0.0, publisher=True)
        app = create_app(
            router=harness.router,
            clock=lambda: 0.0,
            options=HttpOptions(pending_limit=PendingLimit(max_per_client=1)),
        )
        async with TestClient(TestServer(app)) as client:
            for _ in range(3):
                response = await client.post("/whep/live", data=WHEP_OFFER, headers=SDP)
                assert response.status == 201
    finally:
        harness.close()


async def test_nodes_of_the_cluster_pulling_streams_are_not_counted() -> None:
    """An edge pulls each of its streams from one address with the cluster token."""
    harness = Harness()
    try:
        connect_viewer(harness, 0.0, publisher=True)
        limit = PendingLimit(max_per_client=1, exempt_loopback=False)
        app = create_app(
            router=harness.router,
            clock=lambda: 0.0,
            options=HttpOptions(cluster_token="c", pending_limit=limit),
        )
        async with TestClient(TestServer(app)) as client:
            pulls = {**SDP, "Authorization": "Bearer c"}
            for _ in range(3):
                response = await client.post("/whep/live", data=WHEP_OFFER, headers=pulls)
                assert response.status == 201
            viewers = [
                (await client.post("/whep/live", data=WHEP_OFFER, headers=SDP)).status
                for _ in range(2)
            ]
            assert viewers == [201, 429]
    finally:
        harness.close()


# ---------------------------------------------------------------- worker processes, a proxy


@pytest.fixture
def pool_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:
    only_loopback_candidates(monkeypatch)
    live = LiveServer(
        settings_for(
            workers="2",
            worker_packet_budget="none",
            max_pending_per_client="2",
            trusted_proxy=["127.0.0.1"],
        )
    )
    yield live
    live.close()


async def test_with_worker_processes_a_keyed_session_frees_its_place(
    pool_server: LiveServer,
) -> None:
    """--workers 2 behind a proxy on loopback (trusted): one client, named by
    X-Forwarded-For, has a real viewer and a squatter; its third POST is admitted once
    the viewer's worker has reported it keyed (with its once-a-second stats), not at the
    squatter's 10 s deadline. Another client through the same proxy counts apart."""
    client = {"X-Forwarded-For": "203.0.113.7"}
    async with aiohttp.ClientSession(base_url=pool_server.url) as http:
        publisher = await sending_peer()
        _, answer = await exchange(http, "/whip/live", publisher.localDescription.sdp, AUTH)
        await accept_answer(publisher, answer)
        await wait_connected(publisher)
        viewer = DecodingViewer()
        try:
            async with http.post(
                "/whep/live", data=await viewer.offer(), headers={**SDP, **client}
            ) as response:
                assert response.status == 201
                await viewer.accept(await response.text())
            async with http.post(
                "/whep/live", data=WHEP_OFFER, headers={**SDP, **client}
            ) as response:
                assert response.status == 201
            other = {**SDP, "X-Forwarded-For": "198.51.100.9"}
            async with http.post("/whep/live", data=WHEP_OFFER, headers=other) as response:
                assert response.status == 201
            await viewer.wait_frames(1, timeout=15.0)
            started = time.monotonic()
            while True:
                async with http.post(
                    "/whep/live", data=WHEP_OFFER, headers={**SDP, **client}
                ) as response:
                    if response.status == 201:
                        break
                    assert response.status == 429
                    problem = orjson.loads(await response.read())
                    assert "not connected" in problem["detail"]  # not the POST rate limit
                    assert 1 <= int(response.headers["Retry-After"]) <= 10
                # The squatter holds its place to its deadline (10 s): this was the viewer's.
                assert time.monotonic() - started < 5.0
                await asyncio.sleep(0.25)
            async with http.post(
                "/whep/live", data=WHEP_OFFER, headers={**SDP, **client}
            ) as response:
                assert response.status == 429  # the squatter and the newcomer
        finally:
            await viewer.close()
            await publisher.close()
