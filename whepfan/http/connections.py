"""HTTP connection hygiene: header and idle deadlines, and a cap on open connections.

Theory of operation. aiohttp bounds the size of a request head (``max_line_size``,
``max_field_size``, ``max_headers``) but not the time a client may take to send it, and
its keep-alive timer cannot tell an idle connection from one that is half-way through a
head. A client that opens connections and sends each head a byte at a time (slowloris)
would hold a file descriptor per connection for as long as it likes, and once the process
runs out of descriptors no one else can connect. So every connection is in one of three
states, and the state decides its deadline::

    state               entered when                          deadline
    ------------------  ------------------------------------  -----------------------------
    AWAITING_REQUEST    accepted, or a response was handed    fresh: accepted + header
                        back and nothing of the next request  timeout; between requests:
                        has arrived                           response + idle timeout
    READING_HEAD        the first bytes of a request arrive   first byte + header timeout
                                                              (more bytes never extend it)
    IN_REQUEST          the application has the request       none: the handler bounds its
                        (head parsed)                         own body read (``body_timeout``)
                                                              and event streams last long

A connection past its deadline is closed. On top of that the table holds at most
``max_connections`` connections (set below the process's file limit, so ``accept()``
never fails with EMFILE): a new connection beyond it sheds the connection that has been
waiting longest for a request, then the one that has been reading a head longest, and
is itself refused only when every other connection is in a request (RFC 9112 §9.5: a
server may close an idle connection at any time; clients retry on a new one).

:class:`ConnectionTable` is the sans-IO core (keys are opaque, time is a parameter, tested
on virtual time); :class:`GuardedSite` is the thin asyncio driver: an aiohttp site whose
protocol factory wraps each aiohttp ``RequestHandler`` in a :class:`_GuardedProtocol`
that reports bytes and closes, with one timer for the earliest deadline. The application
reports where each request starts and ends through :func:`connection_middleware`.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import resource
import ssl
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

log = logging.getLogger("whepfan.http")

K = TypeVar("K", bound=Hashable)

# Descriptors kept free of HTTP connections below the soft RLIMIT_NOFILE: the listening and
# UDP sockets, the worker channels, log files, the event loop's own, TLS key files, and
# what libraries open lazily (/dev/urandom, DNS). Measured needs are a few dozen.
RESERVED_DESCRIPTORS = 64
# Per viewer a browser holds its WHEP POST connection (keep-alive) and its event stream.
DESCRIPTORS_PER_VIEWER = 2


class ConnectionState(enum.Enum):
    AWAITING_REQUEST = "awaiting_request"
    READING_HEAD = "reading_head"
    IN_REQUEST = "in_request"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLimits:
    """Per-connection deadlines (seconds) and the connection cap (None: from the file
    limit, see :func:`connection_cap`)."""

    header_timeout: float = 10.0
    body_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int | None = None

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections is at least 1")


@dataclass(slots=True)
class _Entry:
    state: ConnectionState
    since: float
    deadline: float | None
    requests: int = 0  # requests the application is handling on this connection now
    fresh: bool = True  # no request has completed on it yet


@dataclass(eq=False)
class ConnectionTable(Generic[K]):
    """Which connections are open, in which state, until when (sans-IO, see the module
    docstring). Each method takes ``now``; ``opened`` and ``expired`` return the keys the
    caller must close, and every closed key is reported back with ``closed``."""

    header_timeout: float
    idle_timeout: float
    max_connections: int
    _entries: dict[K, _Entry] = field(default_factory=dict)
    # Insertion-ordered by the time each entered its state: the first is the oldest.
    _awaiting: dict[K, None] = field(default_factory=dict)
    _reading: dict[K, None] = field(default_factory=dict)
    # (deadline, sequence, key); an entry is stale when the key's deadline has changed.
    _deadlines: list[tuple[float, int, K]] = field(default_factory=list)
    _sequence: itertools.count[int] = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return len(self._entries)

    def state(self, key: K) -> ConnectionState | None:
        entry = self._entries.get(key)
        return entry.state if entry is not None else None

    def opened(self, key: K, now: float) -> list[K]:
        """A connection was accepted; returns the connections to close to stay within
        ``max_connections`` (possibly ``[key]`` itself when all others are in requests)."""
        self._entries[key] = _Entry(ConnectionState.AWAITING_REQUEST, now, None)
        self._set(key, ConnectionState.AWAITING_REQUEST, now, now + self.header_timeout)
        shed: list[K] = []
        while len(self._entries) - len(shed) > self.max_connections:
            victim = self._shed_candidate(exclude=key, skip=shed)
            if victim is None:
                shed.append(key)
                break
            shed.append(victim)
        return shed

    def received(self, key: K, now: float) -> None:
        """Bytes arrived. The first bytes of a request start its header deadline; a fresh
        connection keeps the earlier deadline it got when accepted."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not ConnectionState.AWAITING_REQUEST:
            return
        deadline = now + self.header_timeout
        if entry.deadline is not None:
            deadline = min(deadline, entry.deadline)
        self._set(key, ConnectionState.READING_HEAD, now, deadline)

    def request_started(self, key: K, now: float) -> None:
        """The application has a parsed request from this connection."""
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.requests += 1
        if entry.state is not ConnectionState.IN_REQUEST:
            self._set(key, ConnectionState.IN_REQUEST, now, None)

    def request_finished(self, key: K, now: float) -> None:
        """The application handed back its response; the connection waits for the next
        request (keep-alive) from now on."""
        entry = self._entries.get(key)
        if entry is None or entry.requests == 0:
            return
        entry.requests -= 1
        entry.fresh = False
        if entry.requests == 0:
            self._set(key, ConnectionState.AWAITING_REQUEST, now, now + self.idle_timeout)

    def closed(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._awaiting.pop(key, None)
            self._reading.pop(key, None)

    def next_deadline(self) -> float | None:
        """The earliest deadline of an open connection (for the driver's one timer)."""
        self._drop_stale()
        return self._deadlines[0][0] if self._deadlines else None

    def expired(self, now: float) -> list[tuple[K, str]]:
        """Connections past their deadline, to close, each with why ("header_timeout":
        no complete head in time; "idle_timeout": keep-alive ran out); each is reported
        once."""
        due: list[tuple[K, str]] = []
        while True:
            self._drop_stale()
            if not self._deadlines or self._deadlines[0][0] > now:
                return due
            _, _, key = heapq.heappop(self._deadlines)
            entry = self._entries[key]
            entry.deadline = None  # reported; the caller closes it
            idle = entry.state is ConnectionState.AWAITING_REQUEST and not entry.fresh
            due.append((key, "idle_timeout" if idle else "header_timeout"))

    # ------------------------------------------------------------------ internals

    def _set(self, key: K, state: ConnectionState, now: float, deadline: float | None) -> None:
        entry = self._entries[key]
        self._awaiting.pop(key, None)
        self._reading.pop(key, None)
        if state is ConnectionState.AWAITING_REQUEST:
            self._awaiting[key] = None
        elif state is ConnectionState.READING_HEAD:
            self._reading[key] = None
        entry.state, entry.since, entry.deadline = state, now, deadline
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._sequence), key))

    def _drop_stale(self) -> None:
        heap = self._deadlines
        while heap:
            deadline, _, key = heap[0]
            entry = self._entries.get(key)
            if entry is not None and entry.deadline == deadline:
                return
            heapq.heappop(heap)

    def _shed_candidate(self, *, exclude: K, skip: list[K]) -> K | None:
        # Idle first (nothing is lost but a warm connection), then the slowest heads.
        for pool in (self._awaiting, self._reading):
            for key in pool:
                if key != exclude and key not in skip:
                    return key
        return None


# ----------------------------------------------------------------------------- limits


def connection_cap(soft_limit: int) -> int:
    """Default cap: the soft file limit minus :data:`RESERVED_DESCRIPTORS` (at least 16)."""
    return max(16, soft_limit - RESERVED_DESCRIPTORS)


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (allowed without privileges,
    setrlimit(2)) and return the soft limit in force. Every HTTP connection is a
    descriptor, and distributions still default the soft limit to 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard
        if hard == resource.RLIM_INFINITY:
            # An unlimited hard limit still cannot exceed the kernel's nr_open.
            target = _nr_open(default=soft)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the file limit from %d to %d: %s", soft, target, exc)
    return soft


def _nr_open(*, default: int) -> int:
    try:
        with open("/proc/sys/fs/nr_open") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return default


def descriptors_needed(max_viewers: int) -> int:
    return max_viewers * DESCRIPTORS_PER_VIEWER + RESERVED_DESCRIPTORS


# ----------------------------------------------------------------------------- driver


class ConnectionGuard:
    """The asyncio side of a :class:`ConnectionTable` for one application: keys are the
    connections' transports (what ``request.transport`` is, so the middleware and the
    protocol wrapper name a connection alike)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        cap = limits.max_connections
        if cap is None:
            cap = connection_cap(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.limits = limits
        self.table: ConnectionTable[asyncio.BaseTransport] = ConnectionTable(
            header_timeout=limits.header_timeout,
            idle_timeout=limits.idle_timeout,
            max_connections=cap,
        )
        # Why connections were closed: header_timeout, idle_timeout, shed, refused.
        self.closed_by_reason: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    @property
    def max_connections(self) -> int:
        return self.table.max_connections

    def protocol_factory(self, inner: web.Server) -> _GuardedProtocol:
        return _GuardedProtocol(inner(), self)

    # Reports from the protocol wrapper and the middleware -----------------------------

    def opened(self, transport: asyncio.BaseTransport) -> None:
        now = asyncio.get_running_loop().time()
        for victim in self.table.opened(transport, now):
            reason = "refused" if victim is transport else "shed"
            self._close(victim, reason)
        self._arm()

    def received(self, transport: asyncio.BaseTransport) -> None:
        self.table.received(transport, asyncio.get_running_loop().time())
        self._arm()

    def request_started(self, transport: asyncio.BaseTransport) -> None:
        self.table.request_started(transport, asyncio.get_running_loop().time())

    def request_finished(self, transport: asyncio.BaseTransport) -> None:
        self.table.request_finished(transport, asyncio.get_running_loop().time())
        self._arm()

    def closed(self, transport: asyncio.BaseTransport) -> None:
        self.table.closed(transport)

    # ----------------------------------------------------------------------------------

    def _close(self, transport: asyncio.BaseTransport, reason: str) -> None:
        self.closed_by_reason[reason] = self.closed_by_reason.get(reason, 0) + 1
        state = self.table.state(transport)
        self.table.closed(transport)
        log.debug("closing HTTP connection (%s, %s)", reason, state.value if state else "-")
        if isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
            # A client that stopped reading would keep a graceful close waiting forever.
            transport.abort()
        else:
            transport.close()

    def _arm(self) -> None:
        deadline = self.table.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        now = asyncio.get_running_loop().time()
        for transport, reason in self.table.expired(now):
            self._close(transport, reason)
        self._arm()


class _GuardedProtocol(asyncio.Protocol):
    """An aiohttp ``RequestHandler`` with the guard told of each connection's bytes and
    end; everything else is passed through unchanged."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._inner.connection_made(transport)
        self._guard.opened(transport)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._guard.received(self._transport)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.closed(self._transport)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


CONNECTION_GUARD_KEY: web.AppKey[ConnectionGuard] = web.AppKey("connection_guard")


@web.middleware
async def connection_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tells the application's guard (if a :class:`GuardedSite` serves it) where a request
    starts and ends, so its connection leaves and re-enters the deadline states."""
    guard = request.app.get(CONNECTION_GUARD_KEY)
    transport = request.transport
    if guard is None or transport is None:
        return await handler(request)
    guard.request_started(transport)
    try:
        return await handler(request)
    finally:
        guard.request_finished(transport)


class GuardedSite(web.BaseSite):
    """``web.TCPSite`` whose connections are watched by a :class:`ConnectionGuard`."""

    __slots__ = ("_guard", "_host", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._guard = guard
        self._host = host
        self._port = port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        guard = self._guard
        self._server = await asyncio.get_running_loop().create_server(
            lambda: guard.protocol_factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
            # A TLS handshake happens before the connection reaches the guard: bound it too.
            ssl_handshake_timeout=guard.limits.header_timeout if self._ssl_context else None,
        )


# ----------------------------------------------------------------------------- logging


class ServerLogger(logging.LoggerAdapter[logging.Logger]):
    """The logger handed to aiohttp's server (``AppRunner(logger=...)``).

    aiohttp logs a request it cannot parse (bad request line, oversized or malformed
    header) with ``logger.exception``: an ERROR and a traceback per malformed request,
    which anyone on the network can produce at will. Here that is one DEBUG line and a
    count (``http_malformed``); every other exception aiohttp reports is logged as before.
    """

    def __init__(self, logger: logging.Logger, counters: Counter[str] | None = None) -> None:
        super().__init__(logger, {})
        # The application's counters (``http_malformed`` is exported by /metrics).
        self.counters: Counter[str] = Counter() if counters is None else counters

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.counters["http_malformed"] += 1
            remote = args[0] if args else "?"
            # The parser's message draws a caret under the bad byte on extra lines.
            reason = " ".join(str(exc_info.message).split())
            self.logger.debug("malformed HTTP request from %s: %s", remote, reason)
            return
        self.logger.error(msg, *args, exc_info=exc_info, **kwargs)
