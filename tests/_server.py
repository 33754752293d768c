"""A real whepfan server for tests: ``whepfan.server.run`` (media worker + aiohttp) on its
own event-loop thread, exactly as ``whepfan serve`` runs it, on 127.0.0.1; and, for the
tests that signal in process, the media worker alone on the test's own loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from whepfan.config import MediaConfig
from whepfan.media.transport import MediaWorker
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.server import RunningServer, run
from whepfan.settings import Settings

TOKEN = "conformance-token"


class LiveServer:
    """``whepfan.server.run`` on its own loop thread, with the events SIGINT and SIGTERM
    would set: ``close()`` stops it, ``begin_drain()`` starts a graceful drain."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.drain = asyncio.Event()
        self.info: RunningServer | None = None
        ready = threading.Event()

        def started(info: RunningServer) -> None:
            self.info = info
            ready.set()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(
                run(settings, stop=self.stop, started=started, drain=self.drain)
            )
            ready.set()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        ready.wait(60)
        assert self.info is not None, "server did not start"

    @property
    def url(self) -> str:
        assert self.info is not None
        return self.info.http_url

    def begin_drain(self) -> None:
        self.loop.call_soon_threadsafe(self.drain.set)

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"
        self.loop.close()


def settings_for(*, token: str = TOKEN, **extra: object) -> Settings:
    """Settings as the command line would give them: loopback only, a known publish token."""
    cli: dict[str, object] = {
        "http": "127.0.0.1:0",
        "udp": "127.0.0.1:0",
        "public_ip": ["127.0.0.1"],
        "publish_token": token,
        "log_level": "warning",
    }
    cli.update(extra)
    return Settings.resolve(cli=cli, environ={})


def live_server(**extra: object) -> LiveServer:
    """A running server with :func:`settings_for` ``extra`` (and the TOKEN)."""
    return LiveServer(settings_for(token=TOKEN, **extra))


@asynccontextmanager
async def media_worker() -> AsyncIterator[MediaWorker]:
    """A started ``MediaWorker`` on the running loop (UDP on 127.0.0.1, advertising only
    127.0.0.1), for tests that reach its router directly or through an in-process app."""
    config = MediaConfig(udp_host="127.0.0.1", udp_port=0, public_ips=("127.0.0.1",))
    media = MediaWorker(config=config, certificate=DtlsCertificate.generate())
    await media.start()
    try:
        yield media
    finally:
        media.close()
