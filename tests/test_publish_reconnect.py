"""Publisher failure end to end (issue 15.2, 15.3): ``whepfan publish`` publishes again by
itself when its session fails or is found gone (backoff with jitter, ``--no-reconnect``
turns it off), and viewers of a whepfan server resume on their own sessions.

The backoff is a pure function (exact delays); everything else runs a real server
(``whepfan.server.run`` as ``whepfan serve`` runs it, with ``--workers 2`` where a worker
dies), whepfan's own publisher, and aiortc viewers that decode what they receive.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _peers import DecodingViewer, only_loopback_candidates
from _server import TOKEN, LiveServer, live_server
from _signalling import AUTH, SDP, bearer, publisher_offer

from whepfan.client.publisher import (
    PublisherOptions,
    PublishError,
    ReconnectingPublisher,
    ReconnectPolicy,
)
from whepfan.errors import NotFound
from whepfan.workers.pool import WorkerPool

# ---------------------------------------------------------------------- the backoff


def test_backoff_doubles_from_half_a_second_to_eight() -> None:
    policy = ReconnectPolicy()
    # uniform 0.5 is the middle of the jitter band: the base delay itself.
    assert [policy.delay(n, 0.5) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 8, 8]


def test_jitter_spreads_each_delay_by_a_fifth_either_way() -> None:
    policy = ReconnectPolicy()
    assert policy.delay(3, 0.0) == pytest.approx(1.6)
    assert policy.delay(3, 0.999999) == pytest.approx(2.4, abs=1e-5)


def test_a_longer_retry_after_wins_up_to_the_maximum() -> None:
    policy = ReconnectPolicy()
    assert policy.delay(1, 0.5, retry_after=3.0) == 3.0
    assert policy.delay(1, 0.5, retry_after=0.1) == 0.5
    assert policy.delay(1, 0.5, retry_after=120.0) == 8.0


def test_an_inconsistent_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        ReconnectPolicy(initial=10.0, maximum=8.0)
    with pytest.raises(ValueError):
        ReconnectPolicy(jitter=1.0)


def test_which_failures_are_worth_another_attempt() -> None:
    assert PublishError("ICE failed").retryable
    assert PublishError("cannot reach").retryable
    assert PublishError("409", status=409).retryable
    assert PublishError("503", status=503).retryable
    assert not PublishError("401", status=401).retryable
    assert not PublishError("400", status=400).retryable


# ---------------------------------------------------------------------- end to end


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


def _options(url: str) -> PublisherOptions:
    # Periodic keyframes: a viewer resuming after a new publisher does not depend on
    # the keyframe-request path for its first picture.
    return PublisherOptions(url=url, token=TOKEN, width=160, height=120, keyframe_interval=1.0)


@contextlib.asynccontextmanager
async def _running(publisher: ReconnectingPublisher) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.ensure_future(publisher.run(stop=stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def _until(condition: object, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, what
        await asyncio.sleep(0.05)


async def _live_publisher(backend: Any, stream: str, what: str) -> Any:
    """The publisher session of ``stream`` once its media flows (within 30 s)."""
    await _until(lambda: stream in backend.streams and backend.streams[stream].active, 30, what)
    publisher = backend.streams[stream].publisher
    assert publisher is not None
    return publisher


async def _viewer(http: aiohttp.ClientSession, url: str) -> tuple[DecodingViewer, str]:
    viewer = DecodingViewer()
    offer = await viewer.offer(["audio", "video"])
    async with http.post(url, data=offer, headers=SDP) as response:
        assert response.status == 201, await response.text()
        location = response.headers["Location"]
        answer = await response.text()
    await viewer.accept(answer)
    return viewer, location


async def _resumes(viewer: DecodingViewer, frames: int = 10, timeout: float = 20.0) -> None:
    before = len(viewer.video_frames)
    await _until(
        lambda: len(viewer.video_frames) >= before + frames,
        timeout,
        f"the viewer decoded {len(viewer.video_frames) - before} new frames",
    )


def _call(live: LiveServer, function: object, *args: object) -> object:
    """Run ``function(*args)`` on the server's loop thread and return its result."""

    async def call() -> object:
        return function(*args)  # type: ignore[operator]

    return asyncio.run_coroutine_threadsafe(call(), live.loop).result(10)


@pytest.mark.slow
async def test_a_session_ended_by_the_server_is_published_again_and_viewers_resume() -> None:
    live = live_server()
    publisher = ReconnectingPublisher(_options(f"{live.url}/whip/again"))
    try:
        async with aiohttp.ClientSession(base_url=live.url) as http, _running(publisher):
            await _until(lambda: publisher.sessions == 1, 20, "the publisher did not start")
            viewer, _ = await _viewer(http, "/whep/again")
            try:
                await viewer.wait_frames(5, timeout=20)
                assert live.info is not None
                backend = live.info.backend
                first = backend.streams["again"].publisher
                assert first is not None
                # The server ends it (as an operator's DELETE, or a takeover, would).
                _call(live, backend.end_session, first.id, 0.0, "deleted")
                await _until(lambda: publisher.sessions == 2, 20, "no second session")
                assert "close_notify" in publisher.failures[0]
                second = backend.streams["again"].publisher
                assert second is not None and second.id != first.id
                # Same viewer session, no renegotiation: it decodes the new publisher.
                await _resumes(viewer)
            finally:
                await viewer.close()
    finally:
        live.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Serve:
    """``whepfan serve`` as a process on a fixed HTTP port, killed the hard way."""

    def __init__(self, port: int, log: Path) -> None:
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "whepfan.cli",
                    "serve",
                    "--http",
                    f"127.0.0.1:{port}",
                    "--udp",
                    "127.0.0.1:0",
                    "--public-ip",
                    "127.0.0.1",
                    "--publish-token",
                    TOKEN,
                    "--worker-packet-budget",
                    "none",
                ],
                stdout=output,
                stderr=output,
            )
        self.url = f"http://127.0.0.1:{port}"

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                assert self.process.poll() is None, "whepfan serve exited"
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(f"{self.url}/whip/ready") as response:
                        if response.status < 500:
                            return
                await asyncio.sleep(0.05)
        raise AssertionError("whepfan serve did not start")

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no close_notify, no DELETE, nothing
        self.process.wait(10)


@pytest.mark.slow
async def test_a_publisher_outlives_a_killed_and_restarted_server(tmp_path: Path) -> None:
    """``whepfan serve`` is SIGKILLed (no close_notify, no answer): the publisher hears
    nothing for its silence timeout, finds the server gone, and POSTs with backoff
    until the restarted server answers; a viewer of the new server decodes it."""
    port = _free_port()
    server = Serve(port, tmp_path / "serve.log")
    publisher = ReconnectingPublisher(_options(f"{server.url}/whip/restart"))
    try:
        await server.ready()
        async with _running(publisher):
            await _until(lambda: publisher.sessions == 1, 20, "the publisher did not start")
            server.kill()
            await _until(lambda: publisher.failures, 15, "the publisher did not notice")
            assert "nothing from the server" in publisher.failures[0]
            await asyncio.sleep(1.5)  # a few refused attempts, with backoff
            server = Serve(port, tmp_path / "serve.log")
            await server.ready()
            await _until(lambda: publisher.sessions == 2, 30, "no session on the new server")
            assert publisher.attempts >= 1  # refused while the server was down
            async with aiohttp.ClientSession(base_url=server.url) as http:
                viewer, _ = await _viewer(http, "/whep/restart")
                try:
                    await viewer.wait_frames(5, timeout=20)
                finally:
                    await viewer.close()
    finally:
        if server.process.poll() is None:
            server.process.terminate()
            server.process.wait(10)


async def _next_event(events: aiohttp.ClientResponse, wanted: bytes, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        assert remaining > 0, f"no {wanted!r} event"
        line = await asyncio.wait_for(events.content.readline(), remaining)
        if line.strip() == b"event: " + wanted:
            return


@pytest.mark.slow
async def test_the_origin_worker_dies_and_the_viewers_of_the_other_worker_resume() -> None:
    """Issue 15.3 with ``--workers 2``: the worker holding the publisher is killed. The
    main process ends the publisher's session (SSE inactive, the session URL is gone),
    viewers on the other worker stay connected, the publisher notices and publishes
    again, lands on the surviving worker, and those viewers decode again on the same
    sessions (SSE active)."""
    live = live_server(workers="2")
    publisher = ReconnectingPublisher(_options(f"{live.url}/whip/cam"))
    viewers: list[DecodingViewer] = []
    try:
        assert live.info is not None
        pool = live.info.backend
        assert isinstance(pool, WorkerPool)
        async with aiohttp.ClientSession(base_url=live.url) as http, _running(publisher):
            await _until(lambda: publisher.sessions == 1, 20, "the publisher did not start")
            origin = pool.streams["cam"].origin
            first = pool.streams["cam"].publisher
            assert origin is not None and first is not None
            # Viewers until one is placed on the other worker.
            survivor: DecodingViewer | None = None
            location = ""
            for _ in range(4):
                viewer, where = await _viewer(http, "/whep/cam")
                viewers.append(viewer)
                if pool.worker_of(where.rsplit("/", 1)[1]) != origin:
                    survivor, location = viewer, where
                    break
            assert survivor is not None, "no viewer on the other worker"
            await survivor.wait_frames(5, timeout=20)
            assert publisher.current is not None and publisher.current.location is not None
            first_location = publisher.current.location
            async with http.get(location + "/events") as events:
                assert events.status == 200
                live.loop.call_soon_threadsafe(pool.kill_worker, origin)
                await _next_event(events, b"inactive", 10)
                # Ended from the main process: the old session's URL is gone, for the
                # registry and for the publisher's next request on it.
                with pytest.raises(NotFound):
                    pool.get_session(first.id)
                async with http.get(
                    first_location, headers={"Authorization": f"Bearer {TOKEN}"}
                ) as probe:
                    assert probe.status == 404, await probe.text()
                await _next_event(events, b"active", 30)
            assert publisher.sessions == 2
            # The publisher found its session gone by itself (silence, then its GET).
            assert "404 for the session" in publisher.failures[0], publisher.failures
            assert pool.streams["cam"].origin == pool.worker_of(location.rsplit("/", 1)[1])
            # Still the same viewer session, never renegotiated: it decodes again.
            assert survivor.pc.connectionState == "connected"
            await _resumes(survivor)
    finally:
        for viewer in viewers:
            await viewer.close()
        live.close()


@pytest.mark.slow
async def test_a_refused_first_attempt_is_retried_until_the_stream_is_free() -> None:
    """A restarted publisher while its predecessor's session is still live: 409 with
    Retry-After, until the predecessor goes (here: its DELETE); then it publishes."""
    live = live_server()
    try:
        first = ReconnectingPublisher(_options(f"{live.url}/whip/busy"))
        async with _running(first) as stop_first:
            await _until(lambda: first.sessions == 1, 20, "the first did not start")
            second = ReconnectingPublisher(_options(f"{live.url}/whip/busy"))
            async with _running(second):
                await _until(lambda: second.attempts >= 1, 20, "no refused attempt")
                assert "409" in second.failures[0] and second.sessions == 0
                stop_first.set()  # the first leaves (DELETE)
                await _until(lambda: second.sessions == 1, 20, "the second never published")
                assert live.info is not None
                publisher = live.info.backend.streams["busy"].publisher
                assert second.current is not None and second.current.location is not None
                assert publisher is not None and publisher.id in second.current.location
    finally:
        live.close()


async def test_a_server_that_cannot_be_reached_before_any_session_is_reported_at_once() -> None:
    publisher = ReconnectingPublisher(_options(f"http://127.0.0.1:{_free_port()}/whip/none"))
    with pytest.raises(PublishError) as caught:
        await publisher.run(duration=30)
    assert caught.value.status is None and publisher.sessions == 0


async def test_only_the_publish_token_replaces_a_stalled_publisher() -> None:
    """Issue 15.2: a stalled publisher is replaced by a new WHIP POST *with the publish
    token*. Here the first publisher never sends (its POST answered, no ICE): refused
    replacement (409, Retry-After) while its media clock runs, then, stalled, a POST
    without the token or with another one is refused (401) and leaves it in place, and
    one with the token replaces it."""
    live = live_server()  # the default media timeout, 3 s
    peers = []
    try:
        assert live.info is not None
        backend = live.info.backend

        async def post(headers: dict[str, str]) -> tuple[int, str | None]:
            pc, offer = await publisher_offer()
            peers.append(pc)
            async with http.post(
                "/whip/stalled", data=offer, headers={**headers, **SDP}
            ) as response:
                await response.read()
                return response.status, response.headers.get("Retry-After")

        async with aiohttp.ClientSession(base_url=live.url) as http:
            loop = asyncio.get_running_loop()
            assert (await post(AUTH))[0] == 201
            published_at = loop.time()
            first = backend.streams["stalled"].publisher
            assert first is not None
            status, retry_after = await post(AUTH)
            # Not stalled yet: 409, with the whole seconds until it would be replaceable.
            assert status == 409 and retry_after in ("1", "2", "3"), (status, retry_after)
            await asyncio.sleep(published_at + 3.2 - loop.time())  # stalled now
            assert (await post({}))[0] == 401
            assert (await post(bearer("not-the-publish-token")))[0] == 401
            assert backend.streams["stalled"].publisher is first
            assert (await post(AUTH))[0] == 201
            current = backend.streams["stalled"].publisher
            assert current is not None and current.id != first.id
            with pytest.raises(NotFound):
                backend.get_session(first.id)  # ended as "publisher-replaced"
    finally:
        for pc in peers:
            await pc.close()
        live.close()


def _publish_process(url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "whepfan.cli",
                "publish",
                url,
                "--token",
                TOKEN,
                "--size",
                "160x120",
                "--keyframe-interval",
                "1",
            ],
            stdout=output,
            stderr=output,
        )


@pytest.mark.slow
async def test_a_sigkilled_publisher_is_replaced_within_the_media_timeout(tmp_path: Path) -> None:
    """Issue 15.2 as reported: ``whepfan publish`` is SIGKILLed (no DELETE, no
    close_notify; its ICE consent would last 30 s). Viewers hear SSE ``inactive`` once
    its media has stopped for the media timeout, a restarted ``whepfan publish`` is
    accepted (after a 409 or two while the old one might still be sending), and the
    viewer decodes the new one on the same session (SSE ``active``)."""
    live = live_server()
    url = f"{live.url}/whip/crash"
    first = _publish_process(url, tmp_path / "first.log")
    second: subprocess.Popen[bytes] | None = None
    viewer: DecodingViewer | None = None
    try:
        assert live.info is not None
        backend = live.info.backend
        await _until(lambda: "crash" in backend.streams, 30, "the first did not publish")
        async with aiohttp.ClientSession(base_url=live.url) as http:
            viewer, location = await _viewer(http, "/whep/crash")
            await viewer.wait_frames(5, timeout=20)
            old = backend.streams["crash"].publisher
            assert old is not None
            async with http.get(location + "/events") as events:
                assert events.status == 200
                first.kill()
                first.wait(10)
                killed_at = asyncio.get_running_loop().time()
                await _next_event(events, b"inactive", 15)
                # Long before ICE consent (30 s) would have ended it.
                assert asyncio.get_running_loop().time() - killed_at < 15
                second = _publish_process(url, tmp_path / "second.log")
                await _next_event(events, b"active", 30)
            current = backend.streams["crash"].publisher
            assert current is not None and current.id != old.id
            with pytest.raises(NotFound):
                backend.get_session(old.id)  # ended as "publisher-replaced"
            assert viewer.pc.connectionState == "connected"
            await _resumes(viewer)
    finally:
        if viewer is not None:
            await viewer.close()
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)
        live.close()


@pytest.mark.slow
async def test_a_sigterm_publisher_deletes_its_session_and_is_replaced_at_once(
    tmp_path: Path,
) -> None:
    """``systemctl stop`` / ``docker stop`` send SIGTERM: ``whepfan publish`` ends as on
    Ctrl-C, DELETEing its session (RFC 9725 §4.3), exits 0, and the next publisher is
    accepted at once (201, not 409 until the media timeout)."""
    live = live_server()
    url = f"{live.url}/whip/stopped"
    first = _publish_process(url, tmp_path / "first.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        assert live.info is not None
        backend = live.info.backend
        old = await _live_publisher(backend, "stopped", "the first did not publish")
        first.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 10) == 0
        # Gone as "deleted", long before the 3 s media timeout could have stalled it.
        await _until(
            lambda: getattr(backend.streams.get("stopped"), "publisher", None) is None,
            2,
            "not DELETEd",
        )
        with pytest.raises(NotFound):
            backend.get_session(old.id)
        second = _publish_process(url, tmp_path / "second.log")
        await _until(
            lambda: getattr(backend.streams.get("stopped"), "publisher", None) is not None,
            20,
            "the second publisher was not accepted",
        )
        assert "409" not in (tmp_path / "second.log").read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)
        live.close()


@pytest.mark.slow
async def test_no_reconnect_makes_whepfan_publish_exit_when_its_session_ends(
    tmp_path: Path,
) -> None:
    live = live_server()
    log = tmp_path / "publish.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "whepfan.cli",
                "publish",
                f"{live.url}/whip/once",
                "--token",
                TOKEN,
                "--size",
                "160x120",
                "--no-reconnect",
            ],
            stdout=output,
            stderr=output,
        )
    try:
        assert live.info is not None
        backend = live.info.backend
        publisher = await _live_publisher(backend, "once", "whepfan publish did not go live")
        _call(live, backend.end_session, publisher.id, 0.0, "deleted")
        status = await asyncio.to_thread(process.wait, 20)
        assert status == 1
        assert "the server closed DTLS (close_notify)" in log.read_text()
        assert "once" not in backend.streams  # it did not come back
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        live.close()
