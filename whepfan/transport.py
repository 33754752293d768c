"""The I/O driver of one media worker: one UDP socket, one asyncio protocol, one timer.

Everything that decides anything lives in ``Router`` (sans-IO: datagrams and ``now`` in);
this module only moves bytes and re-arms a single timer, as aioquic's asyncio adapter does.
The compiled ``Fanout`` sends viewer media on the same socket's file descriptor with
``sendmmsg``; asyncio only ever receives on it and sends the occasional STUN/DTLS reply.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any, cast

import ifaddr

from whepfan import _fastpath
from whepfan.config import MediaConfig
from whepfan.protocol import sdp
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.router import Address, Router

log = logging.getLogger("whepfan.transport")


def interface_addresses() -> list[str]:
    """Every non-loopback, non-link-local interface address (candidate defaults).

    Chromium never uses 127.x candidates (reference/clients.md), so loopback addresses
    are advertised only when nothing else exists (a machine with no network at all).
    """
    found: list[str] = []
    loopback: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            host = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                continue
            if address.is_link_local or address.is_multicast or address.is_unspecified:
                continue
            (loopback if address.is_loopback else found).append(str(address))
    return found or loopback


def host_candidates(addresses: list[str], port: int) -> list[sdp.Candidate]:
    """One UDP host candidate per address (RFC 8839 §5.1), priority per RFC 8445 §5.1.2.1
    with type preference 126 (host) and decreasing local preference."""
    candidates = []
    for index, address in enumerate(addresses):
        local_preference = 65535 - index
        priority = (126 << 24) | (local_preference << 8) | (256 - 1)
        candidates.append(
            sdp.Candidate(
                foundation=str(index + 1),
                component=1,
                transport="udp",
                priority=priority,
                address=address,
                port=port,
                type="host",
            )
        )
    return candidates


class MediaWorker(asyncio.DatagramProtocol):
    """Owns the UDP port, the Fanout and the Router of one worker."""

    def __init__(self, *, config: MediaConfig, certificate: DtlsCertificate) -> None:
        self.config = config
        self.certificate = certificate
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.sock = _bind_udp(config)
        self.port: int = self.sock.getsockname()[1]
        self.fanout = _fastpath.Fanout(
            self.sock.fileno(),
            max_viewers=config.max_viewers,
            batch_size=config.fanout_batch_size,
        )
        addresses = list(config.public_ips) or interface_addresses()
        self.router = Router(
            config=config,
            certificate=certificate,
            fanout=self.fanout,
            send=self._sendto,
            candidates=host_candidates(addresses, self.port),
            wake=self.arm_timer,
        )

    async def start(self) -> None:
        await self._loop.create_datagram_endpoint(lambda: self, sock=self.sock)
        log.info(
            "media on udp %s:%d, candidates %s",
            self.config.udp_host,
            self.port,
            ", ".join(c.address for c in self.router.candidates),
        )

    def now(self) -> float:
        return self._loop.time()

    def close(self) -> None:
        now = self.now()
        for session_id in list(self.router.sessions):
            self.router.end_session(session_id, now, "shutdown")
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.close()

    # asyncio.DatagramProtocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.router.datagram_received(data, (addr[0], addr[1]), self._loop.time())
        except Exception:  # a bug must not stop the port for everyone else
            log.exception("datagram from %s crashed the router", addr)
            self.router.counters["router_errors"] += 1
        self.arm_timer()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a viewer that went away: consent expiry cleans up.
        self.router.counters["socket_errors"] += 1

    # timers ---------------------------------------------------------------------------

    def arm_timer(self) -> None:
        deadline = self.router.get_timer()
        if deadline is None or deadline == self._timer_at:
            return
        if self._timer_at is not None and self._timer_at <= deadline and self._timer is not None:
            return  # the armed timer fires first and re-arms
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        try:
            self.router.handle_timer(self._loop.time())
        except Exception:
            log.exception("router timer crashed")
            self.router.counters["router_errors"] += 1
        self.arm_timer()

    def _sendto(self, data: bytes, addr: Address) -> None:
        if self._transport is not None:
            self._transport.sendto(data, addr)


def _bind_udp(config: MediaConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.udp_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        # Bursts of one packet x thousands of viewers must fit the send buffer.
        forced = {socket.SO_SNDBUF: 32, socket.SO_RCVBUF: 33}[option]  # SO_*BUFFORCE (root)
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, config.socket_buffer_bytes)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, option, config.socket_buffer_bytes)
    sock.bind((config.udp_host, config.udp_port))
    sock.setblocking(False)
    return sock
