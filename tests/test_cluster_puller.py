"""The upstream puller's state machine on virtual time (whepfan/cluster/upstream.py):
failures counted by reason, retries on the backoff schedule only while viewers wait,
and a pull nobody waits for dropped. The router is a real one (a
media worker on loopback); the resolver and the clock are the test's."""

from __future__ import annotations

import asyncio

import pytest
from _server import media_worker

from whepfan.cluster.upstream import (
    RETRY_INITIAL,
    RETRY_MAX,
    PullFailure,
    UpstreamError,
    UpstreamPuller,
    UpstreamTarget,
)
from whepfan.errors import Conflict, ServiceUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RefusingResolver:
    """Every lookup fails as ``reason`` (counts the calls)."""

    def __init__(self, reason: PullFailure) -> None:
        self.reason = reason
        self.calls = 0

    async def __call__(self, stream: str) -> UpstreamTarget | None:
        self.calls += 1
        raise UpstreamError(self.reason, ServiceUnavailable("registry down", retry_after=5))


def test_backoff_doubles_from_the_initial_delay_to_the_maximum() -> None:
    delays = [UpstreamPuller._backoff(failures) for failures in range(1, 10)]
    assert delays[:4] == [RETRY_INITIAL, 2 * RETRY_INITIAL, 4 * RETRY_INITIAL, 8 * RETRY_INITIAL]
    assert max(delays) == RETRY_MAX and delays[-1] == RETRY_MAX


async def test_nobody_carrying_the_stream_is_409_and_leaves_no_pull() -> None:
    async def nobody(stream: str) -> UpstreamTarget | None:
        return None

    async with media_worker() as worker:
        puller = UpstreamPuller(router=worker.router, resolve=nobody, clock=Clock())
        await puller.start()
        try:
            with pytest.raises(UpstreamError) as caught:
                await puller.ensure("absent")
            assert isinstance(caught.value.error, Conflict)
            assert caught.value.reason is PullFailure.NOT_LIVE
            assert puller.describe() == {}
            assert puller.counters["pull_failures_not_live"] == 1
        finally:
            await puller.close()


async def test_a_failed_pull_is_counted_by_reason_and_retried_on_demand() -> None:
    resolver = RefusingResolver(PullFailure.NO_UPSTREAM)
    clock = Clock()
    async with media_worker() as worker:
        puller = UpstreamPuller(router=worker.router, resolve=resolver, clock=clock)
        await puller.start()
        try:
            for attempt in (1, 2):
                with pytest.raises(UpstreamError) as caught:
                    await puller.ensure("s")
                assert caught.value.error.status == 503
                assert puller.counters["pull_failures_no_upstream"] == attempt
            # No viewer waits on this node: nothing is kept, the watch never retries.
            assert puller.describe() == {}
            clock.now += 60
            await puller.watch(clock.now)
            assert resolver.calls == 2
        finally:
            await puller.close()


async def test_a_lost_pull_is_retried_on_schedule_while_viewers_wait_and_dropped_after() -> None:
    clock = Clock()
    async with media_worker() as worker:
        router = worker.router
        puller = UpstreamPuller(
            router=router, resolve=RefusingResolver(PullFailure.REFUSED), clock=clock, grace=30
        )
        await puller.start()
        try:
            # A viewer waits on this node (as when an upstream was lost under it).
            stream = router.stream("s")
            stream.viewers["v"] = object()  # type: ignore[assignment]
            with pytest.raises(UpstreamError):
                await puller.ensure("s")
            with pytest.raises(UpstreamError):
                await puller.ensure("s")
            described = puller.describe()["s"]
            assert described["failures"] == 2 and described["last_error"] == "registry down"
            assert described["connected"] is False and described["upstream"] is None
            # Viewers wait: the watch retries at retry_at, not before.
            calls = puller.resolve.calls  # type: ignore[attr-defined]
            await puller.watch(clock.now + UpstreamPuller._backoff(2) - 0.01)
            assert puller.resolve.calls == calls  # type: ignore[attr-defined]
            clock.now += UpstreamPuller._backoff(2)
            await puller.watch(clock.now)
            await _settle()
            assert puller.resolve.calls == calls + 1  # type: ignore[attr-defined]
            # The last viewer leaves: nobody waits, so the next retry time drops the pull
            # instead of pulling again (a connected pull would stay for the grace:
            # test_cluster_edge.py checks that against a real origin).
            del stream.viewers["v"]
            calls = puller.resolve.calls  # type: ignore[attr-defined]
            clock.now += RETRY_MAX
            await puller.watch(clock.now)
            await _settle()
            assert puller.describe() == {}
            assert puller.resolve.calls == calls  # type: ignore[attr-defined]
        finally:
            await puller.close()


async def _settle() -> None:
    """Let the retry task the watch started run to its (failing) end."""
    for _ in range(5):
        await asyncio.sleep(0)
