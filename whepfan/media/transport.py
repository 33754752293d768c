"""MediaWorker: the socket, the reader, one timer (the media plane's I/O driver).

Everything that decides anything lives in ``Router`` (sans-IO: datagrams and ``now`` in);
this module only moves bytes and re-arms a single timer, as aioquic's asyncio adapter does.
The compiled ``Fanout`` sends viewer media on the same socket's file descriptor with
``sendmmsg``; this module receives on it and sends the occasional STUN/DTLS/RTCP reply.

Multi-homed hosts: a socket bound to the wildcard address receives on every address of
the host, but the kernel picks the source of what it sends by route, and a peer drops a
reply that does not come from the address its check went to (RFC 8445 §7.2.5.2.1, and
DTLS/SRTP run on that same pair). So on a wildcard socket the receive loop asks for each
datagram's destination address (IP_PKTINFO / IPV6_RECVPKTINFO, RFC 3542 §6.1) and hands
it to the router as ``local``; the router sends from it (``_sendto_from``: sendmsg with an
IP_PKTINFO / IPV6_PKTINFO control message) and gives it to the Fanout as the viewer's
``source``. asyncio's datagram endpoints do not expose ancillary data, hence the reader.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable

import ifaddr

from whepfan import _fastpath
from whepfan.config import MediaConfig
from whepfan.media import gso
from whepfan.media.health import ReceiveDelay
from whepfan.media.router import Router
from whepfan.media.session import Address
from whepfan.protocol import sdp
from whepfan.protocol.dtls import DtlsCertificate

log = logging.getLogger("whepfan.transport")

# ip(7) IP_PKTINFO from <linux/in.h>: the socket module of Python 3.11 does not name it.
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)
# Largest UDP payload: a datagram is never truncated, whatever a peer sends.
MAX_DATAGRAM = 65535
# Room for one in6_pktinfo control message (the larger of the two pktinfo structs).
PKTINFO_ANCILLARY_SIZE = socket.CMSG_SPACE(20)
# socket(7) SO_TIMESTAMPNS (= SCM_TIMESTAMPNS) from <asm-generic/socket.h>: each datagram's
# kernel receive time (CLOCK_REALTIME, struct timespec), so the worker can tell how long
# it waited in the socket (capacity.ReceiveDelay). Python 3.11 does not name it.
SO_TIMESTAMPNS: int = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESTAMP_ANCILLARY_SIZE = socket.CMSG_SPACE(16)
_TIMESPEC = struct.Struct("=qq")
# Datagrams read per readiness callback, so that timers and other readers get their turn.
RECEIVE_BURST = 64
# Replies held while the send buffer is full (beyond: dropped, counted as send_buffer_full).
MAX_SEND_BACKLOG = 1024
# Distinct pktinfo messages remembered (local addresses x interfaces; a bound on memory).
MAX_LOCAL_NAMES = 256
# struct in_pktinfo {int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr} and
# struct in6_pktinfo {in6_addr ipi6_addr; unsigned ipi6_ifindex}, native layout.
_IN_PKTINFO = struct.Struct("=i4s4s")
_IN6_PKTINFO = struct.Struct("=16sI")

# A sendmsg control message list: [(level, type, data)].
Control = list[tuple[int, int, bytes]]


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


def receivable_addresses(addresses: list[str], family: int) -> list[str]:
    """The addresses a wildcard socket of ``family`` receives on: an IPv4 socket
    (``0.0.0.0``) none of the IPv6 ones, which a candidate must not advertise; a dual-stack
    IPv6 socket (``::``) every one (IPv4 arrives IPv4-mapped, RFC 4291 §2.5.5.2)."""
    if family == socket.AF_INET6:
        return list(addresses)
    return [a for a in addresses if ipaddress.ip_address(a).version == 4]


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


class MediaWorker:
    """Owns the UDP port, the Fanout and the Router of one worker."""

    def __init__(
        self,
        *,
        config: MediaConfig,
        certificate: DtlsCertificate,
        router_factory: Callable[..., Router] = Router,
    ) -> None:
        self.config = config
        self.certificate = certificate
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.sock = _bind_udp(config)
        self.port: int = self.sock.getsockname()[1]
        # True when bound to a wildcard address: datagrams then carry their destination.
        self.learns_local_address = _enable_pktinfo(self.sock)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._ancillary_size = TIMESTAMP_ANCILLARY_SIZE + (
            PKTINFO_ANCILLARY_SIZE if self.learns_local_address else 0
        )
        # How long what we read had waited (the first datagram of each read burst, the
        # oldest queued): a worker past its capacity shows here before anywhere else.
        self.receive_delay = ReceiveDelay(clock=self._loop.time)
        self._last_arrival = -math.inf
        # Received pktinfo -> address text, and text -> control message to send from it:
        # a worker sees a handful of local addresses, so neither is built per datagram.
        self._local_names: dict[bytes, str] = {}
        self._source_controls: dict[str, Control] = {}
        # Replies that met a full send buffer, sent in order once it drains.
        self._backlog: deque[tuple[bytes, Address, Control | None]] = deque()
        # UDP GSO (gso.py): probed on this socket; "on" that fails is a start-up error.
        self.gso = gso.resolve(config.gso, self.sock)
        self.fanout = _fastpath.Fanout(
            self.sock.fileno(),
            max_viewers=config.max_viewers,
            batch_size=config.fanout_batch_size,
            gso=self.gso,
        )
        addresses = list(config.public_ips) or receivable_addresses(
            interface_addresses(), self.sock.family
        )
        # One router per worker, built on this worker's socket, fan-out and timer.
        self.router = router_factory(
            config=config,
            certificate=certificate,
            fanout=self.fanout,
            send=self._sendto,
            send_from=self._sendto_from,
            default_source=self.default_source if self.learns_local_address else None,
            candidates=host_candidates(addresses, self.port),
            wake=self.arm_timer,
        )

    async def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        self._reading = True
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
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        if self._backlog:
            self._loop.remove_writer(self.sock.fileno())
            self._backlog.clear()
        self.sock.close()

    # receiving ------------------------------------------------------------------------

    def _on_readable(self) -> None:
        receive = self.sock.recvmsg
        ancillary_size = self._ancillary_size
        router = self.router
        local_names = self._local_names
        first = True
        if self.gso:
            router.begin_burst()  # per-track runs for GSO entries (media/burst.py)
        for _ in range(RECEIVE_BURST):
            try:
                data, ancillary, _flags, addr = receive(MAX_DATAGRAM, ancillary_size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ICMP errors queued on the socket (a viewer that went away): consent
                # expiry cleans up.
                router.counters["socket_errors"] += 1
                continue
            local = None
            now = self._loop.time()
            for level, _kind, payload in ancillary:
                if level == socket.SOL_SOCKET:  # SCM_TIMESTAMPNS, the only one at this level
                    if first:
                        self._record_delay(payload)
                        first = False
                    now = self._arrival_time(payload, now)
                else:
                    # pktinfo: a known one costs a dict lookup (measured: ~0.3 µs per
                    # datagram for recvmsg and this, over asyncio's datagram endpoint).
                    local = local_names.get(payload) or self._local_address(ancillary)
            try:
                router.datagram_received(data, (addr[0], addr[1]), now, local)
            except Exception:  # a bug must not stop the port for everyone else
                log.exception("datagram from %s crashed the router", addr)
                router.counters["router_errors"] += 1
        try:
            router.end_burst()
        except Exception:
            log.exception("fanning out a read burst crashed")
            router.counters["router_errors"] += 1
        if self.gso and not self.fanout.gso:
            # The kernel refused a GSO entry for this path (gso.py): said once.
            self.gso = False
            log.warning(
                "UDP GSO refused while sending (%s): the fan-out sends one datagram per entry",
                os.strerror(self.fanout.gso_error),
            )
        self.arm_timer()

    def _arrival_time(self, timespec: bytes, now: float) -> float:
        """When the kernel received the datagram (SO_TIMESTAMPNS, wall clock) on the
        monotonic clock the loop's time follows: transport-wide cc feedback (twcc.py)
        reports arrival times to 250 µs, and uvloop's ``time()`` is cached per loop
        iteration in whole milliseconds, so a burst read late would look like packets
        that arrived together. Never before the previous datagram's (a stepped wall
        clock); ``now`` when the timestamp is missing or implausible."""
        if len(timespec) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(timespec)
            wall = seconds + nanoseconds * 1e-9
            monotonic, real = time.monotonic(), time.time()
            if 0.0 <= real - wall < 1.0:
                now = monotonic - (real - wall)
        now = max(now, self._last_arrival)
        self._last_arrival = now
        return now

    def _record_delay(self, timespec: bytes) -> None:
        if len(timespec) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(timespec)
            waited = time.time() - (seconds + nanoseconds * 1e-9)
            self.receive_delay.record(waited)

    def _local_address(self, ancillary: list[tuple[int, int, bytes]]) -> str | None:
        """The destination address of a datagram, from its pktinfo control message
        (remembered by the message's bytes: a worker sees a handful of them)."""
        for level, kind, payload in ancillary:
            if (level, kind) in (
                (socket.IPPROTO_IP, IP_PKTINFO),
                (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO),
            ):
                if len(self._local_names) >= MAX_LOCAL_NAMES:
                    self._local_names.clear()
                name = self._local_names[payload] = _pktinfo_address(payload)
                return name
        return None

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

    # sending --------------------------------------------------------------------------

    def _sendto(self, data: bytes, addr: Address) -> None:
        self._send(data, addr, None)

    def default_source(self, peer: Address) -> str | None:
        """The source address the kernel's routing gives a datagram to ``peer``: connect a
        throwaway UDP socket of our family (no packet is sent) and read its name. One
        system call per new viewer, so the fan-out can skip the per-datagram source
        wherever the route already picks the right one (Sender.fanout_source). None if
        there is no route."""
        try:
            with socket.socket(self.sock.family, socket.SOCK_DGRAM) as probe:
                probe.connect(peer[:2] if self.sock.family == socket.AF_INET else peer)
                return str(probe.getsockname()[0])
        except OSError:
            return None

    def _sendto_from(self, data: bytes, addr: Address, source: str) -> None:
        """Send ``data`` to ``addr`` from our address ``source`` (see the module docstring)."""
        control = self._source_controls.get(source)
        if control is None:
            control = self._source_controls[source] = source_control(self.sock.family, source)
        self._send(data, addr, control)

    def _send(self, data: bytes, addr: Address, control: Control | None) -> None:
        if self._backlog:
            self._hold(data, addr, control)  # behind what waits, in order
            return
        try:
            _send_datagram(self.sock, data, addr, control)
        except BlockingIOError:
            # The fan-out filled the send buffer: hold the datagram until the socket is
            # writable, as asyncio's transports do (a lost DTLS flight costs a 1 s timer).
            self._hold(data, addr, control)
        except OSError:
            self.router.counters["socket_errors"] += 1

    def _hold(self, data: bytes, addr: Address, control: Control | None) -> None:
        if len(self._backlog) >= MAX_SEND_BACKLOG:
            self.router.counters["send_buffer_full"] += 1
            return
        if not self._backlog:
            self._loop.add_writer(self.sock.fileno(), self._on_writable)
        self._backlog.append((data, addr, control))

    def _on_writable(self) -> None:
        while self._backlog:
            data, addr, control = self._backlog[0]
            try:
                _send_datagram(self.sock, data, addr, control)
            except BlockingIOError:
                return
            except OSError:
                self.router.counters["socket_errors"] += 1
            self._backlog.popleft()
        self._loop.remove_writer(self.sock.fileno())


def _send_datagram(
    sock: socket.socket, data: bytes, addr: Address, control: Control | None
) -> None:
    if control is None:
        sock.sendto(data, addr)
    else:
        sock.sendmsg([data], control, 0, addr)


def source_control(family: int, source: str) -> Control:
    """The sendmsg control message that sends from ``source`` on a ``family`` socket.

    ip(7) IP_PKTINFO: ipi_spec_dst is the source address, ifindex 0 leaves the interface
    to the route. ipv6(7) IPV6_PKTINFO (RFC 3542 §6.1): ipi6_addr is the source, with the
    interface of a scoped (link-local) one; Linux takes an IPv4-mapped source for an
    IPv4 peer of a dual-stack socket.
    """
    address = ipaddress.ip_address(source)
    if family == socket.AF_INET:
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.version != 4:
            raise ValueError(f"IPv6 source {source} on an IPv4 socket")
        info = _IN_PKTINFO.pack(0, address.packed, bytes(4))
        return [(socket.IPPROTO_IP, IP_PKTINFO, info)]
    interface = 0
    if isinstance(address, ipaddress.IPv4Address):
        packed = bytes(10) + b"\xff\xff" + address.packed  # RFC 4291 §2.5.5.2
    else:
        packed = address.packed
        if address.scope_id:
            scope = address.scope_id
            interface = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
    return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(packed, interface))]


def _pktinfo_address(payload: bytes) -> str:
    """The destination address in a received in_pktinfo (ipi_addr, the IP header's) or
    in6_pktinfo (ipi6_addr, with the interface kept as the scope of a link-local address,
    RFC 4007 §11)."""
    if len(payload) == _IN_PKTINFO.size:
        _, _, destination = _IN_PKTINFO.unpack(payload)
        return socket.inet_ntop(socket.AF_INET, destination)
    packed, interface = _IN6_PKTINFO.unpack(payload)
    text = socket.inet_ntop(socket.AF_INET6, packed)
    if ipaddress.IPv6Address(packed).is_link_local and interface:
        text = f"{text}%{interface}"
    return text


def _enable_pktinfo(sock: socket.socket) -> bool:
    """On a socket bound to a wildcard address, ask for each datagram's destination
    address (IP_PKTINFO / IPV6_RECVPKTINFO); returns whether it was enabled. A socket
    bound to one address has only that one to send from, so it needs none."""
    host = sock.getsockname()[0]
    if not ipaddress.ip_address(host).is_unspecified:
        return False
    if sock.family == socket.AF_INET6:
        # Covers IPv4 peers of a dual-stack socket too: Linux reports their destination
        # as an IPv4-mapped in6_pktinfo.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    return True


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
