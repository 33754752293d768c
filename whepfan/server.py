"""Process wiring: the media worker, the HTTP application, and an orderly shutdown.

``whepfan serve`` runs :func:`serve`: uvloop, one in-process ``MediaWorker`` (``--workers
1``, DESIGN.md §2), the aiohttp application on the HTTP address, until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import uvloop
from aiohttp import web

from whepfan.http import create_app
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.settings import Settings, SettingsError
from whepfan.transport import MediaWorker

log = logging.getLogger("whepfan.server")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningServer:
    """What a started server is reachable at (the HTTP port may have been 0)."""

    http_url: str
    udp_port: int
    publish_token: str | None
    view_token: str | None


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"cannot load the TLS certificate/key: {exc}") from None
    return context


async def run(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    started: Callable[[RunningServer], None] | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM arrives when ``stop`` is None)."""
    settings = settings.with_generated_publish_token()
    ssl_context = tls_context(settings)
    if settings.publish_token_generated:
        # Publishing is never open by accident: the operator copies this token.
        log.warning("no publish token configured; generated one: %s", settings.publish_token)
    if settings.insecure_http:
        log.warning(
            "serving plain HTTP on %s: bearer tokens and session URLs travel in clear text",
            settings.http_host,
        )
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    worker = MediaWorker(config=settings.media_config(), certificate=DtlsCertificate.generate())
    await worker.start()
    # The ignore goes once Router has trickle/restart_ice/counter_offer/accept_counter_answer
    # (http/backend.py lists what the HTTP layer calls); mypy then flags it as unused.
    app = create_app(
        router=worker.router,
        clock=worker.now,
        options=settings.http_options(),
    )
    # handler_cancellation stays off: a handler never awaits after touching the router,
    # and a cancelled one must not leave a half-made session (routes.py).
    runner = web.AppRunner(app, access_log=log if settings.log_level == "debug" else None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.http_host, settings.http_port, ssl_context=ssl_context)
        await site.start()
        host, port = runner.addresses[0][:2]
        scheme = "https" if ssl_context else "http"
        shown_host = f"[{host}]" if ":" in host else host
        info = RunningServer(
            http_url=f"{scheme}://{shown_host}:{port}",
            udp_port=worker.port,
            publish_token=settings.publish_token,
            view_token=settings.view_token,
        )
        log.info(
            "WHIP on %s/whip/<stream>, WHEP on %s/whep/<stream>, media on udp port %d",
            info.http_url,
            info.http_url,
            info.udp_port,
        )
        if started is not None:
            started(info)
        await stop.wait()
        log.info("shutting down")
    finally:
        # Stop taking requests first, then end every session (DTLS close_notify goes out).
        await runner.cleanup()
        worker.close()


def serve(settings: Settings) -> None:
    uvloop.run(run(settings))
