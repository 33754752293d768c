"""Process wiring: the media worker, the HTTP application, and an orderly shutdown.

``whepfan serve`` runs :func:`serve`: uvloop, one in-process ``MediaWorker`` (``--workers
1``, DESIGN.md §2) or a pool of worker processes (``--workers N``, whepfan/workers/pool.py),
behind the capacity ledger, and the aiohttp application on the HTTP address, until SIGINT,
or until SIGTERM and a graceful drain (new sessions refused with 503, event readers told
to reconnect, up to ``drain_timeout`` seconds for viewers to leave).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvloop
from aiohttp import web

from whepfan._fastpath import gcm_backend
from whepfan.cluster.node import ClusterNode
from whepfan.cluster.pool_backend import WORKER_EXTENSIONS
from whepfan.http import COUNTERS_KEY, create_app
from whepfan.http.connections import (
    CONNECTION_GUARD_KEY,
    GuardedSite,
    ServerLogger,
    descriptors_needed,
    raise_file_limit,
)
from whepfan.http.events import EVENT_HUB_KEY, EventHub
from whepfan.http.metrics import add_metrics_route
from whepfan.http.placement_grants import PlacementGrants
from whepfan.media.health import warn_when_behind
from whepfan.media.transport import MediaWorker
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.settings import ENV_PREFIX, Settings, SettingsError
from whepfan.workers.calibrate import calibrate
from whepfan.workers.capacity import CapacityLedger
from whepfan.workers.in_process import InProcessWorkers
from whepfan.workers.pool import WorkerPool

log = logging.getLogger("whepfan.server")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningServer:
    """What a started server is reachable at (the HTTP port may have been 0)."""

    http_url: str
    udp_port: int
    publish_token: str | None
    view_token: str | None
    # Every worker's UDP port (udp_port is the first); the backend for tests and tools.
    udp_ports: tuple[int, ...] = ()
    backend: Any = None


class BindError(SettingsError):
    """An address the settings name cannot be bound: in use, not an address of this
    machine, or a privileged port (the CLI prints it with the usage, status 2)."""


_BIND_REASONS = {
    errno.EADDRINUSE: "in use by another process (another whepfan?)",
    errno.EADDRNOTAVAIL: "not an address of this machine",
    errno.EACCES: "a privileged port (below 1024) for this user",
}


def bind_error(exc: OSError, *, option: str, what: str, host: str, port: int) -> BindError:
    """``exc`` from binding ``host:port`` restated with the address and the setting that
    chose it (``exc`` itself names neither)."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = _BIND_REASONS.get(exc.errno or 0, exc.strerror or str(exc))
    flag = "--" + option.replace("_", "-")
    return BindError(
        f"{what} {shown}: {reason}; choose another with {flag} HOST:PORT "
        f"(or {ENV_PREFIX}{option.upper()})"
    )


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    # Each file is opened first so that the error names the one missing or unreadable;
    # load_cert_chain's own errors ("[Errno 2] No such file or directory") do not.
    for option, path in (("tls_cert", settings.tls_cert), ("tls_key", settings.tls_key)):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise SettingsError(f"{settings.given_as(option)}: {exc.strerror or exc}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as exc:
        raise SettingsError(
            f"cannot load the TLS certificate {settings.tls_cert} with the key "
            f"{settings.tls_key}: {exc.reason or exc} (both PEM, the key matching the "
            "certificate)"
        ) from None
    return context


def check_udp_ports(settings: Settings) -> None:
    """Bind and release each worker's UDP port (``udp_port + index``), so that a pool of
    worker processes names a port in use before it spawns (a worker that cannot bind
    only dies). The workers bind the same way: no SO_REUSEADDR, the family by address."""
    if settings.udp_port == 0:
        return
    family = socket.AF_INET6 if ":" in settings.udp_host else socket.AF_INET
    for index in range(settings.workers):
        port = settings.udp_port + index
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((settings.udp_host, port))
            except OSError as exc:
                raise bind_error(
                    exc, option="udp", what="media UDP port", host=settings.udp_host, port=port
                ) from None


# The cluster token is the HKDF input keying placement grants (http/placement_grants.py):
# HKDF adds no entropy, so a short token is a guessable grant key (RFC 7518 §3.2 asks
# HS256 keys of at least 256 bits).
MIN_CLUSTER_TOKEN_LENGTH = 32


def _warn_about_cluster_token(settings: Settings) -> None:
    token = settings.cluster_token
    if token is not None and len(token) < MIN_CLUSTER_TOKEN_LENGTH:
        log.warning(
            "the cluster token is %d characters: it keys the placement grants of every 307, "
            "so use at least %d random ones (e.g. openssl rand -base64 32)",
            len(token),
            MIN_CLUSTER_TOKEN_LENGTH,
        )


def _warn_about_candidates(settings: Settings) -> None:
    advertised = settings.advertised_ips()
    if advertised and all(ipaddress.ip_address(a).is_loopback for a in advertised):
        # Chromium never pairs 127.x/::1 candidates (reference/clients.md): only local
        # tools (whepfan publish, loadtest, aiortc) can reach this server's media.
        log.warning(
            "media candidates are loopback only (%s): browsers will not connect; bind "
            "--udp to a reachable address or give --public-ip",
            ", ".join(advertised),
        )


LINGERING_TIME = 2.0


def _warn_about_file_limit(settings: Settings, soft_limit: int) -> None:
    """Every HTTP connection is a descriptor, and a viewer holds up to two (its WHEP POST's
    keep-alive connection and its event stream)."""
    needed = descriptors_needed(settings.max_viewers)
    if soft_limit < needed:
        log.warning(
            "the file descriptor limit is %d, low for --max-viewers %d (about %d needed): "
            "raise it (LimitNOFILE= in the systemd unit, ulimit -n) or new HTTP "
            "connections will displace idle ones early",
            soft_limit,
            settings.max_viewers,
            needed,
        )


async def run(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    started: Callable[[RunningServer], None] | None = None,
    drain: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set, or ``drain`` is set and the drain ends (SIGINT sets
    ``stop`` and SIGTERM ``drain`` when ``stop`` is None)."""
    settings = settings.with_generated_publish_token()
    ssl_context = tls_context(settings)
    # Reads the JWT key files: a bad one stops start-up here, before any worker starts.
    http_options = settings.http_options()
    if settings.publish_token_generated:
        # Publishing is never open by accident: the operator copies this token.
        log.warning("no publish token configured; generated one: %s", settings.publish_token)
    if settings.insecure_http:
        log.warning(
            "serving plain HTTP on %s: bearer tokens and session URLs travel in clear text",
            settings.http_host,
        )
    if settings.open_metrics_off_loopback:
        # Viewer counts and load are operational data; say so once rather than never.
        log.warning(
            "GET /metrics on %s is unauthenticated: set --metrics-token to require a "
            "bearer token from the scraper",
            settings.http_host,
        )
    # Before the application sizes its connection cap from it (connections.py).
    _warn_about_file_limit(settings, raise_file_limit())
    loop = asyncio.get_running_loop()
    drain = drain or asyncio.Event()
    if stop is None:
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, drain.set)
    certificate = DtlsCertificate.generate()
    settings = settings.with_measured_budget(_measure_worker_budget)
    ledger = CapacityLedger(policy=settings.capacity_policy(), workers=settings.workers)
    backend: InProcessWorkers | WorkerPool
    _warn_about_candidates(settings)
    _warn_about_cluster_token(settings)
    if settings.workers == 1:
        try:
            worker = MediaWorker(config=settings.media_config(), certificate=certificate)
        except OSError as exc:
            raise bind_error(
                exc,
                option="udp",
                what="media UDP port",
                host=settings.udp_host,
                port=settings.udp_port,
            ) from None
        await worker.start()
        backend = InProcessWorkers(router=worker.router, ledger=ledger)
        clock: Callable[[], float] = worker.now
        udp_ports: tuple[int, ...] = (worker.port,)
    else:
        check_udp_ports(settings)
        pool = WorkerPool(
            workers=settings.workers,
            config=settings.media_config(),
            certificate=certificate,
            ledger=ledger,
            log_level=settings.log_level,
            # An edge's upstream sessions run in its workers (cluster/pool_backend.py).
            extensions=WORKER_EXTENSIONS if settings.upstream or settings.cluster else (),
        )
        await pool.start()
        backend, clock = pool, loop.time
        udp_ports = tuple(pool.ports[index] for index in sorted(pool.ports))
    cluster = await start_cluster(settings, backend, clock, http_options.placement_grants)
    app = create_app(
        router=backend,
        clock=clock,
        options=http_options,
        viewer_placement=cluster.place if cluster is not None else None,
    )
    if cluster is not None:
        cluster.add_routes(app)
    add_metrics_route(
        app,
        backend.stats,
        token=settings.metrics_token,
        collectors=[cluster.collector()] if cluster is not None else [],
    )
    hub = app.get(EVENT_HUB_KEY)
    if isinstance(backend, WorkerPool) and hub is not None:
        # A crashed worker's viewers must come back through signalling (another worker).
        backend.on_sessions_lost = hub.reconnect_sessions
    ticker = asyncio.ensure_future(_tick(backend))
    # With --workers N each worker process watches its own loop (workers.WorkerNode.run).
    lag_watch = None
    if isinstance(backend, InProcessWorkers):
        backend.monitor.receive_delay = worker.receive_delay
        lag_watch = asyncio.ensure_future(warn_when_behind(worker.receive_delay, worker=0))
    # handler_cancellation stays off: a handler never awaits after touching the router,
    # and a cancelled one must not leave a half-made session (routes.py).
    # auto_decompress off: no request body is ever inflated (body.py answers 415); the
    # server logger turns aiohttp's traceback per malformed request into a DEBUG line.
    runner = web.AppRunner(
        app,
        access_log=log if settings.log_level == "debug" else None,
        keepalive_timeout=settings.http_idle_timeout,
        # After answering a request whose body it did not read (401, 408, 415), aiohttp
        # reads and drops what is still coming, so the client sees the answer rather than
        # a reset; 2 s is plenty for an honest client and bounds a trickling one.
        lingering_time=LINGERING_TIME,
        auto_decompress=False,
        logger=ServerLogger(logging.getLogger("aiohttp.server"), app[COUNTERS_KEY]),
    )
    try:
        await runner.setup()
        site = GuardedSite(
            runner,
            settings.http_host,
            settings.http_port,
            guard=app[CONNECTION_GUARD_KEY],
            ssl_context=ssl_context,
        )
        try:
            await site.start()
        except OSError as exc:
            raise bind_error(
                exc,
                option="http",
                what="HTTP address",
                host=settings.http_host,
                port=settings.http_port,
            ) from None
        host, port = runner.addresses[0][:2]
        scheme = "https" if ssl_context else "http"
        shown_host = f"[{host}]" if ":" in host else host
        info = RunningServer(
            http_url=f"{scheme}://{shown_host}:{port}",
            udp_port=udp_ports[0],
            publish_token=settings.publish_token,
            view_token=settings.view_token,
            udp_ports=udp_ports,
            backend=backend,
        )
        log.info(
            "WHIP on %s/whip/<stream>, WHEP on %s/whep/<stream>, media on udp port %s;"
            " SRTP AES-GCM on %s",
            info.http_url,
            info.http_url,
            ", ".join(map(str, udp_ports)),
            gcm_backend(),
        )
        if started is not None:
            started(info)
        await _first_of(stop, drain)
        if not stop.is_set():
            await drain_sessions(backend, hub, timeout=settings.drain_timeout, stop=stop)
        log.info("shutting down")
    finally:
        ticker.cancel()
        if lag_watch is not None:
            lag_watch.cancel()
        # Stop taking requests first, then end every session (DTLS close_notify goes out).
        await runner.cleanup()
        if cluster is not None:
            await cluster.close()
        if isinstance(backend, WorkerPool):
            await backend.close()
        else:
            worker.close()


async def start_cluster(
    settings: Settings,
    backend: InProcessWorkers | WorkerPool,
    clock: Callable[[], float],
    placement_grants: PlacementGrants | None = None,
) -> ClusterNode | None:
    """``--upstream`` / ``--cluster`` (whepfan/cluster/): None on a single box."""
    if settings.upstream is None and settings.cluster is None:
        return None
    node = ClusterNode.create(
        backend=backend,
        clock=clock,
        upstream=settings.upstream,
        upstream_token=settings.upstream_token,
        cluster=settings.cluster,
        node_url=settings.node_url,
        cluster_token=settings.cluster_token,
        max_upstream_pulls=settings.max_upstream_pulls,
        grace=settings.upstream_grace,
        api_token=settings.metrics_token,
        # The HTTP layer's: one replay cache and one set of counters per node.
        placement_grants=placement_grants,
    )
    await node.start()
    return node


# Start-up calibration: ~0.15 s of one core, enough for a budget within a few per cent of
# a full `whepfan calibrate` (which the operator can run and pass instead).
STARTUP_CALIBRATION_PACKETS = 50_000


def _measure_worker_budget() -> float:
    """``worker_packet_budget = "auto"``: this machine's send cost per packet, measured
    now, times the calibration headroom (0.7 of the loopback limit: the issue-8 target,
    and where bench/capacity.py shows whepfan still delivering every packet on time)."""
    measured = calibrate(packets=STARTUP_CALIBRATION_PACKETS)
    log.info(
        "worker packet budget %d packets/s: %.2f CPU µs per packet measured here x %.0f%% "
        "headroom (--worker-packet-budget N to set it, 'none' for no limit)",
        measured.worker_packet_budget,
        measured.cpu_seconds_per_packet * 1e6,
        measured.headroom * 100,
    )
    return float(measured.worker_packet_budget)


async def drain_sessions(
    backend: InProcessWorkers | WorkerPool,
    hub: EventHub | None,
    *,
    timeout: float,
    stop: asyncio.Event,
) -> None:
    """Graceful drain: refuse new sessions (503 + Retry-After), tell event readers to
    reconnect (WHEP EXT §4.3.5), and wait up to ``timeout`` for viewers to leave."""
    backend.begin_drain()
    told = hub.drain() if hub is not None else 0
    log.info("draining: %d viewers, %d event readers told", backend.viewer_count, told)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while backend.viewer_count > 0 and not stop.is_set():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.info("drain timeout with %d viewers left", backend.viewer_count)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(remaining, 0.25))


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _tick(backend: InProcessWorkers | WorkerPool) -> None:
    """Once a second: settle sessions that ended on their own, measure stream rates."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(1.0)
        try:
            backend.tick(loop.time())
        except Exception:
            log.exception("capacity tick failed")


def serve(settings: Settings) -> None:
    uvloop.run(run(settings))
