"""Loopback viewers for the benchmarks: real UDP sockets in a separate process that count
what actually arrived.

The sender and the receivers take turns. The sender fills the receivers' socket buffers
with one round of datagrams (sized to fit, see ``ReceiverPool.round_capacity``), then asks
the receiver process to drain and count. While the sender is measured the receiver
process sleeps on its command pipe, so on a small, shared machine the receivers' Python
loop does not steal the core whose CPU seconds are being counted; loopback delivery
itself (``sendmmsg`` → the receiver's socket queue) is kernel work charged to the sender,
as it is for every contender in the same run.
"""

from __future__ import annotations

import math
import multiprocessing
import resource
import select
import socket
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

LOOPBACK = "127.0.0.1"
# Ask for this much; Linux caps it at net.core.rmem_max and then doubles it
# (socket(7), SO_RCVBUF). The pool reads back what it got.
REQUESTED_RCVBUF = 16 << 20
# What one ~1.2 kB datagram costs against SO_RCVBUF on loopback: its skb "truesize" is
# about 2.3 KiB (measured on Linux 6.x); 4 KiB leaves the receiver a safe margin.
RCVBUF_BYTES_PER_DATAGRAM = 4096
# A whole round must also fit the kernel's global UDP budget (net.ipv4.udp_mem, pages):
# stay far below its pressure threshold.
MAX_DATAGRAMS_IN_FLIGHT = 200_000
DATAGRAM_BUFFER = 2048


def raise_open_file_limit() -> int:
    """Raise RLIMIT_NOFILE to its hard limit (5,000 viewers are 5,000 sockets) and
    return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


@dataclass(frozen=True)
class DrainResult:
    """What one drain found: datagrams and bytes that arrived, summed over all sockets."""

    datagrams: int
    octets: int


class _ReceiverState:
    """The receiver process's sockets and its drain loop."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.poller = select.epoll()
        self.buffer = bytearray(DATAGRAM_BUFFER)

    def open(self, count: int) -> tuple[list[int], int]:
        self.close()
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, REQUESTED_RCVBUF)
            sock.bind((LOOPBACK, 0))
            sock.setblocking(False)
            self.sockets.append(sock)
            self.poller.register(sock.fileno(), select.EPOLLIN)
        rcvbuf = min(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for sock in self.sockets)
        return [sock.getsockname()[1] for sock in self.sockets], rcvbuf

    def close(self) -> None:
        for sock in self.sockets:
            self.poller.unregister(sock.fileno())
            sock.close()
        self.sockets = []

    def drain(self, expected: int, idle_timeout: float) -> DrainResult:
        """Receive until ``expected`` datagrams arrived, or nothing more arrives for
        ``idle_timeout`` seconds (then the rest was lost)."""
        by_fd = {sock.fileno(): sock for sock in self.sockets}
        buffer = self.buffer
        datagrams = octets = 0
        while datagrams < expected:
            events = self.poller.poll(idle_timeout)
            if not events:
                break
            for fd, _ in events:
                recv_into = by_fd[fd].recv_into
                while True:
                    try:
                        size = recv_into(buffer)
                    except BlockingIOError:
                        break
                    datagrams += 1
                    octets += size
        return DrainResult(datagrams, octets)


def _serve(commands: Connection) -> None:
    """The receiver process: answers one command at a time from the pipe."""
    raise_open_file_limit()
    state = _ReceiverState()
    while True:
        command, arguments = commands.recv()
        reply: Any = None
        try:
            if command == "open":
                reply = state.open(*arguments)
            elif command == "drain":
                result = state.drain(*arguments)
                reply = (result.datagrams, result.octets)
            elif command == "exit":
                state.close()
                commands.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {command!r}")
        except Exception as error:  # sent back and re-raised in the parent
            commands.send(("error", repr(error)))
        else:
            commands.send(("ok", reply))


class ReceiverPool:
    """Loopback viewers in a child process. Use as a context manager."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._commands, child_end = context.Pipe()
        self._process = context.Process(target=_serve, args=(child_end,), daemon=True)
        self._process.start()
        child_end.close()
        self.ports: list[int] = []
        self.rcvbuf = 0

    def _call(self, command: str, *arguments: object) -> Any:
        self._commands.send((command, arguments))
        status, reply = self._commands.recv()
        if status != "ok":
            raise RuntimeError(f"receiver process: {reply}")
        return reply

    def open(self, count: int) -> list[tuple[str, int]]:
        """Replace the current sockets with ``count`` fresh ones; returns their addresses."""
        self.ports, self.rcvbuf = self._call("open", count)
        return [(LOOPBACK, port) for port in self.ports]

    def round_capacity(self, viewers: int) -> int:
        """Packets per viewer that may be sent before the next drain without overflowing
        a socket's buffer or the kernel's UDP memory budget; ``viewers`` share the sockets
        round-robin when there are fewer sockets than viewers."""
        per_socket_per_packet = math.ceil(viewers / max(1, len(self.ports)))
        per_socket = self.rcvbuf // RCVBUF_BYTES_PER_DATAGRAM // per_socket_per_packet
        return max(1, min(per_socket, MAX_DATAGRAMS_IN_FLIGHT // max(1, viewers)))

    def drain(self, expected: int, idle_timeout: float = 0.5) -> DrainResult:
        """Count what arrived since the last drain; waits at most ``idle_timeout`` s for
        stragglers once the sockets run dry."""
        datagrams, octets = self._call("drain", expected, idle_timeout)
        return DrainResult(datagrams, octets)

    def close(self) -> None:
        if self._process.is_alive():
            self._call("exit")
        self._process.join(timeout=10)
        self._commands.close()

    def __enter__(self) -> ReceiverPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
